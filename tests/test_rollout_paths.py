"""The fast rollout path gives the same rollout as the plain one, in both scripts.

Plain: the textbook loop, env.step() called from Python and its outputs collected in lists.
Fast: what training runs, the script's rollout_step() writing in place into the preallocated RolloutStorage
at a device-side row index, then finish_rollout() computing the critic's values and the time-out bootstrap for
the whole rollout at once; eager or torch.compile'd, and on a GPU (TEST_DEVICE=cuda) recorded once as CUDA graphs
and replayed. Same seed, same policy: the observations, actions, log-probabilities, values, rewards, dones and GAE
must agree. The same for the update: compiled (and graphed on a GPU) against plain eager torch.
Also: the throughput benchmark runs on the CPU with tiny sizes and prints its table.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import envs_common as ec
import ppo_isaac_locomotion
import ppo_isaac_reach

DEVICE = torch.device(os.environ.get("TEST_DEVICE", "cpu"))
ROOT = Path(__file__).resolve().parents[1]
CASES = [(ppo_isaac_locomotion, ppo_isaac_locomotion.Go1Env), (ppo_isaac_reach, ppo_isaac_reach.ReachEnv)]
# The same with the rough terrain's extra paths (height scan, feet heights: Warp launches inside the step).
FAST_CASES = [(*case, {}) for case in CASES] + [
    (ppo_isaac_locomotion, ppo_isaac_locomotion.Go1Env, dict(terrain="rough", terrain_levels=2))
]
FAST_IDS = [f"{env_cls.__name__}-{task.get('terrain', 'flat')}" for _, env_cls, task in FAST_CASES]
CONFIGS = {ppo_isaac_locomotion: ppo_isaac_locomotion.Go1Config, ppo_isaac_reach: ppo_isaac_reach.ReachConfig}


# torch.compile keeps torch's random draws in program order from torch 2.12 on (pytorch/pytorch#181136); before, the
# compiled step draws the same numbers in another order. There the environments of the comparison below get numbers
# from no generator at all, so that the rest of the compiled step is still checked against the plain one.
COMPILED_RNG_IN_ORDER = torch.__version__ >= (2, 12)


def generator_free_rand(*shape, lo=0.0, hi=1.0):
    """Uniform-looking numbers in [lo, hi) from the golden-ratio sequence: a pure function of the shape."""
    n = int(np.prod(shape))
    u = (torch.arange(1, n + 1, device=DEVICE, dtype=torch.float64) * 0.6180339887498949) % 1.0
    return lo + (hi - lo) * u.float().reshape(shape)


def make(script, env_cls, num_envs=8, generator_free=False, **overrides):
    args = script.Args(num_envs=num_envs, num_steps=6, device=str(DEVICE), seed=3, **overrides)
    ec.seed_everything(args.seed)
    env = env_cls(num_envs, DEVICE, CONFIGS[script].from_args(args))
    if generator_free:
        env._rand = generator_free_rand
    torch.manual_seed(7)
    agent = script.ActorCritic(env.num_obs, env.num_actions, args.init_noise_std).to(DEVICE)
    normalizer = script.ObservationNormalizer(env.num_obs, clip=args.obs_clip).to(DEVICE)
    first_obs = env.reset()
    env.desynchronize()
    return args, env, agent, normalizer, first_obs


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("script,env_cls,task", FAST_CASES, ids=FAST_IDS)
def test_fast_rollout_matches_the_plain_loop(script, env_cls, task, compile):
    # Episodes of a few steps, so that time-outs, resets and their bootstrapped rewards happen inside the rollout.
    short = {"episode_length_s": 0.1, **task}
    T, iterations = 6, 3

    short["generator_free"] = compile and not COMPILED_RNG_IN_ORDER

    # Plain loop.
    args, env, agent, normalizer, next_obs = make(script, env_cls, **short)
    torch.manual_seed(11)
    plain = {k: [] for k in ("obs", "actions", "logprobs", "values", "rewards", "dones")}
    plain_gae = []
    with torch.no_grad():
        for _it in range(iterations):
            for _ in range(T):
                normalizer.update(next_obs)
                obs = normalizer(next_obs)
                action, logprob = agent.get_action(obs)
                value = agent.get_value(obs)
                next_obs, reward, terminated, truncated, final_obs = env.step(action)
                reward = reward + args.gamma * agent.get_value(normalizer(final_obs)) * truncated
                for k, v in zip(plain, (obs, action, logprob, value, reward, terminated | truncated)):
                    plain[k].append(v.clone())
            rows = {k: torch.stack(v[-T:]) for k, v in plain.items()}
            plain_gae.append(
                script.compute_gae(
                    rows["rewards"],
                    rows["values"],
                    rows["dones"],
                    agent.get_value(normalizer(next_obs)),
                    args.gamma,
                    args.gae_lambda,
                )
            )
    plain = {k: torch.stack(v) for k, v in plain.items()}
    assert plain["dones"].any(), "no episode ended: the test would not exercise resets"

    # Fast path, as training runs it. torch.compile draws the same random numbers but fuses arithmetic, which rounds
    # differently: float32 agreement to about 1e-6, which the normalizer multiplies by up to 1/std for observations
    # that hardly vary (the gravity direction's z of robots that stand: 1e-4 seen on an H100).
    # On a GPU the same holds for the eager path: MuJoCo Warp's float atomics (contact slots, constraint sums) make
    # two runs of the same physics differ in the last bits (4 of 2304 observations off by up to 1.3e-4 seen on an H100).
    tol = 1e-3 if compile or DEVICE.type == "cuda" else 1e-5
    args, env, agent, normalizer, first_obs = make(script, env_cls, compile=compile, **short)
    torch.manual_seed(11)
    storage = script.RolloutStorage.allocate(T, env.num_envs, env.num_obs, env.num_actions, DEVICE)
    storage.next_obs.copy_(first_obs)
    if compile:  # as main() applies it
        torch._inductor.config.fallback_random = True
    step_fn = torch.compile(script.rollout_step, dynamic=False) if compile else script.rollout_step
    step = ec.cuda_graphed(lambda: step_fn(env, agent, normalizer, storage), DEVICE)
    finish = ec.cuda_graphed(lambda: script.finish_rollout(agent, normalizer, storage, args), DEVICE)
    for it in range(iterations):
        storage.step.zero_()
        for _ in range(T):
            step()
        finish()
        rows = slice(it * T, (it + 1) * T)
        want_gae = dict(zip(("advantages", "returns"), plain_gae[it]))
        for k in [*plain, *want_gae]:
            got, want = getattr(storage, k), plain[k][rows] if k in plain else want_gae[k]
            if k == "dones":
                assert torch.equal(got, want), f"iteration {it}: dones differ"
            else:
                torch.testing.assert_close(
                    got, want, rtol=tol, atol=tol, msg=lambda m, it=it, k=k: f"iteration {it}, {k}: {m}"
                )
    torch.testing.assert_close(storage.next_obs, next_obs, rtol=tol, atol=tol)


@pytest.mark.parametrize("task", ["locomotion", "reach"])
def test_benchmark_prints_its_table_on_the_cpu(tmp_path, task):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "benchmark_throughput.py"),
            "--task",
            task,
            "--device",
            "cpu",
            "--num-envs",
            "4",
            "8",
            "--iterations",
            "1",
            "--physics-steps",
            "3",
            "--set",
            "num_steps",
            "4",
            "--set",
            "num_minibatches",
            "2",
            "--set",
            "update_epochs",
            "1",
            "--out",
            str(out),
            # locomotion: the seed's table too, at tiny sizes
            *(["--seed-table", "--seed-steps", "5", "--rollout-envs", "4"] if task == "locomotion" else []),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "train/phys" in proc.stdout
    if task == "locomotion":
        # Every row of the seed's table is printed and saved: MuJoCo C (mj_step, rollout), MuJoCo Warp and training
        # at each size.
        table = json.loads(out.read_text())["seed_table"]
        engines = ["mujoco.mj_step", "mujoco.rollout", "MuJoCo Warp", "MuJoCo Warp", "PPO training", "PPO training"]
        assert len(table) == len(engines)
        for row, engine in zip(table, engines):
            assert engine in row["engine"] and row["env_steps_per_s"] > 0, row
            assert f"{row['engine']:<70} | {row['envs']:>6} |" in proc.stdout, row
        assert [r["envs"] for r in table] == [1, 4, 4, 8, 4, 8]
    report = json.loads(out.read_text())
    assert [r["num_envs"] for r in report["rows"]] == [4, 8]
    for row in report["rows"]:
        for key in ("physics_env_steps_per_s", "rollout_env_steps_per_s", "training_env_steps_per_s"):
            assert row[key] > 0, key
        # Training does strictly more work per environment step than the simulator alone.
        assert row["training_env_steps_per_s"] < row["physics_env_steps_per_s"] * 1.05
        assert row["rollout_ms_per_iteration"] > 0 and row["update_ms_per_iteration"] > 0
        assert row["domain_rand"] == (task == "locomotion"), "the physics is timed with the randomized models"


def train_three_iterations(script, env_cls, fast: bool):
    """Three PPO iterations, plain (eager) or as training runs them on this device; returns (weights, lr)."""
    args, env, agent, normalizer, first_obs = make(script, env_cls, cudagraphs=fast, compile=fast)
    optimizer = torch.optim.Adam(
        agent.parameters(),
        lr=torch.tensor(args.learning_rate, device=DEVICE),
        eps=1e-5,
        fused=DEVICE.type == "cuda",
        capturable=fast and DEVICE.type == "cuda",
    )
    storage = script.RolloutStorage.allocate(args.num_steps, env.num_envs, env.num_obs, env.num_actions, DEVICE)
    storage.next_obs.copy_(first_obs)
    batch = args.num_steps * env.num_envs
    mb = torch.zeros(batch // args.num_minibatches, dtype=torch.long, device=DEVICE)
    update_stats = torch.zeros(6, device=DEVICE)
    loss_fn = torch.compile(script.ppo_loss, dynamic=False) if fast else script.ppo_loss

    def minibatch_update():
        script.ppo_minibatch_update(agent, optimizer, storage, mb, update_stats, args, loss_fn)

    update = ec.cuda_graphed(minibatch_update, DEVICE) if fast else minibatch_update
    torch.manual_seed(5)
    for _ in range(3):
        storage.step.zero_()
        for _ in range(args.num_steps):
            script.rollout_step(env, agent, normalizer, storage)
        script.finish_rollout(agent, normalizer, storage, args)
        for _ in range(args.update_epochs):
            perm = torch.randperm(batch, device=DEVICE)
            for start in range(0, batch, len(mb)):
                mb.copy_(perm[start : start + len(mb)])
                update()
    return [p.detach().clone() for p in agent.parameters()], optimizer.param_groups[0]["lr"].item()


@pytest.mark.parametrize("script,env_cls", CASES, ids=lambda x: getattr(x, "__name__", ""))
def test_fast_update_matches_the_plain_one(script, env_cls):
    """Same rollout, same minibatch order: the update as training runs it (its loss torch.compile'd and, on a GPU,
    each minibatch step recorded as a CUDA graph) leaves the same weights and learning rate as plain eager torch."""
    results = [train_three_iterations(script, env_cls, fast) for fast in (False, True)]
    (plain, lr_plain), (fast, lr_fast) = results
    assert lr_plain == pytest.approx(lr_fast)
    for a, b in zip(plain, fast):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("script,env_cls,task", FAST_CASES, ids=FAST_IDS)
def test_carried_state_is_written_in_place(script, env_cls, task):
    """Forking safety: every tensor a step reads or writes keeps its storage from one step to the next, so the
    recorded CUDA graph (GPU) never reads a stale buffer. A fork that rebinds carried state fails here on the CPU."""
    env = env_cls(4, DEVICE, CONFIGS[script].from_args(script.Args(**task)))
    env.reset()
    actions = torch.zeros(4, env.num_actions, device=DEVICE)
    assert ec.rebound_state(env, lambda: env.step(actions)) == []


def test_a_rebinding_fork_is_caught():
    """legged_gym writes `self.last_contacts = contact`: in a CUDA graph that silently freezes the carried state."""

    class RebindingGo1(ppo_isaac_locomotion.Go1Env):
        def _reward_feet_air_time(self):
            reward = super()._reward_feet_air_time()
            self.last_contacts = self.foot_contact.clone()  # the rebinding a careless fork would write
            return reward

    env = RebindingGo1(4, DEVICE)
    env.reset()
    actions = torch.zeros(4, env.num_actions, device=DEVICE)
    assert ec.rebound_state(env, lambda: env.step(actions)) == ["last_contacts"]
