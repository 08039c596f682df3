"""Data-parallel training on torch.distributed, as a user launches it: `python -m torch.distributed.run` (torchrun)
with two processes on the CPU (gloo), tiny sizes. Checked: the processes keep identical copies of the policy (each
checkpoint holds every process's digest of its policy, normalizer and optimizer, learning rate included), one run
folder, one set of checkpoints and one TensorBoard stream with global step counts; a run of two processes resumes
exactly in two and afresh in one; SIGTERM to the launcher stops both processes after one iteration with one final
checkpoint; a process killed mid-run makes the other stop with one clear line; bad input is reported once. The
pieces that cross processes (normalizer merge, gradient averaging, the stop agreement) are checked against NumPy in
two gloo processes started here."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import envs_common as ec
import ppo_isaac_locomotion
import ppo_isaac_reach
from tiny import TINY, wait_for_line

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_ITERATION = 2 * 4 * 8  # processes x environments x steps


def command(script: str, args: list[str], processes: int | None = 2) -> list[str]:
    """The script run by torchrun with `processes` processes, or by plain python (None)."""
    path = str(ROOT / f"ppo_isaac_{script}.py")
    if processes is None:
        return [sys.executable, path, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        path,
        *args,
    ]


def environment() -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def start(cmd, cwd) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(cmd, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=300, check=False)


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of the given RANK (its children carry torchrun's variables)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under torchrun {launcher.pid}")


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


# ---------------------------------------------------------------------------------------------------------------
# One locomotion run of two processes, stopped by SIGTERM to the launcher: most assertions read it
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("two_processes")
    launcher = start(command("locomotion", [*TINY, "--num-iterations", "1000", "--save-interval", "1"]), cwd)
    head = wait_for_line(launcher, "iter     2/1000")
    launcher.send_signal(signal.SIGTERM)
    t0 = time.time()
    rest, stderr = launcher.communicate(timeout=120)
    (run_dir,) = (cwd / "runs").iterdir()
    checkpoints = {p.name: load(p) for p in sorted((run_dir / "checkpoints").glob("*.pt"))}
    return {
        "cwd": cwd,
        "run_dir": run_dir,
        "stdout": head + rest,
        "stderr": stderr,
        "seconds": time.time() - t0,
        "checkpoints": checkpoints,
    }


def test_sigterm_to_the_launcher_stops_both_processes_with_one_final_checkpoint(stopped_run):
    out, err, ckpts = stopped_run["stdout"], stopped_run["stderr"], stopped_run["checkpoints"]
    done = ckpts["latest.pt"]["iteration"]
    assert done >= 2 and out.count(f"stopped after iteration {done}; resume with") == 1, out
    # the printed command resumes exactly: as many processes again
    assert "resume with: torchrun --standalone --nproc-per-node 2 " in out, out
    assert out.count("SIGTERM: finishing this iteration") == 1, out  # rank 0 alone prints
    # Both processes saved together (each one's environments and digest are in it) and left cleanly: no traceback
    # from either (torchrun's own report of the signal it got is its business), no forced kill after its 30 s.
    assert len(ckpts["latest.pt"]["digests"]) == 2 and ckpts[f"ckpt_{done:06d}.pt"]["iteration"] == done
    assert 'ppo_isaac_locomotion.py", line' not in err and "error:" not in err, err
    assert "forcefully exiting" not in err and stopped_run["seconds"] < 60, err
    assert not list(stopped_run["run_dir"].rglob("*.tmp"))


def test_one_run_folder_one_set_of_checkpoints_one_event_stream(stopped_run):
    run_dir, ckpts, out = stopped_run["run_dir"], stopped_run["checkpoints"], stopped_run["stdout"]
    done = ckpts["latest.pt"]["iteration"]
    assert [p.name for p in (stopped_run["cwd"] / "runs").iterdir()] == [run_dir.name]
    assert sorted(ckpts) == [f"ckpt_{i:06d}.pt" for i in range(1, done + 1)] + ["latest.pt"]
    (events,) = run_dir.glob("events.out.tfevents.*")
    assert json.loads((run_dir / "config.json").read_text())["processes"] == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events)).Reload()
    steps = [e.step for e in acc.Scalars("charts/SPS")]
    assert steps == [STEPS_PER_ITERATION * i for i in range(1, done + 1)], steps  # global steps, written once
    assert "8 environments (2 processes x 4" in out  # the start-up line counts every process's environments
    assert out.count("iter     1/1000") == 1 and f"steps {STEPS_PER_ITERATION:>11,}" in out


def test_the_processes_hold_one_policy_and_their_own_environments(stopped_run):
    ckpts = stopped_run["checkpoints"]
    seen = set()
    for name, ckpt in ckpts.items():
        first, second = ckpt["digests"]
        # Both processes' policy, normalizer and optimizer (Adam's moments and the learning rate) bit for bit the
        # same, and the digest is that of what the checkpoint holds.
        assert first == second == ec.state_digest(ckpt["model"], ckpt["normalizer"], ckpt["optimizer"]), name
        seen.add(first)
        # The normalizer has seen every process's observations: 2 x 4 environments per step.
        assert ckpt["normalizer"]["count"].item() == STEPS_PER_ITERATION * ckpt["iteration"], name
        other = ckpt["other_processes"][0]
        assert not torch.equal(other["env"]["sim"]["qpos"], ckpt["env"]["sim"]["qpos"])  # seeds differ by rank
    assert len(seen) == len(ckpts) - 1  # every update changed the policy (latest.pt repeats the last one)
    lrs = [c["optimizer"]["param_groups"][0]["lr"].item() for c in ckpts.values()]
    assert any(lr != pytest.approx(1e-3) for lr in lrs), lrs  # the KL-adaptive rate moved (the same in both)


# ---------------------------------------------------------------------------------------------------------------
# Resume: two processes exactly, one process afresh; then a process killed
# ---------------------------------------------------------------------------------------------------------------
def test_two_processes_resume_exactly_and_a_killed_process_stops_the_other(stopped_run):
    run_dir, straight = stopped_run["run_dir"], stopped_run["checkpoints"]["ckpt_000002.pt"]
    launcher = start(command("locomotion", ["--checkpoint", str(run_dir / "checkpoints" / "ckpt_000001.pt")]), run_dir)
    head = wait_for_line(launcher, "iter     3/1000")  # iteration 2's checkpoint is written before this line
    resumed = load(run_dir / "checkpoints" / "ckpt_000002.pt")
    assert resumed["digests"] == straight["digests"]  # the policy, normalizer and optimizer, bit for bit
    for a, b in ((resumed, straight), (resumed["other_processes"][0], straight["other_processes"][0])):
        assert ec.state_digest(a["env"]) == ec.state_digest(b["env"])  # each process's environments
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["rng"]["python"] == b["rng"]["python"]
        assert np.array_equal(a["rng"]["numpy"][1], b["rng"]["numpy"][1])
    assert "iter     2/1000" in head and "iter     1/1000" not in head

    os.kill(worker_pid(launcher, 1), signal.SIGKILL)
    t0 = time.time()
    _, err = launcher.communicate(timeout=120)
    assert time.time() - t0 < 60, err
    assert launcher.returncode != 0
    lost = [line for line in err.splitlines() if line.startswith("error: rank 0 of 2: lost the other processes")]
    assert len(lost) == 1, err


def test_a_checkpoint_of_two_processes_resumes_in_one(stopped_run):
    run_dir = stopped_run["run_dir"]
    done = stopped_run["checkpoints"]["latest.pt"]["iteration"]
    latest = run_dir / "checkpoints" / f"ckpt_{done:06d}.pt"
    out = run(command("locomotion", ["--checkpoint", str(latest), "--num-iterations", str(done + 1)], None), run_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "saved by 2 process(es) with 4 environments each: the environments start afresh" in out.stdout
    assert f"iter {done + 1:5d}/{done + 1}" in out.stdout and "4 environments on CPU" in out.stdout
    ckpt = load(run_dir / "checkpoints" / f"ckpt_{done + 1:06d}.pt")
    assert ckpt["processes"] == 1 and ckpt["other_processes"] == [] and len(ckpt["digests"]) == 1


# ---------------------------------------------------------------------------------------------------------------
# The reach script, and bad input
# ---------------------------------------------------------------------------------------------------------------
def test_reach_trains_with_two_processes(tmp_path):
    out = run(command("reach", [*TINY, "--num-iterations", "2", "--save-interval", "1"]), tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    ckpt = load(run_dir / "checkpoints" / "latest.pt")
    assert ckpt["processes"] == 2 and ckpt["digests"][0] == ckpt["digests"][1]
    assert out.stdout.count("iter     2/2") == 1 and out.stdout.count("done: ") == 1


def test_bad_input_is_reported_once(tmp_path):
    """Every process meets the bad input (here: --eval, which runs in one process); rank 0 alone says it."""
    out = run(command("locomotion", ["--device", "cpu", "--eval", "--checkpoint", "nope.pt"]), tmp_path)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --eval runs in one process: start it with python, not torchrun"], out.stderr
    # torchrun's report: the first process to exit did with code 2 (it then stops the other, which may be still
    # checking: a SIGTERM there is its exit), and none printed a traceback.
    assert "exitcode  : 2" in out.stderr.split("Root Cause")[1], out.stderr
    assert 'Traceback (most recent call last):\n  File "' + str(ROOT) not in out.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# The pieces, in two gloo processes against NumPy
# ---------------------------------------------------------------------------------------------------------------
def _observations(rank: int, step: int) -> np.ndarray:
    """(6, 3) float32 rows of rank `rank` at update `step`: one column near -1 that hardly varies (projected gravity
    of a standing robot), where a float32 E[x^2] - E[x]^2 would lose most digits."""
    rng = np.random.default_rng(100 * rank + step)
    x = rng.normal(size=(6, 3)) * [1.0, 3.0, 1e-4] + [0.5 * rank, -2.0, -1.0]
    return x.astype(np.float32)


def _rollout(rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, N) returns and values of rank `rank`, the ranks' returns on different scales."""
    rng = np.random.default_rng(7 + rank)
    returns = rng.normal(size=(5, 4)) * (1 + 3 * rank) + rank
    return returns.astype(np.float32), (returns + rng.normal(size=(5, 4))).astype(np.float32)


def _pieces_worker(rank: int, out_dir: str) -> None:
    dist = ec.Distributed(world_size=2, rank=rank, local_rank=rank, timeout_s=60)
    dist.start(torch.device("cpu"))
    results = {}
    for name, script in (("locomotion", ppo_isaac_locomotion), ("reach", ppo_isaac_reach)):
        normalizer = script.ObservationNormalizer(3, dist=dist)
        for step in range(3):
            normalizer.update(torch.from_numpy(_observations(rank, step)))
        results[name] = {k: v.clone() for k, v in normalizer.state_dict().items()}
    grads = [torch.full((2, 3), float(rank + 1)), torch.arange(4.0) * (rank + 1)]
    dist.average_(grads)
    results["average"] = grads
    results["signal"] = dist.agree_on_signal(signal.SIGTERM if rank == 1 else None)
    returns, values = _rollout(rank)
    results["explained_variance"] = ec.explained_variance(torch.from_numpy(returns), torch.from_numpy(values), dist)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.stop()


def test_merged_normalizer_gradients_and_stop_across_two_processes(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    torch.multiprocessing.start_processes(_pieces_worker, args=(str(tmp_path),), nprocs=2, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    everything = np.concatenate([_observations(r, s) for s in range(3) for r in range(2)]).astype(np.float64)
    for name, script in (("locomotion", ppo_isaac_locomotion), ("reach", ppo_isaac_reach)):
        # One normalizer fed both processes' batches, step by step, in one process.
        single = script.ObservationNormalizer(3)
        for step in range(3):
            single.update(torch.from_numpy(np.concatenate([_observations(r, step) for r in range(2)])))
        for rank in range(2):
            merged = results[rank][name]
            assert merged["count"].item() == len(everything)
            np.testing.assert_allclose(merged["mean"].numpy(), everything.mean(axis=0), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(merged["var"].numpy(), everything.var(axis=0), rtol=1e-4)
            for key in ("mean", "var", "count"):
                torch.testing.assert_close(merged[key], single.state_dict()[key], rtol=1e-5, atol=1e-9)
        assert all(torch.equal(results[0][name][k], results[1][name][k]) for k in ("mean", "var", "count"))
    for rank in range(2):
        torch.testing.assert_close(results[rank]["average"][0], torch.full((2, 3), 1.5))
        torch.testing.assert_close(results[rank]["average"][1], torch.arange(4.0) * 1.5)
        assert results[rank]["signal"] == signal.SIGTERM  # rank 1's signal stops rank 0 too
    returns, values = (np.concatenate(x).astype(np.float64) for x in zip(_rollout(0), _rollout(1)))
    want = 1 - np.var(returns - values, ddof=1) / np.var(returns, ddof=1)  # over both processes' rollouts
    for rank in range(2):
        assert results[rank]["explained_variance"].item() == pytest.approx(want, rel=1e-6)


def test_one_process_needs_no_torchrun_and_a_bad_timeout_is_refused():
    single = ec.Distributed.from_environment({})
    assert (single.world_size, single.rank, single.is_main) == (1, 0, True)
    returns, values = (torch.from_numpy(x) for x in _rollout(1))
    want = 1 - (returns - values).var() / returns.var()  # the single-process formula
    assert ec.explained_variance(returns, values, single).item() == pytest.approx(want.item(), rel=1e-6)
    two = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    assert ec.Distributed.from_environment({**two, "PPO_DIST_TIMEOUT_S": "30"}).timeout_s == 30
    for bad in ("0", "soon", "inf"):
        with pytest.raises(ec.UserError, match=f"PPO_DIST_TIMEOUT_S={bad}: give a positive number of seconds"):
            ec.Distributed.from_environment({**two, "PPO_DIST_TIMEOUT_S": bad})
