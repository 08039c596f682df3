"""Training throughput against the physics limit, side by side in one process (run by hand, not collected by pytest).

    python tests/benchmark_throughput.py --task locomotion --num-envs 1024 4096 16384 [--out bench.json]

For each size it measures, on one environment of the script itself (its own classes and functions are imported,
so this measures what users run):
  1. physics: the simulator's recorded sub-steps replayed with the controls held, in environment steps per second
     (physics steps / decimation): the limit that training can approach. Measured twice: from the start (robots
     standing at their home pose) and in the states that training visits (the simulator as the timed iterations
     left it, put back before each repetition), which costs more: robots that fall or flail touch the ground with
     more than their feet and need more solver iterations. The second is the reference of the ratios;
  2. rollout: the script's rollout step (policy, physics, observations, rewards, resets, storage) as training runs
     it (torch.compile'd and replayed from a CUDA graph: the scripts' defaults on a GPU), and its finish_rollout
     (the critic's values, the time-out bootstrap and GAE);
  3. training: full PPO iterations, rollout + update: the SPS that the scripts print;
and prints a table with the ratios rollout/physics and training/physics, the time of each phase per iteration and
the peak GPU memory, and writes the same as JSON. On the CPU (tiny sizes) it shows the pipeline, not speed.

    python tests/benchmark_throughput.py --seed-table --num-envs 4096 16384 [--out seed.json]

adds the seed's speed table, rebuilt with this project's Go1 (go1.xml, its solver, 4 physics steps per policy step,
its position actuators as PD control): environment steps per second of MuJoCo's C engine stepped from Python
(`mujoco.mj_step`, one environment), of MuJoCo's C engine on every CPU core (`mujoco.rollout`, its own
multi-threaded batch stepping), of MuJoCo Warp under the same random joint targets, and of this project's training
(the rows above). Locomotion only.

With the locomotion script's defaults (--domain-rand, pushes, observation noise), every world has a model of its own
in all three: the physics is timed with the randomized models (a reset draws them, then the robots are put back at
their home pose for the first measurement; the second keeps the models the iterations left), so the ratios compare
training with the physics of the same randomized model. `--set domain_rand 0` measures the compiled model instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs_common as ec  # noqa: E402

TASKS = {
    "locomotion": ("ppo_isaac_locomotion", "Go1Env", "Go1Config"),
    "reach": ("ppo_isaac_reach", "ReachEnv", "ReachConfig"),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device) -> float:
    """Seconds per call of fn, after two untimed calls (kernels load, then graphs are recorded)."""
    fn()
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeats


def bench_size(script, env_cls, config_cls, num_envs: int, device, opts) -> dict:
    args = script.Args(
        num_envs=num_envs,
        num_iterations=opts.iterations,
        device=str(device),
        seed=opts.seed,
        cudagraphs=opts.cudagraphs,
        tf32=opts.tf32,
        bf16=opts.bf16,
        compile=opts.compile,
        **dict(opts.script_args),
    )
    script.check_args(args)
    ec.gpu_speed_flags(args, device)  # as the scripts' main(): compile, cudagraphs, TF32 and bf16 off on the CPU
    ec.seed_everything(args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = config_cls.from_args(args)
    env = env_cls(num_envs, device, config)
    T = args.num_steps
    rough = getattr(env, "terrain", None) is not None
    if getattr(config, "domain_rand", False) or rough:
        # Each world's own model, as training draws them (a reset does), with every robot back at its home pose.
        env.reset()
        everyone = torch.ones(num_envs, dtype=torch.bool, device=device)
        sim = env.sim
        home = sim.default_qpos.expand(num_envs, -1).clone()
        if rough:  # each robot on its own tile
            home[:, 0:3] += env.env_origin
        sim.reset(everyone, home, ctrl=sim.default_ctrl.expand(num_envs, -1))

    # Physics only at the start: every robot at its home pose, its controls held (cheap: few contacts, a solver
    # that converges in an iteration or two).
    physics_start_s = timed(env.sim.step, opts.physics_steps, device)  # one call = one environment step

    # The script's own pieces, built and wired as its main() does.
    agent = script.ActorCritic(env.num_obs, env.num_actions, args.init_noise_std, bf16=args.bf16).to(device)
    normalizer = script.ObservationNormalizer(env.num_obs, clip=args.obs_clip).to(device)
    optimizer = torch.optim.Adam(
        agent.parameters(),
        lr=torch.tensor(args.learning_rate, device=device),
        eps=1e-5,
        fused=device.type == "cuda",
        capturable=args.cudagraphs,
    )
    storage = script.RolloutStorage.allocate(T, num_envs, env.num_obs, env.num_actions, device)
    storage.next_obs.copy_(env.reset())
    env.desynchronize()
    batch_size = T * num_envs
    minibatch_size = batch_size // args.num_minibatches
    mb = torch.zeros(minibatch_size, dtype=torch.long, device=device)
    update_stats = torch.zeros(6, device=device)

    # ---- main()'s speed block, line for line ----
    if args.compile:
        # Each size compiles afresh, as in a training run (one process, one size): torch.compile would otherwise
        # keep every earlier size's compiled code and, past its limit of recompilations, run later sizes eager.
        torch._dynamo.reset()
    compile_rollout = args.compile and opts.compile_parts in ("all", "rollout")
    compile_loss = args.compile and opts.compile_parts in ("all", "loss")
    step_fn = torch.compile(script.rollout_step, dynamic=False) if compile_rollout else script.rollout_step
    loss_fn = torch.compile(script.ppo_loss, dynamic=False) if compile_loss else script.ppo_loss
    if args.compile:
        torch._inductor.config.fallback_random = True
    graphed = ec.cuda_graphed if args.cudagraphs else (lambda fn, _device: fn)
    run_rollout_step = graphed(lambda: step_fn(env, agent, normalizer, storage), device)
    run_finish_rollout = graphed(lambda: script.finish_rollout(agent, normalizer, storage, args), device)
    run_minibatch_update = graphed(
        lambda: script.ppo_minibatch_update(agent, optimizer, storage, mb, update_stats, args, loss_fn), device
    )

    def rollout():
        storage.step.zero_()
        for _ in range(T):
            run_rollout_step()
        run_finish_rollout()

    def update():
        # main()'s update and its one host sync per iteration (the losses, the non-finite guard's flag)
        update_stats.zero_()
        for _epoch in range(args.update_epochs):
            perm = torch.randperm(batch_size, device=device)
            for start in range(0, batch_size, minibatch_size):
                mb.copy_(perm[start : start + minibatch_size])
                run_minibatch_update()
        nonfinite = ec.nonfinite_tensors({"agent": agent, "normalizer": normalizer})
        explained_var = 1 - (storage.returns - storage.values).var() / storage.returns.var().clamp(min=1e-8)
        torch.cat(
            [
                update_stats / (args.update_epochs * args.num_minibatches),
                explained_var[None],
                agent.actor_logstd.exp().mean()[None],
                optimizer.param_groups[0]["lr"].view(1),
                nonfinite.float()[None],
            ]
        ).tolist()

    # Full PPO iterations, timed per phase as the scripts' loop does. The first two compile (with --compile),
    # record the CUDA graphs and load kernels; the fastest of the others is the least disturbed.
    rollout_times, update_times = [], []
    for _ in range(opts.iterations + 2):
        t0 = time.perf_counter()
        rollout()
        sync(device)
        t1 = time.perf_counter()
        update()
        t2 = time.perf_counter()
        rollout_times.append(t1 - t0)
        update_times.append(t2 - t1)
    first_iterations_s = sum(rollout_times[:2]) + sum(update_times[:2])
    rollout_iter, update_iter = min(rollout_times[2:]), min(update_times[2:])

    # Physics only in the states that training visits: the simulator as the last iteration left it, its controls held,
    # T steps, then put back, so that every repetition replays the same states. Fallen and flailing robots touch the
    # ground with more than their feet and need more solver iterations: this costs more than the standing start,
    # and it is the limit that the rollout can approach.
    snapshot = env.sim.get_state()
    elapsed = 0.0
    repeats = max(1, opts.physics_steps // T)
    for repetition in range(repeats + 1):  # the first one is a warm-up
        env.sim.set_state(snapshot)
        sync(device)
        t = time.perf_counter()
        for _ in range(T):
            env.sim.step()
        sync(device)
        elapsed += (time.perf_counter() - t) * (repetition > 0)
    physics_s = elapsed / (repeats * T)

    if opts.profile and device.type == "cuda":
        env.sim.set_state(snapshot)
        profile_phases(
            {
                "physics (training states, controls held)": lambda: [env.sim.step() for _ in range(T)],
                "rollout": rollout,
                "update": update,
            },
            num_envs,
        )
    stats = env.pop_stats()
    assert all(torch.isfinite(p).all() for p in agent.parameters()), "training produced non-finite weights"

    physics = num_envs / physics_s
    rollout_sps, train = num_envs * T / rollout_iter, num_envs * T / (rollout_iter + update_iter)
    row = {
        "num_envs": num_envs,
        "physics_env_steps_per_s": physics,
        "physics_steps_per_s": physics * env.sim.decimation,
        "physics_start_env_steps_per_s": num_envs / physics_start_s,
        "rollout_env_steps_per_s": rollout_sps,
        "training_env_steps_per_s": train,
        "rollout_over_physics": rollout_sps / physics,
        "training_over_physics": train / physics,
        "rollout_ms_per_iteration": 1e3 * rollout_iter,
        "update_ms_per_iteration": 1e3 * update_iter,
        "first_two_iterations_s": first_iterations_s,
        "episodes_seen": stats.get("episodes", 0.0),
        "domain_rand": bool(getattr(config, "domain_rand", False)),
    }
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        row["peak_torch_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["warp_gib"] = ec.wp.get_mempool_used_mem_high(ec.wp.get_device(str(device))) / 2**30
        row["device_used_gib"] = (total - free) / 2**30
    return row


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- The seed's table: one model, one control protocol, four ways of stepping it ----------------------------------
def random_targets(home, action_scale: float, shape, seed: int):
    """Joint targets home + action_scale * U(-1, 1), one per policy step: what an untrained policy sends.
    Returns a float64 array of shape (*shape, nu)."""
    rng = np.random.default_rng(seed)
    return home + action_scale * rng.uniform(-1.0, 1.0, size=(*shape, len(home)))


def seed_table_cpu(mjm, decimation: int, action_scale: float, policy_steps: int, rollout_envs: int) -> list[dict]:
    """MuJoCo's C engine on the CPU: one environment stepped from Python with mj_step, then rollout_envs of them
    stepped by mujoco.rollout on os.cpu_count() threads. Both start at keyframe 0 and hold each random joint target
    for `decimation` physics steps. Returns rows of {engine, envs, env_steps_per_s}."""
    import mujoco
    from mujoco import rollout

    home = mjm.key_ctrl[0].copy()
    data = mujoco.MjData(mjm)
    mujoco.mj_resetDataKeyframe(mjm, data, 0)
    targets = random_targets(home, action_scale, (policy_steps,), seed=0)
    mujoco.mj_step(mjm, data)  # warm-up: first-call allocations
    t = time.perf_counter()
    for target in targets:
        data.ctrl[:] = target
        for _ in range(decimation):
            mujoco.mj_step(mjm, data)
    mj_step_rate = policy_steps / (time.perf_counter() - t)

    threads = os.cpu_count() or 1
    mujoco.mj_resetDataKeyframe(mjm, data, 0)
    state0 = np.empty(mujoco.mj_stateSize(mjm, mujoco.mjtState.mjSTATE_FULLPHYSICS))
    mujoco.mj_getState(mjm, data, state0, mujoco.mjtState.mjSTATE_FULLPHYSICS)
    # (envs, physics steps, nu): each policy step's target repeated for its physics steps
    control = np.repeat(random_targets(home, action_scale, (rollout_envs, policy_steps), seed=1), decimation, axis=1)
    initial = np.tile(state0, (rollout_envs, 1))
    datas = [mujoco.MjData(mjm) for _ in range(threads)]
    with rollout.Rollout(nthread=threads) as runner:
        runner.rollout(mjm, datas, initial, control[:, :decimation])  # warm-up: the thread pool starts
        t = time.perf_counter()
        runner.rollout(mjm, datas, initial, control)
        rollout_rate = rollout_envs * policy_steps / (time.perf_counter() - t)
    return [
        {"engine": "MuJoCo C, mujoco.mj_step from Python", "envs": 1, "env_steps_per_s": mj_step_rate},
        {
            "engine": f"MuJoCo C, mujoco.rollout on {threads} CPU threads",
            "envs": rollout_envs,
            "env_steps_per_s": rollout_rate,
        },
    ]


def seed_table_warp(mjm, decimation: int, action_scale: float, policy_steps: int, num_envs: int, device) -> dict:
    """MuJoCo Warp (this project's BatchedSim, recorded sub-steps) under the same protocol as seed_table_cpu:
    keyframe 0, random joint targets held for `decimation` physics steps. Returns one row."""
    sim = ec.BatchedSim(mjm, num_envs, device, decimation=decimation, contact_forces=True, poses=False)
    home = torch.tensor(mjm.key_ctrl[0], dtype=torch.float32, device=device)
    gen = torch.Generator(device=device).manual_seed(2)
    targets = home + action_scale * (2 * torch.rand(policy_steps, num_envs, mjm.nu, generator=gen, device=device) - 1)
    sim.step()  # kernels load
    sim.step()  # the sub-steps are recorded
    sync(device)
    t = time.perf_counter()
    for target in targets:
        sim.ctrl.copy_(target)
        sim.step()
    sync(device)
    rate = num_envs * policy_steps / (time.perf_counter() - t)
    return {"engine": f"MuJoCo Warp on {device.type.upper()}, physics only", "envs": num_envs, "env_steps_per_s": rate}


def seed_table(script, rows: list[dict], device, opts) -> list[dict]:
    """The seed's table with real figures (see the module docstring); prints it and returns its rows."""
    args = script.Args()
    mjm = ec.load_model(script.ASSET)
    decimation = max(1, round(script.POLICY_DT / mjm.opt.timestep))
    table = seed_table_cpu(mjm, decimation, args.action_scale, opts.seed_steps, opts.rollout_envs)
    for n in opts.num_envs:
        table.append(seed_table_warp(mjm, decimation, args.action_scale, opts.seed_steps, n, device))
    for row in rows:
        table.append(
            {
                "engine": f"this project, PPO training on {device.type.upper()} (policy, physics, update)",
                "envs": row["num_envs"],
                "env_steps_per_s": row["training_env_steps_per_s"],
            }
        )
    print(
        f"\nThe seed's table, rebuilt: Go1 (go1.xml), {decimation} physics steps of {mjm.opt.timestep * 1e3:g} ms per "
        f"environment step, random joint targets (home + {args.action_scale} x U(-1, 1)) held by the position "
        f"actuators; {opts.seed_steps} environment steps from keyframe 0; CPU: {cpu_name()}, "
        f"{os.cpu_count()} threads"
    )
    print(f"{'engine':<70} | {'envs':>6} | {'env steps/s':>12}")
    for r in table:
        print(f"{r['engine']:<70} | {r['envs']:>6} | {r['env_steps_per_s']:>12,.0f}")
    return table


def profile_phases(phases: dict, num_envs: int) -> None:
    """Where the GPU time goes: every kernel of one call of each phase (torch.profiler sees the kernels inside CUDA
    graph replays too), MuJoCo Warp's apart from torch's, with the busiest kernels of each phase."""
    from torch.profiler import ProfilerActivity, profile

    for name, fn in phases.items():
        torch.cuda.synchronize()
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        groups = {"warp": [], "torch": []}
        for e in kernels:
            groups["warp" if "_cuda_kernel_" in e.name else "torch"].append(e)
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
        print(
            f"\nprofile, {num_envs} envs, {name}: {len(kernels)} kernels, {busy:.1f} ms of kernel time in "
            f"{wall * 1e3:.1f} ms (profiled, so slower than timed)"
        )
        for group, events in groups.items():
            total = sum(e.time_range.elapsed_us() for e in events) / 1e3
            by_name = {}
            for e in events:
                n, t_us = by_name.get(e.name, (0, 0.0))
                by_name[e.name] = (n + 1, t_us + e.time_range.elapsed_us())
            print(
                f"  {group}: {len(events)} kernels, {total:.2f} ms, "
                f"{1e3 * total / max(len(events), 1):.1f} us each on average"
            )
            for k, (n, t_us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]:
                print(f"    {t_us / 1e3:7.2f} ms {n:6d}x  {k[:100]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="locomotion")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iterations", type=int, default=5, help="timed PPO iterations per size")
    parser.add_argument("--physics-steps", type=int, default=100, help="timed physics-only environment steps")
    parser.add_argument(
        "--no-cudagraphs",
        dest="cudagraphs",
        action="store_false",
        help="the plain eager path, to see what the CUDA graphs give",
    )
    parser.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="the scripts' --no-compile: no torch.compile (GPU only, as in the scripts)",
    )
    parser.add_argument(
        "--compile-parts",
        choices=["all", "rollout", "loss"],
        default="all",
        help="with compile on: what torch.compile compiles (the scripts compile both), to weigh each part's cost",
    )
    parser.add_argument("--no-tf32", dest="tf32", action="store_false", help="full float32 matrix products")
    parser.add_argument(
        "--no-bf16",
        dest="bf16",
        action="store_false",
        help="the scripts' --no-bf16: the MLPs' hidden layers in float32 (TF32 unless --no-tf32)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--set",
        dest="script_args",
        nargs=2,
        action="append",
        default=[],
        metavar=("FIELD", "VALUE"),
        help="another Args field of the script, e.g. --set num_steps 8 (ints and floats only)",
    )
    parser.add_argument(
        "--solver",
        type=int,
        nargs=2,
        default=None,
        metavar=("ITERATIONS", "LS_ITERATIONS"),
        help="the model's solver iterations and line-search iterations instead of the asset's, to "
        "compare settings (e.g. --solver 1 5, MuJoCo Playground's for its Go1)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="on a GPU: also list each phase's kernels (MuJoCo Warp's and torch's) with their times",
    )
    parser.add_argument(
        "--seed-table",
        action="store_true",
        help="also measure the seed's table (locomotion): mujoco.mj_step, mujoco.rollout, MuJoCo Warp, training",
    )
    parser.add_argument(
        "--seed-steps", type=int, default=500, help="environment steps of each engine in the seed's table"
    )
    parser.add_argument(
        "--rollout-envs", type=int, default=1024, help="environments stepped by mujoco.rollout in the seed's table"
    )
    parser.add_argument(
        "--terrain",
        choices=("flat", "rough"),
        default=None,
        help="locomotion: the script's --terrain (rough: the box tiles, height scan and curriculum)",
    )
    parser.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    opts = parser.parse_args()
    for name in ("num_envs", "iterations", "physics_steps", "seed_steps", "rollout_envs"):
        values = getattr(opts, name)
        if any(v < 1 for v in (values if isinstance(values, list) else [values])):
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        opts.script_args = [(k, float(v) if "." in v else int(v)) for k, v in opts.script_args]
    except ValueError as e:
        parser.error(f"--set takes a field and a number: {e}")
    if opts.terrain is not None:
        if opts.task != "locomotion":
            parser.error("--terrain is the locomotion task's: use --task locomotion")
        opts.script_args.append(("terrain", opts.terrain))

    if opts.solver:  # every model the script loads gets these solver options
        load_model = ec.load_model

        def load_model_with_solver(path):
            mjm = load_model(path)
            mjm.opt.iterations, mjm.opt.ls_iterations = opts.solver
            return mjm

        ec.load_model = load_model_with_solver
    if opts.seed_table and opts.task != "locomotion":
        sys.exit("error: --seed-table measures the locomotion task's Go1: use --task locomotion")
    module_name, env_name, config_name = TASKS[opts.task]
    script = importlib.import_module(module_name)
    env_cls, config_cls = getattr(script, env_name), getattr(script, config_name)
    unknown = [k for k, _ in opts.script_args if k not in {f.name for f in dataclasses.fields(script.Args)}]
    if unknown:
        parser.error(f"--set {unknown[0]}: not a field of {module_name}'s Args (see its --help, dashes as _)")
    try:
        device = ec.resolve_device(opts.device)
    except ec.UserError as e:
        sys.exit(f"error: {e}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    on_gpu = device.type == "cuda"
    print(
        f"{opts.task} on {name} ({device}), cudagraphs={opts.cudagraphs and on_gpu}, "
        f"compile={opts.compile and on_gpu and opts.compile_parts}, tf32={opts.tf32}, bf16={opts.bf16 and on_gpu}, "
        f"solver={opts.solver or 'as in the asset'}, script args {dict(opts.script_args) or 'defaults'}, "
        f"{opts.iterations} timed iterations per size",
        flush=True,
    )

    header = (
        f"{'envs':>7} | {'phys@start':>10} | {'physics':>9} | {'rollout':>9} | {'training':>9} | "
        f"{'roll/phys':>9} | {'train/phys':>10} | {'rollout ms':>10} | {'update ms':>9} | {'2 first s':>9} | "
        f"{'GPU GiB':>7}"
    )
    rows = []
    t_start = time.time()
    for n in opts.num_envs:
        try:
            row = bench_size(script, env_cls, config_cls, n, device, opts)
        except torch.OutOfMemoryError:
            print(f"{n:>7} | out of GPU memory: stopping here", flush=True)
            break
        row["seconds_to_measure"] = time.time() - t_start  # includes compiling, where it compiles
        rows.append(row)
        if len(rows) == 1:
            print(
                "environment steps per second. phys@start: the simulator alone, every robot standing at its home "
                "pose; physics: the simulator alone in the states training visits (the reference of the ratios); "
                "rollout: + policy, observations, rewards, resets, storage, values and GAE; training: + PPO update. "
                "2 first s: the first two iterations (compiling, recording the graphs)"
            )
            print(header)
        gib = row.get("device_used_gib", float("nan"))
        print(
            f"{n:>7} | {row['physics_start_env_steps_per_s']:>10,.0f} | {row['physics_env_steps_per_s']:>9,.0f} | "
            f"{row['rollout_env_steps_per_s']:>9,.0f} | {row['training_env_steps_per_s']:>9,.0f} | "
            f"{row['rollout_over_physics']:>9.2f} | {row['training_over_physics']:>10.2f} | "
            f"{row['rollout_ms_per_iteration']:>10.1f} | {row['update_ms_per_iteration']:>9.1f} | "
            f"{row['first_two_iterations_s']:>9.1f} | {gib:>7.1f}",
            flush=True,
        )
        sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    table = seed_table(script, rows, device, opts) if opts.seed_table else None

    import mujoco_warp
    import warp

    report = {
        "task": opts.task,
        "device": name,
        "cudagraphs": opts.cudagraphs and on_gpu,
        "tf32": opts.tf32,
        "bf16": opts.bf16 and on_gpu,
        "compile": opts.compile and on_gpu,
        "compile_parts": opts.compile_parts,
        "solver": opts.solver,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "versions": {
            "torch": torch.__version__,
            "warp": warp.__version__,
            "mujoco_warp": getattr(mujoco_warp, "__version__", "?"),
        },
        "script_args": dict(opts.script_args),
        "rows": rows,
        "seed_table": table,
        "cpu": cpu_name(),
        "cpu_threads": os.cpu_count(),
    }
    if opts.out:
        Path(opts.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {opts.out}")
    return report


if __name__ == "__main__":
    main()
