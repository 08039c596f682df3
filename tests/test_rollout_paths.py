"""The fast rollout path gives the same rollout as the plain one, in both scripts.

Plain: the textbook loop, env.step() called from Python and its outputs collected in lists.
Fast: what training runs, the script's make_rollout_step() writing in place into the preallocated RolloutStorage
at a device-side row index, and on a GPU (TEST_DEVICE=cuda) recorded once as a CUDA graph and replayed.
Same seed, same policy: the observations, actions, log-probabilities, values, rewards and dones must agree.
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


def make(script, env_cls, num_envs=8, **overrides):
    args = script.Args(num_envs=num_envs, num_steps=6, device=str(DEVICE), seed=3, **overrides)
    ec.seed_everything(args.seed)
    env = env_cls(num_envs, DEVICE, args)
    torch.manual_seed(7)
    agent = script.ActorCritic(env_cls.num_obs, env_cls.num_actions, args.init_noise_std).to(DEVICE)
    normalizer = script.ObservationNormalizer(env_cls.num_obs, clip=args.obs_clip).to(DEVICE)
    first_obs = env.reset()
    env.desynchronize()
    return args, env, agent, normalizer, first_obs


@pytest.mark.parametrize("script,env_cls", CASES, ids=lambda x: getattr(x, "__name__", ""))
def test_fast_rollout_matches_the_plain_loop(script, env_cls):
    # Episodes of a few steps, so that time-outs, resets and their bootstrapped rewards happen inside the rollout.
    short = {"episode_length_s": 0.1}
    T, iterations = 6, 3

    # Plain loop.
    args, env, agent, normalizer, next_obs = make(script, env_cls, **short)
    torch.manual_seed(11)
    plain = {k: [] for k in ("obs", "actions", "logprobs", "values", "rewards", "dones")}
    with torch.no_grad():
        for _ in range(T * iterations):
            normalizer.update(next_obs)
            obs = normalizer(next_obs)
            action, logprob, _, value = agent.get_action_and_value(obs)
            next_obs, reward, terminated, truncated, final_obs = env.step(action)
            reward = reward + args.gamma * agent.get_value(normalizer(final_obs)) * truncated
            for k, v in zip(plain, (obs, action, logprob, value, reward, terminated | truncated)):
                plain[k].append(v.clone())
    plain = {k: torch.stack(v) for k, v in plain.items()}
    assert plain["dones"].any(), "no episode ended: the test would not exercise resets"

    # Fast path, as training runs it.
    args, env, agent, normalizer, first_obs = make(script, env_cls, **short)
    torch.manual_seed(11)
    storage = script.RolloutStorage.allocate(T, env.num_envs, env_cls.num_obs, env_cls.num_actions, DEVICE)
    storage.next_obs.copy_(first_obs)
    step = ec.cuda_graphed(script.make_rollout_step(env, agent, normalizer, storage, args), DEVICE, [env.gen])
    for it in range(iterations):
        storage.step.zero_()
        for _ in range(T):
            step()
        rows = slice(it * T, (it + 1) * T)
        for k in plain:
            got, want = getattr(storage, k), plain[k][rows]
            if k == "dones":
                assert torch.equal(got, want), f"iteration {it}: dones differ"
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"iteration {it}: {k} differ")
    torch.testing.assert_close(storage.next_obs, next_obs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", ["locomotion", "reach"])
def test_benchmark_prints_its_table_on_the_cpu(tmp_path, task):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "benchmark_throughput.py"), "--task", task, "--device", "cpu",
         "--num-envs", "4", "8", "--iterations", "1", "--physics-steps", "3", "--set", "num_steps", "4",
         "--set", "num_minibatches", "2", "--set", "update_epochs", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "train/phys" in proc.stdout
    report = json.loads(out.read_text())
    assert [r["num_envs"] for r in report["rows"]] == [4, 8]
    for row in report["rows"]:
        for key in ("physics_env_steps_per_s", "rollout_env_steps_per_s", "training_env_steps_per_s"):
            assert row[key] > 0, key
        # Training does strictly more work per environment step than the simulator alone.
        assert row["training_env_steps_per_s"] < row["physics_env_steps_per_s"] * 1.05
        assert row["rollout_ms_per_iteration"] > 0 and row["update_ms_per_iteration"] > 0


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the CUDA graph of the update exists only on a GPU (TEST_DEVICE=cuda)")
@pytest.mark.parametrize("script,env_cls", CASES, ids=lambda x: getattr(x, "__name__", ""))
def test_graphed_update_matches_the_eager_one(script, env_cls):
    """Same rollout, same minibatch order: the update recorded as a CUDA graph leaves the same weights, Adam moments
    and learning rate as the eager one."""
    results = []
    for cudagraphs in (False, True):
        args, env, agent, normalizer, first_obs = make(script, env_cls, cudagraphs=cudagraphs)
        optimizer = torch.optim.Adam(agent.parameters(), lr=torch.tensor(args.learning_rate, device=DEVICE), eps=1e-5,
                                     fused=True, capturable=cudagraphs)
        storage = script.RolloutStorage.allocate(args.num_steps, env.num_envs, env_cls.num_obs, env_cls.num_actions,
                                                 DEVICE)
        storage.next_obs.copy_(first_obs)
        step = script.make_rollout_step(env, agent, normalizer, storage, args)
        update = script.make_ppo_update(agent, optimizer, storage, args)
        torch.manual_seed(5)
        for _ in range(3):
            storage.step.zero_()
            for _ in range(args.num_steps):
                step()
            with torch.no_grad():
                next_value = agent.get_value(normalizer(storage.next_obs))
            adv, ret = script.compute_gae(storage.rewards, storage.values, storage.dones, next_value, args.gamma,
                                          args.gae_lambda)
            losses = update(adv, ret)
        results.append(([p.detach().clone() for p in agent.parameters()], losses["learning_rate"].item()))
    (eager, lr_eager), (graphed, lr_graphed) = results
    assert lr_eager == pytest.approx(lr_graphed)
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_runs_the_real_script(tmp_path):
    """--compile (torch.compile of the rollout step and the minibatch losses) trains end to end with finite losses."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ppo_isaac_reach.py"), "--compile", "--device", "cpu", "--num-envs", "8",
         "--num-steps", "4", "--num-iterations", "2", "--num-minibatches", "2", "--update-epochs", "1",
         "--eval-interval", "0"], capture_output=True, text=True, timeout=900, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "iter     2/2" in proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (run_dir,) = (tmp_path / "runs").iterdir()
    acc = EventAccumulator(str(run_dir)).Reload()
    values = [e.value for e in acc.Scalars("losses/value_loss")] + [e.value for e in acc.Scalars("losses/policy_loss")]
    assert len(values) == 4 and all(np.isfinite(values))
