"""Resuming across devices and loggers, and a checkpoint's arguments: the optimizer keeps the flags of the device
it runs on, a resumed --track run continues its W&B run, and --eval/--export play the policy with the task
arguments it was trained with."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import envs_common as ec
from tiny import TINY

ROOT = Path(__file__).resolve().parents[1]


def run(script, args, cwd, **env):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run(
        [sys.executable, str(ROOT / f"ppo_isaac_{script}.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def adam(params, fused, capturable):
    lr = torch.tensor(1e-3)
    return torch.optim.Adam(params, lr=lr, eps=1e-5, fused=fused, capturable=capturable)


@pytest.mark.parametrize("saved_flags", [(True, True), (False, False)], ids=["gpu-made", "cpu-made"])
def test_optimizer_keeps_the_flags_of_its_own_device(saved_flags):
    """A GPU run's Adam state (fused, capturable: CUDA graphs) loaded on the CPU, and a CPU one loaded into an
    optimizer that wants capturable steps (as a GPU run with CUDA graphs does): the flags are the loader's."""
    net = torch.nn.Linear(3, 2)
    source = adam(net.parameters(), fused=False, capturable=False)
    net(torch.randn(5, 3)).sum().backward()
    source.step()
    state = source.state_dict()
    for group in state["param_groups"]:  # as the other device wrote them
        group["fused"], group["capturable"] = saved_flags
    for fused, capturable in ((False, False), (False, True)):
        target = adam(net.parameters(), fused=fused, capturable=capturable)
        ec.load_optimizer_state(target, state)
        group = target.param_groups[0]
        assert (group["fused"], group["capturable"]) == (fused, capturable)
        assert isinstance(group["lr"], torch.Tensor)
        torch.testing.assert_close(target.state[net.weight]["exp_avg"], source.state[net.weight]["exp_avg"])
        if not capturable:  # a capturable step needs a GPU; a plain one must run here
            target.step()


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("tracked")
    out = run(
        "locomotion", [*TINY, "--num-iterations", "2", "--save-interval", "1", "--track", "--action-scale", "0.5"], cwd
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (run_dir,) = (cwd / "runs").iterdir()
    return cwd, run_dir


def test_a_resumed_tracked_run_continues_its_wandb_run(tracked_run):
    cwd, run_dir = tracked_run
    ckpt = torch.load(run_dir / "checkpoints" / "ckpt_000001.pt", weights_only=False)
    assert ckpt["wandb_id"]
    out = run(
        "locomotion", ["--checkpoint", str(run_dir / "checkpoints" / "ckpt_000001.pt"), "--num-iterations", "3"], cwd
    )
    assert out.returncode == 0, out.stdout + out.stderr
    ids = sorted(p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*"))
    assert ids == [ckpt["wandb_id"]] * 2, ids  # the same W&B run, written twice (offline: one folder per process)
    assert not (cwd / "wandb").exists()


def test_eval_and_export_take_the_task_arguments_from_the_checkpoint(tracked_run):
    cwd, run_dir = tracked_run
    latest = str(run_dir / "checkpoints" / "latest.pt")
    out = run(
        "locomotion",
        ["--device", "cpu", "--num-envs", "2", "--episode-length-s", "0.2", "--eval", "--checkpoint", latest],
        cwd,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "using the checkpoint's --action-scale 0.5" in out.stdout
    assert "using the checkpoint's --episode-length-s 1.0" in out.stdout
    assert json.loads((run_dir / "eval.json").read_text())["episodes"] >= 2
    out = run("locomotion", ["--device", "cpu", "--export", "--checkpoint", latest], cwd)
    assert out.returncode == 0 and "using the checkpoint's --action-scale 0.5" in out.stdout, out.stdout + out.stderr


def test_gpu_only_switches_say_that_they_change_nothing_on_the_cpu(capsys):
    """--no-compile and friends on the CPU: a note says they change nothing there (every printed line true)."""

    class FakeArgs:
        compile, cudagraphs, tf32, bf16 = False, True, False, True

    ec.note_gpu_only_flags(FakeArgs(), torch.device("cpu"))
    out = capsys.readouterr().out
    assert "--no-compile, --no-tf32 change nothing on the CPU" in out
    ec.note_gpu_only_flags(FakeArgs(), torch.device("cuda"))
    assert capsys.readouterr().out == ""
