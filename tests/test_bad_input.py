"""Bad input, table-driven, for both scripts run as a user would: each case must end with exit code 2 and one line
on stderr that names the problem and its fix, print no traceback, and write nothing (no runs/, no wandb/).

The cases of each script run in one process (see DRIVER), then each is checked on its own."""

import json
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
LOCOMOTION_ONLY = [("zero-solver-iterations", [*CPU, "--solver", "0", "5"], {}, ["--solver", "at least 1"])]
REACH_ONLY = [("unknown-control-type", [*CPU, "--control-type", "velocity"], {},
               ["--control-type", "torque, position or position_delta"]),
              ("max-delta-above-one", [*CPU, "--max-delta", "2"], {}, ["--max-delta", "at most 1"])]
ALL = ([(s, *c) for s in SCRIPTS for c in CASES] + [("locomotion", *c) for c in LOCOMOTION_ONLY]
       + [("reach", *c) for c in REACH_ONLY])


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


# Runs cases of one script inside one Python process (imports are the slow part of a start): each case executes the
# script as `python ppo_isaac_<name>.py ...` would (runpy, as __main__), in its own empty folder, with its own
# environment variables, and records the exit code, stderr and what the folder holds afterwards.
DRIVER = r"""
import contextlib, io, json, os, runpy, sys
script, cases = sys.argv[1], json.loads(sys.stdin.read())
sys.path.insert(0, os.path.dirname(script))  # as `python script.py` would
results = {}
for label, cwd, argv, env in cases:
    saved = dict(os.environ)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    os.chdir(cwd)
    sys.argv = [script, *argv]
    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # a traceback, as the user would see it
            import traceback
            traceback.print_exc(file=err)
            code = 1
    os.environ.clear()
    os.environ.update(saved)
    results[label] = {"code": code, "stderr": err.getvalue(), "written": sorted(os.listdir(cwd))}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_input")
    home = base / "empty_home"
    home.mkdir()
    jobs = []
    for name in SCRIPTS:
        ckpts = base / f"ckpts_{name}"
        ckpts.mkdir()
        write_checkpoints(ckpts, name)
        cases = []
        for case_name, label, args, extra_env, _ in ALL:
            if case_name != name:
                continue
            cwd = base / f"{name}_{label}"
            cwd.mkdir()
            env = {k: (v.format(home=home) if v is not None else None) for k, v in extra_env.items()}
            cases.append((label, str(cwd), [a.format(ckpts=ckpts) for a in args], env))
        # MuJoCo picks its OpenGL backend when first imported: a case that changes it needs a process of its own.
        for group in ([c for c in cases if "MUJOCO_GL" not in c[3]], [c for c in cases if "MUJOCO_GL" in c[3]]):
            if group:
                jobs.append((name, group))

    def one(job):
        name, cases = job
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **{k: v for c in cases for k, v in c[3].items() if k == "MUJOCO_GL"}}
        out = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT / f"ppo_isaac_{name}.py")], input=json.dumps(cases),
                             capture_output=True, text=True, timeout=600, env=env, cwd=ROOT, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        return {(name, label): r for label, r in json.loads(out.stdout.strip().splitlines()[-1]).items()}

    with ThreadPoolExecutor(max_workers=2) as pool:
        merged = {}
        for part in pool.map(one, jobs):
            merged.update(part)
    return merged


@pytest.mark.parametrize("name,label,args,env,words", ALL, ids=[f"{c[0]}-{c[1]}" for c in ALL])
def test_bad_input_gets_one_clear_line(results, name, label, args, env, words):
    result = results[(name, label)]
    stderr, written = result["stderr"], result["written"]
    lines = stderr.strip().splitlines()
    assert result["code"] == 2, f"exit code {result['code']}\n{stderr}"
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in: {lines[0]}"
    assert written == [], f"wrote {written}"
