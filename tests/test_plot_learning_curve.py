"""tests/plot_learning_curve.py on a synthetic locomotion run written with TensorBoard's SummaryWriter, as the
scripts write theirs: a run interrupted after its checkpoint at step 6, then resumed from it (events purged from step
7 on, the clock starting again)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

import plot_learning_curve as plc

SCRIPT = Path(__file__).resolve().parent / "plot_learning_curve.py"
ARGS = {"exp_name": "ppo_isaac_locomotion", "seed": 1, "device": "cpu", "num_envs": 64, "num_steps": 24}


def log_process(run_dir, steps, start_s, purge_step=None):
    """One process of the run: its argument table, then per step a training iteration, and an evaluation every
    other step; its wall clock counts from its own start-up (start_s) at 2 s per iteration."""
    writer = SummaryWriter(str(run_dir), purge_step=purge_step)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in ARGS.items()))
    for i, step in enumerate(steps):
        wall = start_s + 2.0 * (i + 1)
        writer.add_scalar("perf/wall_time", wall, step)
        writer.add_scalar("metrics/lin_vel_error", 1.0 / step, step)
        if step % 2 == 0:
            writer.add_scalar("eval/lin_vel_error", 0.9 / step, step)
            writer.add_scalar("eval/fall_rate", 0.01, step)
            writer.add_scalar("eval/wall_time", wall + 0.5, step)
    writer.close()


@pytest.fixture()
def resumed_run(tmp_path):
    run_dir = tmp_path / "runs" / "ppo_isaac_locomotion__1__1700000000"
    log_process(run_dir, range(1, 10), start_s=10.0)  # killed after step 9; its last checkpoint was at step 6
    log_process(run_dir, range(7, 13), start_s=4.0, purge_step=7)  # resumed: steps 7-9 again, then on to 12
    return run_dir


def run(*args):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


def test_resumed_run_is_one_forward_curve(resumed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(resumed_run))
    ea.Reload()
    events = ea.Scalars("perf/wall_time")
    raw = {e.step: e.value for e in events}
    assert len(events) == 12 and sorted(raw) == list(range(1, 13)), "steps 7-9 of the first process not purged"
    assert raw[7] < raw[6], "the synthetic resumed run's clock did not restart"
    wall = plc.stitch_wall_time(raw)
    # Steps 1-6 are the first process (12 to 22 s); the second's 6 s, 8 s, ... go on from 22 s.
    assert [wall[k] for k in range(1, 13)] == [12, 14, 16, 18, 20, 22, 28, 30, 32, 34, 36, 38]
    evals = plc.shift_like({e.step: e.value for e in ea.Scalars("eval/wall_time")}, raw, wall)
    assert evals == {2: 14.5, 4: 18.5, 6: 22.5, 8: 30.5, 10: 34.5, 12: 38.5}


def test_plot_is_written_with_the_runs_own_title(resumed_run, tmp_path):
    config = {
        "script": "ppo_isaac_locomotion",
        "args": ARGS,
        "device": "cuda:0",
        "device_name": "NVIDIA H200",
        "torch": "2.11.0",
    }
    (resumed_run / "config.json").write_text(json.dumps(config))
    out = run(resumed_run, tmp_path / "curve.png")
    assert out.returncode == 0, out.stdout + out.stderr
    title = "ppo_isaac_locomotion.py, 64 envs, NVIDIA H200"
    assert out.stdout == f"wrote {tmp_path / 'curve.png'}: {title}, 12 iterations, 6 evaluations\n"
    image = Image.open(tmp_path / "curve.png")
    assert image.text["Title"] == title and image.size[0] > 300


def test_title_without_config_comes_from_the_logged_arguments_else_the_folder(tmp_path):
    assert (
        plc.run_title(tmp_path, {k: str(v) for k, v in ARGS.items()})
        == "ppo_isaac_locomotion.py, 64 envs, --device cpu"
    )
    assert plc.run_title(tmp_path, {}) == tmp_path.name


def test_without_arguments_it_prints_its_usage():
    out = run()
    assert out.returncode == 2 and out.stderr.startswith("usage: plot_learning_curve.py"), out.stderr
    assert "Traceback" not in out.stderr
