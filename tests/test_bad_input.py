"""Bad input, table-driven, for both scripts run as a user would: each case must end with exit code 2 and one line
on stderr that names the problem and its fix, print no traceback, and write nothing (no runs/, no wandb/).

The cases run as concurrent subprocesses (a module fixture), then each is checked on its own."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import ppo_isaac_locomotion
import ppo_isaac_reach

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"locomotion": ppo_isaac_locomotion, "reach": ppo_isaac_reach}
DIMS = {"locomotion": (48, 12), "reach": (30, 7)}
CPU = ["--device", "cpu", "--num-envs", "4", "--num-iterations", "1"]

# (case, extra arguments, extra environment, words the one-line message must hold)
CASES = [
    ("zero-envs", ["--device", "cpu", "--num-envs", "0"], {}, ["--num-envs", "at least 1"]),
    ("negative-envs", ["--device", "cpu", "--num-envs", "-1"], {}, ["--num-envs", "at least 1"]),
    ("zero-steps", [*CPU, "--num-steps", "0"], {}, ["--num-steps", "at least 1"]),
    ("batch-does-not-split", ["--device", "cpu", "--num-envs", "3", "--num-steps", "3", "--num-minibatches", "2"], {},
     ["minibatches", "--num-minibatches"]),
    ("cuda-without-gpu", ["--device", "cuda", "--num-envs", "4"], {}, ["no CUDA GPU", "--device cpu"]),
    ("missing-checkpoint", [*CPU, "--checkpoint", "{ckpts}/nope.pt"], {}, ["not found", "checkpoints"]),
    ("truncated-checkpoint", [*CPU, "--checkpoint", "{ckpts}/truncated.pt"], {}, ["cannot read", "truncated"]),
    ("garbage-checkpoint", [*CPU, "--checkpoint", "{ckpts}/garbage.pt"], {}, ["cannot read", "latest.pt"]),
    ("directory-checkpoint", [*CPU, "--checkpoint", "{ckpts}"], {}, ["is a directory", "latest.pt"]),
    ("other-scripts-checkpoint", [*CPU, "--checkpoint", "{ckpts}/other.pt"], {}, ["not a checkpoint of"]),
    ("other-sizes-checkpoint", [*CPU, "--checkpoint", "{ckpts}/sizes.pt"], {}, ["observations", "this task has"]),
    ("eval-without-checkpoint", [*CPU, "--eval"], {}, ["--eval needs a policy", "--checkpoint"]),
    ("export-without-checkpoint", [*CPU, "--export"], {}, ["--export needs a policy", "--checkpoint"]),
    ("video-without-renderer", [*CPU, "--capture-video"], {"MUJOCO_GL": "disable"},
     ["rendering", "MUJOCO_GL=egl", "MUJOCO_GL=osmesa", "libosmesa6"]),
    ("track-without-login", [*CPU, "--track"], {"HOME": "{home}", "WANDB_MODE": None, "WANDB_API_KEY": None},
     ["wandb login", "WANDB_MODE=offline"]),
    ("more-envs-than-memory", ["--device", "cpu", "--num-envs", "1000000000"], {}, ["GiB", "use --num-envs"]),
]
REACH_ONLY = [("unknown-control-type", [*CPU, "--control-type", "velocity"], {},
               ["--control-type", "torque, position or position_delta"])]
ALL = [(s, *c) for s in SCRIPTS for c in CASES] + [("reach", *c) for c in REACH_ONLY]


def write_checkpoints(folder: Path, name: str) -> None:
    """A real checkpoint's layout, then damaged or mismatched copies of it."""
    script, (obs, act) = SCRIPTS[name], DIMS[name]
    agent = script.ActorCritic(obs, act)
    payload = {"script": script.SCRIPT, "iteration": 1, "global_step": 1, "model": agent.state_dict(),
               "obs_dim": obs, "act_dim": act, "args": {"num_envs": 4}}
    torch.save(payload, folder / "good.pt")
    data = (folder / "good.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    (folder / "garbage.pt").write_bytes(os.urandom(4096))
    other = "ppo_isaac_reach" if name == "locomotion" else "ppo_isaac_locomotion"
    torch.save({**payload, "script": other}, folder / "other.pt")
    torch.save({**payload, "obs_dim": obs + 1}, folder / "sizes.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_input")
    ckpts = {}
    for name in SCRIPTS:
        ckpts[name] = base / f"ckpts_{name}"
        ckpts[name].mkdir()
        write_checkpoints(ckpts[name], name)
    home = base / "empty_home"
    home.mkdir()

    def one(case):
        name, label, args, extra_env, _ = case
        cwd = base / f"{name}_{label}"
        cwd.mkdir()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for k, v in extra_env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v.format(home=home)
        argv = [a.format(ckpts=ckpts[name]) for a in args]
        out = subprocess.run([sys.executable, str(ROOT / f"ppo_isaac_{name}.py"), *argv], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
        return (name, label), (out, sorted(p.name for p in cwd.iterdir()))

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(one, ALL))


@pytest.mark.parametrize("name,label,args,env,words", ALL, ids=[f"{c[0]}-{c[1]}" for c in ALL])
def test_bad_input_gets_one_clear_line(results, name, label, args, env, words):
    out, written = results[(name, label)]
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, f"exit code {out.returncode}\n{out.stdout}\n{out.stderr}"
    assert "Traceback" not in out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in: {lines[0]}"
    assert written == [], f"wrote {written}"
