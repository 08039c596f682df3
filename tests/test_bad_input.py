"""Bad input, table-driven, for both scripts run as a user would: each case must end with exit code 2 and one line
on stderr that names the problem and its fix, print no traceback, and write nothing (no runs/, no wandb/).

The cases of each script run in one process (see DRIVER), then each is checked on its own."""

import dataclasses
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
    (
        "one-sample-minibatch",
        ["--device", "cpu", "--num-envs", "1", "--num-steps", "1", "--num-minibatches", "1"],
        {},
        ["minibatches of 1 sample", "--num-minibatches"],
    ),
    ("zero-noise-std", [*CPU, "--init-noise-std", "0"], {}, ["--init-noise-std", "positive standard deviation"]),
    ("empty-checkpoint", [*CPU, "--checkpoint", ""], {}, ["--checkpoint ''", "latest.pt"]),
    ("empty-device", ["--device", "", "--num-envs", "4"], {}, ["--device ''", "cpu"]),
    ("long-exp-name", [*CPU, "--exp-name", "a" * 300], {}, ["--exp-name", "up to 100"]),
    ("eval-and-export", [*CPU, "--eval", "--export", "--checkpoint", "{ckpts}/good.pt"], {}, ["--eval and --export"]),
    (
        "batch-does-not-split",
        ["--device", "cpu", "--num-envs", "3", "--num-steps", "3", "--num-minibatches", "2"],
        {},
        ["minibatches", "--num-minibatches"],
    ),
    ("cuda-without-gpu", ["--device", "cuda", "--num-envs", "4"], {}, ["no CUDA GPU", "--device cpu"]),
    ("missing-checkpoint", [*CPU, "--checkpoint", "{ckpts}/nope.pt"], {}, ["not found", "checkpoints"]),
    ("truncated-checkpoint", [*CPU, "--checkpoint", "{ckpts}/truncated.pt"], {}, ["cannot read", "truncated"]),
    ("garbage-checkpoint", [*CPU, "--checkpoint", "{ckpts}/garbage.pt"], {}, ["cannot read", "latest.pt"]),
    ("directory-checkpoint", [*CPU, "--checkpoint", "{ckpts}"], {}, ["is a directory", "latest.pt"]),
    ("other-scripts-checkpoint", [*CPU, "--checkpoint", "{ckpts}/other.pt"], {}, ["not a checkpoint of"]),
    ("other-sizes-checkpoint", [*CPU, "--checkpoint", "{ckpts}/sizes.pt"], {}, ["observations", "this task has"]),
    ("eval-without-checkpoint", [*CPU, "--eval"], {}, ["--eval needs a policy", "--checkpoint"]),
    ("export-without-checkpoint", [*CPU, "--export"], {}, ["--export needs a policy", "--checkpoint"]),
    (
        "video-without-renderer",
        [*CPU, "--capture-video"],
        {"MUJOCO_GL": "disable"},
        ["rendering", "MUJOCO_GL=egl", "MUJOCO_GL=osmesa", "libosmesa6"],
    ),
    (
        "track-without-login",
        [*CPU, "--track"],
        {"HOME": "{home}", "WANDB_MODE": None, "WANDB_API_KEY": None},
        ["wandb login", "WANDB_MODE=offline"],
    ),
    ("more-envs-than-memory", ["--device", "cpu", "--num-envs", "1000000000"], {}, ["GiB", "use --num-envs"]),
]
EVAL_GOOD = [*CPU, "--eval", "--checkpoint", "{ckpts}/good.pt"]
LOCOMOTION_ONLY = [
    ("zero-solver-iterations", [*CPU, "--solver", "0", "5"], {}, ["--solver", "at least 1"]),
    ("push-within-a-step", [*CPU, "--push-interval-s", "0.001"], {}, ["--push-interval-s", "0 for no pushes"]),
    ("episode-of-ages", [*CPU, "--episode-length-s", "1e30"], {}, ["--episode-length-s", "to a day"]),
    ("push-interval-of-ages", [*CPU, "--push-interval-s", "1e30"], {}, ["--push-interval-s", "at most a day"]),
    ("push-at-a-megametre-per-second", [*CPU, "--push-vel", "1e6"], {}, ["--push-vel", "at most 10 m/s"]),
    ("sim2sim-without-eval", [*CPU, "--sim2sim", "--checkpoint", "{ckpts}/good.pt"], {}, ["--sim2sim", "add --eval"]),
    ("viewer-without-eval", [*CPU, "--viewer"], {}, ["--viewer", "add --eval"]),
    ("unknown-terrain", [*CPU, "--terrain", "mountains"], {}, ["--terrain 'mountains'", "flat, rough"]),
    (
        "no-terrain-levels",
        [*CPU, "--terrain", "rough", "--terrain-levels", "0"],
        {},
        ["--terrain-levels", "at least 1"],
    ),
    ("sim2sim-and-viewer", [*EVAL_GOOD, "--sim2sim", "--viewer"], {}, ["--sim2sim and --viewer", "one of them"]),
    ("viewer-and-video", [*EVAL_GOOD, "--viewer", "--capture-video"], {}, ["--capture-video", "--viewer"]),
    ("sim2sim-and-video", [*EVAL_GOOD, "--sim2sim", "--capture-video"], {}, ["--capture-video", "--sim2sim"]),
    (
        "viewer-without-display",
        [*EVAL_GOOD, "--viewer"],
        {"DISPLAY": None, "WAYLAND_DISPLAY": None},
        ["--viewer", "no display", "DISPLAY", "--capture-video"],
    ),
]
REACH_ONLY = [
    (
        "unknown-control-type",
        [*CPU, "--control-type", "velocity"],
        {},
        ["--control-type", "torque, position or position_delta"],
    ),
    ("max-delta-above-one", [*CPU, "--max-delta", "2"], {}, ["--max-delta", "at most 1"]),
    (
        "window-longer-than-hold",
        [*CPU, "--target-hold-s", "1", "--success-window-s", "2"],
        {},
        ["--success-window-s", "--target-hold-s"],
    ),
]

# Every field of Args, each with a value outside its domain (the flag must be named in the message). Fields without
# a value outside their domain (booleans: tyro accepts only true/false) are listed in NO_BAD_VALUE. A new field that
# is in neither fails test_every_field_is_walked.
COMMON_DOMAINS = {
    "exp_name": "a/b",
    "seed": "-1",
    "device": "tpu",
    "wandb_project_name": "my project",
    "wandb_entity": "a b",
    "video_interval": "0",
    "video_length": "0",
    "save_interval": "0",
    "checkpoint": "{ckpts}/nope.pt",
    "num_envs": "0",
    "num_iterations": "0",
    "num_steps": "0",
    "learning_rate": "0",
    "desired_kl": "-0.01",
    "gamma": "1.5",
    "gae_lambda": "nan",
    "num_minibatches": "0",
    "update_epochs": "0",
    "clip_coef": "0",
    "ent_coef": "-1",
    "vf_coef": "0",
    "max_grad_norm": "inf",
    "init_noise_std": "0",
    "obs_clip": "-1",
    "eval_interval": "-1",
    "eval_envs": "0",
    "eval_episodes": "0",
    "episode_length_s": "0.001",
}
TASK_DOMAINS = {
    "locomotion": {
        "lin_vel_x_range": ["1", "-1"],
        "lin_vel_y_range": ["nan", "1"],
        "ang_vel_yaw_range": ["2", "1"],
        "command_resample_s": "0",
        "action_scale": "0",
        "solver": ["4", "0"],
        "push_interval_s": "-1",
        "push_vel": "-0.5",
        "terrain": "mountains",
        "terrain_levels": "0",
        "video_command": ["nan", "0"],
        "video_level": "1.5",
    },
    "reach": {
        "control_type": "velocity",
        "max_delta": "0",
        "target_hold_s": "0",
        "success_window_s": "-1",
        "success_threshold": "0",
        "reset_noise": "-0.1",
    },
}
NO_BAD_VALUE = {
    "torch_deterministic",
    "track",
    "capture_video",
    "eval",
    "export",
    "tf32",
    "compile",
    "bf16",
    "heading_command",  # True, False or None (the default by terrain): tyro refuses anything else
    "cudagraphs",
    "norm_adv",
    "clip_vloss",
    "only_positive_rewards",
    "domain_rand",
    "obs_noise",
    "action_delay",
    "sim2sim",
    "viewer",
}
FLAG_NAMES = {"device": "device", "checkpoint": "checkpoint"}  # messages that name the problem without the flag
FIELD_CASES = []
for _script in SCRIPTS:
    for _field, _value in {**COMMON_DOMAINS, **TASK_DOMAINS[_script]}.items():
        _values = _value if isinstance(_value, list) else [_value]
        _flag = "--" + _field.replace("_", "-")
        _base = ["--device", "cpu", "--num-envs", "4", "--num-iterations", "1"]
        if _field in ("device", "num_envs", "num_iterations"):
            _base = ["--num-envs", "4"] if _field != "num_envs" else ["--device", "cpu"]
        FIELD_CASES.append((_script, f"field-{_field}", [*_base, _flag, *_values], {}, [FLAG_NAMES.get(_field, _flag)]))
ALL = (
    [(s, *c) for s in SCRIPTS for c in CASES]
    + [("locomotion", *c) for c in LOCOMOTION_ONLY]
    + [("reach", *c) for c in REACH_ONLY]
    + FIELD_CASES
)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_field_is_walked(name):
    """The table above covers every field of each script's Args: a new field needs a domain check and a case."""
    fields = {f.name for f in dataclasses.fields(SCRIPTS[name].Args)}
    walked = set(COMMON_DOMAINS) | set(TASK_DOMAINS[name]) | NO_BAD_VALUE
    assert fields - walked == set(), f"fields without a bad-input case: {sorted(fields - walked)}"
    assert {f for f in walked - fields if f not in NO_BAD_VALUE} == set(), "cases for fields that do not exist"


def write_checkpoints(folder: Path, name: str) -> None:
    """A real checkpoint's layout, then damaged or mismatched copies of it."""
    script, (obs, act) = SCRIPTS[name], DIMS[name]
    agent = script.ActorCritic(obs, act)
    payload = {
        "script": script.SCRIPT,
        "iteration": 1,
        "global_step": 1,
        "model": agent.state_dict(),
        "obs_dim": obs,
        "act_dim": act,
        "args": {"num_envs": 4},
    }
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
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            **{k: v for c in cases for k, v in c[3].items() if k == "MUJOCO_GL"},
        }
        out = subprocess.run(
            [sys.executable, "-c", DRIVER, str(ROOT / f"ppo_isaac_{name}.py")],
            input=json.dumps(cases),
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            cwd=ROOT,
            check=False,
        )
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
