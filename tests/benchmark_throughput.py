"""Training throughput against the physics limit, side by side in one process (run by hand, not collected by pytest).

    python tests/benchmark_throughput.py --task locomotion --num-envs 1024 4096 16384 [--out bench.json]

For each size it measures, on one environment of the script itself (its own classes and functions are imported,
so this measures what users run):
  1. physics: the simulator's recorded sub-steps replayed with the controls held, in environment steps per second
     (physics steps / decimation): the limit that training can approach;
  2. rollout: the script's rollout step (policy, physics, observations, rewards, resets, storage), as replayed in
     training (a CUDA graph with --cudagraphs, the scripts' default);
  3. training: full PPO iterations, rollout + GAE + update: the SPS that the scripts print;
and prints a table with the ratios rollout/physics and training/physics, the time of each phase per iteration and
the peak GPU memory, and writes the same as JSON. On the CPU (tiny sizes) it shows the pipeline, not speed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs_common as ec  # noqa: E402

TASKS = {"locomotion": ("ppo_isaac_locomotion", "Go1Env"), "reach": ("ppo_isaac_reach", "ReachEnv")}


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


def bench_size(script, env_cls, num_envs: int, device, opts) -> dict:
    args = script.Args(num_envs=num_envs, num_iterations=opts.iterations, device=str(device), seed=opts.seed,
                       cudagraphs=opts.cudagraphs, tf32=opts.tf32, compile=opts.compile, **dict(opts.script_args))
    script.check_args(args)
    ec.seed_everything(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32  # as the scripts' main()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    env = env_cls(num_envs, device, args)
    T = args.num_steps

    # 1. Physics only: the environment's own simulator, its controls held.
    physics_s = timed(env.sim.step, opts.physics_steps, device)  # one call = one environment step

    # 2. The rollout step as training runs it.
    agent = script.ActorCritic(env_cls.num_obs, env_cls.num_actions, args.init_noise_std).to(device)
    normalizer = script.ObservationNormalizer(env_cls.num_obs, clip=args.obs_clip).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=torch.tensor(args.learning_rate, device=device), eps=1e-5,
                                 fused=device.type == "cuda", capturable=device.type == "cuda" and args.cudagraphs)
    storage = script.RolloutStorage.allocate(T, num_envs, env_cls.num_obs, env_cls.num_actions, device)
    storage.next_obs.copy_(env.reset())
    rollout_step = script.make_rollout_step(env, agent, normalizer, storage, args)
    if args.compile:
        rollout_step = torch.compile(rollout_step)
    run_rollout_step = ec.cuda_graphed(rollout_step, device, [env.gen]) if args.cudagraphs else rollout_step
    ppo_update = script.make_ppo_update(agent, optimizer, storage, args)

    def rollout():
        storage.step.zero_()
        for _ in range(T):
            run_rollout_step()

    rollout_s = timed(rollout, opts.iterations, device) / T

    # 3. Full PPO iterations, with the same phase timings as the scripts' own loop.
    def update():
        with torch.no_grad():
            next_value = agent.get_value(normalizer(storage.next_obs))
            advantages, returns = script.compute_gae(storage.rewards, storage.values, storage.dones, next_value,
                                                     args.gamma, args.gae_lambda)
        losses = ppo_update(advantages, returns)
        torch.stack(list(losses.values())).tolist()  # the loop's one host sync per iteration

    rollout_times, update_times = [], []
    for i in range(opts.iterations + 1):
        t0 = time.perf_counter()
        rollout()
        sync(device)
        t1 = time.perf_counter()
        update()
        t2 = time.perf_counter()
        if i > 0:  # the first one loads the update's kernels
            rollout_times.append(t1 - t0)
            update_times.append(t2 - t1)
    rollout_iter, update_iter = min(rollout_times), min(update_times)  # the least disturbed iteration
    stats = env.pop_stats()
    assert all(torch.isfinite(p).all() for p in agent.parameters()), "training produced non-finite weights"

    physics = num_envs / physics_s
    train = num_envs * T / (rollout_iter + update_iter)
    row = {
        "num_envs": num_envs,
        "physics_env_steps_per_s": physics,
        "physics_steps_per_s": physics * env.sim.decimation,
        "rollout_env_steps_per_s": num_envs / rollout_s,
        "training_env_steps_per_s": train,
        "rollout_over_physics": num_envs / rollout_s / physics,
        "training_over_physics": train / physics,
        "rollout_ms_per_iteration": 1e3 * rollout_iter,
        "update_ms_per_iteration": 1e3 * update_iter,
        "episodes_seen": stats.get("episodes", 0.0),
    }
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        row["peak_torch_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["warp_gib"] = ec.wp.get_mempool_used_mem_high(ec.wp.get_device(str(device))) / 2**30
        row["device_used_gib"] = (total - free) / 2**30
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="locomotion")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iterations", type=int, default=5, help="timed PPO iterations per size")
    parser.add_argument("--physics-steps", type=int, default=100, help="timed physics-only environment steps")
    parser.add_argument("--no-cudagraphs", dest="cudagraphs", action="store_false",
                        help="the plain eager path, to see what the CUDA graphs give")
    parser.add_argument("--compile", action="store_true", help="the scripts' --compile (torch.compile)")
    parser.add_argument("--no-tf32", dest="tf32", action="store_false", help="full float32 matrix products")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", dest="script_args", nargs=2, action="append", default=[], metavar=("FIELD", "VALUE"),
                        help="another Args field of the script, e.g. --set num_steps 8 (ints and floats only)")
    parser.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    opts = parser.parse_args()
    opts.script_args = [(k, float(v) if "." in v else int(v)) for k, v in opts.script_args]

    module_name, env_name = TASKS[opts.task]
    script = importlib.import_module(module_name)
    env_cls = getattr(script, env_name)
    try:
        device = ec.resolve_device(opts.device)
    except ec.UserError as e:
        sys.exit(f"error: {e}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{opts.task} on {name} ({device}), cudagraphs={opts.cudagraphs and device.type == 'cuda'}, tf32={opts.tf32}, "
          f"{opts.iterations} timed iterations per size", flush=True)

    header = (f"{'envs':>7} | {'physics':>9} | {'rollout':>9} | {'training':>9} | {'roll/phys':>9} | "
              f"{'train/phys':>10} | {'rollout ms':>10} | {'update ms':>9} | {'GPU GiB':>7}")
    rows = []
    t_start = time.time()
    for n in opts.num_envs:
        try:
            row = bench_size(script, env_cls, n, device, opts)
        except torch.OutOfMemoryError:
            print(f"{n:>7} | out of GPU memory: stopping here", flush=True)
            break
        row["seconds_to_measure"] = time.time() - t_start  # with --compile: includes compiling
        rows.append(row)
        if len(rows) == 1:
            print("env steps per second (physics: the simulator alone; rollout: + policy, observations, rewards, "
                  "resets; training: + PPO update)")
            print(header)
        gib = row.get("device_used_gib", float("nan"))
        print(f"{n:>7} | {row['physics_env_steps_per_s']:>9,.0f} | {row['rollout_env_steps_per_s']:>9,.0f} | "
              f"{row['training_env_steps_per_s']:>9,.0f} | {row['rollout_over_physics']:>9.2f} | "
              f"{row['training_over_physics']:>10.2f} | {row['rollout_ms_per_iteration']:>10.1f} | "
              f"{row['update_ms_per_iteration']:>9.1f} | {gib:>7.1f}", flush=True)
        sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    import mujoco_warp
    import warp

    report = {"task": opts.task, "device": name, "cudagraphs": opts.cudagraphs and device.type == "cuda", "tf32": opts.tf32, "compile": opts.compile,
              "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
              "versions": {"torch": torch.__version__, "warp": warp.__version__,
                           "mujoco_warp": getattr(mujoco_warp, "__version__", "?")},
              "script_args": dict(opts.script_args), "rows": rows}
    if opts.out:
        Path(opts.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {opts.out}")
    return report


if __name__ == "__main__":
    main()
