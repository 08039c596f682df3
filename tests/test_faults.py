"""Faults and interruptions, in both scripts: blown-up worlds are reset and counted while the healthy ones go on
untouched; a resumed run repeats a straight one bit for bit; SIGTERM mid-rollout and SIGKILL mid-checkpoint-write
leave a checkpoint that resumes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ppo_isaac_locomotion
import ppo_isaac_reach
from tiny import TINY, wait_for_line

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "locomotion": (ppo_isaac_locomotion, ppo_isaac_locomotion.Go1Env),
    "reach": (ppo_isaac_reach, ppo_isaac_reach.ReachEnv),
}
CONFIGS = {"locomotion": ppo_isaac_locomotion.Go1Config, "reach": ppo_isaac_reach.ReachConfig}


def run(script, args, cwd, **kw):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / f"ppo_isaac_{script}.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        **kw,
    )


def start(script, args, cwd):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / f"ppo_isaac_{script}.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# ---------------------------------------------------------------------------------------------------------------
# Blown-up worlds
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_nonfinite_worlds_are_reset_counted_and_the_others_untouched(name):
    script, env_cls = SCRIPTS[name]
    bad = torch.tensor([1, 4])
    good = torch.tensor([0, 2, 3, 5])
    cfg = CONFIGS[name].from_args(script.Args(num_envs=6, device="cpu", seed=2))

    def run_steps(fault: bool):
        """Six steps from the same seed, NaNs written into two worlds' velocities before step 2 if `fault`."""
        torch.manual_seed(2)  # the environments draw from torch's global generator: both runs draw the same numbers
        env = env_cls(6, torch.device("cpu"), cfg)
        env.reset()
        actions = torch.linspace(-0.5, 0.5, 6 * env.num_actions).reshape(6, -1)
        steps = []
        for t in range(6):
            if fault and t == 2:
                env.sim.qvel[bad] = float("nan")  # through the zero-copy view: the simulator's own state
            out = [x.clone() for x in env.step(actions)]
            steps.append((out, env.sim.qpos.clone(), env.sim.qvel.clone(), env.episode_length.clone()))
        return steps, env.pop_stats()

    (healthy, healthy_stats), (faulty, stats) = run_steps(fault=False), run_steps(fault=True)
    for t, ((out_ref, qpos_ref, _, _), (out, qpos, qvel, episode_length)) in enumerate(zip(healthy, faulty)):
        obs, reward, terminated, truncated, final_obs = out
        for x in (obs, reward, final_obs):
            assert torch.isfinite(x).all(), f"step {t}: a non-finite value left the environment"
        for a, b in zip(out_ref, out):  # the healthy worlds: bit for bit the same as with no fault at all
            assert torch.equal(a[good], b[good]), f"step {t}: a healthy world changed"
        assert torch.equal(qpos[good], qpos_ref[good])
        if t == 2:
            assert terminated[bad].all() and (reward[bad] == 0).all() and (episode_length[bad] == 0).all()
            assert torch.isfinite(qpos).all() and torch.isfinite(qvel).all()
    assert stats["nonfinite_resets"] == 2 and stats["overflows"] == 0
    assert healthy_stats["nonfinite_resets"] == 0
    # No NaN leaks into the statistics (a steady-state error is NaN, honestly, in both runs: 6 steps hold no
    # steady state).
    assert all(np.isfinite(v) for k, v in stats.items() if np.isfinite(healthy_stats[k])), stats


def main_in_process(script, **overrides):
    """The script's main() in this process (so that a test can patch it), at tiny sizes on the CPU; the signal
    handlers it installs are put back afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    tiny = dict(device="cpu", num_envs=8, num_steps=8, num_minibatches=2, update_epochs=2, eval_interval=0)
    try:
        script.main(script.Args(**{**tiny, **overrides}))
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def test_training_goes_on_through_injected_nans(tmp_path, monkeypatch):
    """The real training loop (main) with NaNs written into two worlds' velocities on two rollout steps: losses stay
    finite, the resets are counted in TensorBoard, and the weights stay finite."""
    script, env_cls = SCRIPTS["locomotion"]
    monkeypatch.chdir(tmp_path)
    real_step, calls = env_cls.step, {"n": 0}

    def step_with_faults(self, actions):
        calls["n"] += 1
        if calls["n"] in (3, 11):
            self.sim.qvel[:2] = float("nan")
        return real_step(self, actions)

    monkeypatch.setattr(env_cls, "step", step_with_faults)
    main_in_process(script, num_iterations=3, episode_length_s=0.3)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (tmp_path / "runs").iterdir()
    acc = EventAccumulator(str(run_dir)).Reload()
    scalars = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert sum(scalars["charts/nonfinite_resets"]) == 4  # two worlds, twice
    for tag in ("losses/value_loss", "losses/policy_loss", "losses/approx_kl", "charts/episodic_return"):
        assert np.isfinite(scalars[tag]).all(), tag
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert torch.isfinite(ckpt["normalizer"]["mean"]).all() and torch.isfinite(ckpt["normalizer"]["var"]).all()


# ---------------------------------------------------------------------------------------------------------------
# Resume, SIGTERM, SIGKILL
# ---------------------------------------------------------------------------------------------------------------
def same_training_state(a: dict, b: dict) -> None:
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in ("mean", "var", "count"):
        assert torch.equal(a["normalizer"][k], b["normalizer"][k]), k
    for i, s in a["optimizer"]["state"].items():
        for k in s:
            assert torch.equal(s[k], b["optimizer"]["state"][i][k]), (i, k)
    assert torch.equal(a["env"]["sim"]["qpos"], b["env"]["sim"]["qpos"])


@pytest.mark.parametrize("name", SCRIPTS)
def test_resumed_run_repeats_the_straight_one_exactly(tmp_path, name):
    out = run(name, [*TINY, "--num-iterations", "4", "--save-interval", "2"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    straight = torch.load(run_dir / "checkpoints" / "ckpt_000004.pt", weights_only=False)
    # `--checkpoint PATH` alone: every other argument comes from the checkpoint.
    out = run(name, ["--checkpoint", str(run_dir / "checkpoints" / "ckpt_000002.pt")], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "from the command line" not in out.stdout, out.stdout  # nothing differs from the checkpoint
    assert "iter     3/4" in out.stdout and "iter     2/4" not in out.stdout
    resumed = torch.load(run_dir / "checkpoints" / "ckpt_000004.pt", weights_only=False)
    same_training_state(straight, resumed)


@pytest.mark.parametrize("name,sig", [("locomotion", signal.SIGTERM), ("reach", signal.SIGINT)])
def test_sigterm_or_ctrl_c_mid_rollout_saves_a_checkpoint_that_resumes(tmp_path, name, sig):
    proc = start(name, [*TINY, "--num-iterations", "1000", "--save-interval", "1000"], tmp_path)
    wait_for_line(proc, "iter     2/1000", timeout=300)
    time.sleep(0.3)  # most of an iteration is its rollout
    proc.send_signal(sig)
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + sig, rest
    assert f"{sig.name}: finishing this iteration" in rest and "resume with" in rest
    (run_dir,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)
    done = ckpt["iteration"]
    assert done >= 2 and f"stopped after iteration {done}" in rest
    printed = rest.split("resume with: ")[1].split()
    latest = run_dir / "checkpoints" / "latest.pt"
    assert printed[0] == "python" and printed[1].endswith(f"ppo_isaac_{name}.py") and len(printed) == 4, printed
    assert printed[2] == "--checkpoint"
    assert (tmp_path / printed[3]).resolve() == latest.resolve()
    # As printed, it would train on to iteration 1000 with the same sizes; one more iteration is enough here.
    out = run(name, [*printed[2:], "--num-iterations", str(done + 1)], tmp_path)
    assert out.returncode == 0 and f"iter {done + 1:5d}/{done + 1}" in out.stdout, out.stdout + out.stderr
    assert "note: --num-iterations" in out.stdout  # the difference from the checkpoint is named
    assert "4 environments" in out.stdout  # the checkpoint's size, not the CPU default


def test_training_that_turns_non_finite_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Adam's second step writes NaN into the weights (as a diverging run would): the run stops at that iteration
    with one error line and exit code 3, and latest.pt stays the last finite one."""
    script, _ = SCRIPTS["locomotion"]
    monkeypatch.chdir(tmp_path)
    real_step, calls = torch.optim.Adam.step, {"n": 0}

    def poisoned_step(self, *a, **k):
        out = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 1:  # the first minibatch of iteration 2 (2 minibatches, 2 epochs each)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned_step)
    with pytest.raises(SystemExit) as exit_info:
        main_in_process(script, num_iterations=3, save_interval=1)
    assert exit_info.value.code == 3
    (run_dir,) = (tmp_path / "runs").iterdir()
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["ckpt_000001.pt", "latest.pt"], names
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)
    assert ckpt["iteration"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("name", SCRIPTS)
def test_sigkill_during_a_checkpoint_write_leaves_the_last_good_one(tmp_path, name):
    """Kill -9 at the moment a checkpoint is being written (its temporary file exists), a few times over: the
    checkpoint on disk is always a whole one, and training resumes from it."""
    caught = 0
    for attempt in range(6):
        cwd = tmp_path / str(attempt)
        cwd.mkdir()
        proc = start(name, [*TINY, "--num-iterations", "1000", "--save-interval", "1"], cwd)
        wait_for_line(proc, "iter     2/1000", timeout=300)  # latest.pt exists from iteration 1 on
        (ckpt_dir,) = [d / "checkpoints" for d in (cwd / "runs").iterdir()]
        deadline = time.time() + 120
        while time.time() < deadline and not any(ckpt_dir.glob("*.tmp")):
            pass
        proc.send_signal(signal.SIGKILL)
        during_write = any(ckpt_dir.glob("*.tmp"))
        proc.communicate(timeout=60)
        caught += during_write
        ckpt = torch.load(ckpt_dir / "latest.pt", weights_only=False)  # whole, whatever the moment of the kill
        assert ckpt["iteration"] >= 1
        if during_write:
            break
    assert caught, "never killed during a checkpoint write"
    done = ckpt["iteration"]
    out = run(name, [*TINY, "--num-iterations", str(done + 1), "--checkpoint", str(ckpt_dir / "latest.pt")], cwd)
    assert out.returncode == 0 and f"iter {done + 1:5d}/{done + 1}" in out.stdout, out.stdout + out.stderr
