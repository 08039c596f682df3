"""ppo_isaac_locomotion.py as a user runs it (subprocesses on the CPU, tiny sizes), and its pieces against
references: GAE against a plain NumPy loop, the normalizer against NumPy's statistics, every reward term on
hand-built states, the exported policy and its contract against the script's own, the exported policy in MuJoCo's C
engine against MuJoCo Warp (sim-to-sim), and the viewer on a virtual display."""

import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mujoco
import numpy as np
import pytest
import torch

import envs_common as ec
from tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "ppo_isaac_locomotion.py"


def load_script():
    spec = importlib.util.spec_from_file_location("ppo_isaac_locomotion", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script executes
    spec.loader.exec_module(module)
    return module


loco = load_script()


def run(args, cwd, env=None, timeout=600):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, rendering_problem):
    """Two iterations with video (where this machine can render) and W&B (offline), as a user would run it."""
    cwd = tmp_path_factory.mktemp("loco")
    video = [] if rendering_problem else ["--capture-video", "--video-interval", "2", "--video-length", "5"]
    out = run([*TINY, "--num-iterations", "2", *video, "--track", "--save-interval", "1", "--video-level", "0.3"], cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "note: --video-level is for --terrain rough only; this run is on flat ground" in out.stdout
    (run_dir,) = (cwd / "runs").iterdir()
    return cwd, run_dir, out.stdout


def test_end_to_end_video(trained_run, rendering_problem):
    if rendering_problem:
        pytest.skip(rendering_problem)
    cwd, run_dir, stdout = trained_run
    video = run_dir / "videos" / "iter_000002.mp4"
    assert video.stat().st_size > 1000
    log = json.loads(video.with_suffix(".json").read_text())
    assert len(log) == 5 and len(log[0]["command"]) == 3 and len(log[0]["actual"]) == 3


def test_end_to_end_writes_logs_and_checkpoints(trained_run):
    cwd, run_dir, stdout = trained_run
    assert "iter     2/2" in stdout and "SPS" in stdout
    assert list(run_dir.glob("events.out.tfevents.*")), "no TensorBoard events"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["ckpt_000001.pt", "ckpt_000002.pt", "latest.pt"]
    assert list((run_dir / "wandb").glob("offline-run-*")), "--track (WANDB_MODE=offline) wrote no run"
    assert not (cwd / "wandb").exists(), "W&B wrote outside the run folder"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["num_envs"] == 4 and config["device"] == "cpu"
    # The TensorBoard scalars that the issue names are there.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir)).Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in [
        "charts/SPS",
        "charts/learning_rate",
        "charts/action_std",
        "losses/value_loss",
        "losses/policy_loss",
        "losses/entropy",
        "losses/approx_kl",
        "losses/clipfrac",
        "losses/explained_variance",
        "perf/rollout_time",
        "perf/update_time",
        "perf/wall_time",
        "metrics/lin_vel_error",
        "metrics/yaw_rate_error",
    ]:
        assert tag in tags, tag


def test_resume_continues_at_the_saved_iteration(trained_run):
    cwd, run_dir, _ = trained_run
    saved = torch.load(run_dir / "checkpoints" / "ckpt_000002.pt", weights_only=False)
    out = run([*TINY, "--num-iterations", "3", "--checkpoint", str(run_dir / "checkpoints" / "ckpt_000002.pt")], cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "iter     3/3" in out.stdout and "iter     1/" not in out.stdout
    resumed = torch.load(run_dir / "checkpoints" / "ckpt_000003.pt", weights_only=False)
    assert resumed["iteration"] == 3 and resumed["global_step"] == saved["global_step"] + 4 * 8
    # The normalizer went on from the saved statistics: its count grew by exactly one rollout.
    assert resumed["normalizer"]["count"].item() == saved["normalizer"]["count"].item() + 4 * 8


def test_eval_prints_the_task_metrics(trained_run, rendering_problem):
    cwd, run_dir, _ = trained_run
    video = [] if rendering_problem else ["--capture-video", "--video-length", "3"]
    out = run(
        [
            "--device",
            "cpu",
            "--num-envs",
            "4",
            "--episode-length-s",
            "0.5",
            "--eval",
            *video,
            "--checkpoint",
            str(run_dir / "checkpoints" / "latest.pt"),
        ],
        cwd,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    if video:
        assert (run_dir / "eval_video.mp4").stat().st_size > 1000 and (run_dir / "eval_video.json").exists()
    assert "learning to walk" not in out.stdout, "a training-only note printed by --eval"
    metrics = json.loads((run_dir / "eval.json").read_text())  # the metrics, not overwritten by the video's log
    for key in (
        "lin_vel_error",
        "lin_vel_error_steady",
        "yaw_rate_error",
        "fall_rate",
        "fall_rate_ci95_high",
        "episode_length_s",
    ):
        assert key in out.stdout and math.isfinite(metrics[key]) and math.isfinite(metrics[key + "_randomized"])
    for x in ("", "_randomized"):  # the nominal model, then the randomized one (with pushes and noise)
        assert (
            0.0 <= metrics[f"fall_rate_ci95_low{x}"] <= metrics[f"fall_rate{x}"] <= metrics[f"fall_rate_ci95_high{x}"]
        )
        assert metrics[f"fall_rate_ci95_high{x}"] <= 1.0 and metrics[f"episodes{x}"] >= 4
    assert "nominal" in out.stdout and "randomized" in out.stdout


@pytest.fixture(scope="module")
def exported(trained_run):
    """The trained run's latest checkpoint, exported once with --export: (run folder, checkpoint, ONNX file)."""
    cwd, run_dir, _ = trained_run
    ckpt_path = run_dir / "checkpoints" / "latest.pt"
    out = run(["--device", "cpu", "--export", "--checkpoint", str(ckpt_path)], cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("policy.pt", "policy.onnx", "policy.json"):
        assert f"wrote {run_dir / 'export' / name}" in out.stdout
    return run_dir, ckpt_path, run_dir / "export" / "policy.onnx"


def scripts_policy(ckpt_path):
    """The script's own deterministic policy of a checkpoint: raw observations -> clipped actions."""
    ckpt = torch.load(ckpt_path, weights_only=False)
    agent = loco.ActorCritic(ckpt["obs_dim"], ckpt["act_dim"])
    agent.load_state_dict(ckpt["model"])
    normalizer = loco.ObservationNormalizer(ckpt["obs_dim"], clip=ckpt["args"]["obs_clip"])
    normalizer.load_state_dict(ckpt["normalizer"])
    return lambda obs: agent.act_deterministic(normalizer(obs)).clamp(-loco.ACTION_CLIP, loco.ACTION_CLIP)


def test_export_matches_the_scripts_own_policy(exported):
    run_dir, ckpt_path, onnx_path = exported
    obs = torch.randn(64, 48) * 2
    with torch.no_grad():
        expected = scripts_policy(ckpt_path)(obs)
    scripted = torch.jit.load(str(run_dir / "export" / "policy.pt"))
    torch.testing.assert_close(scripted(obs), expected)
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path))
    np.testing.assert_allclose(session.run(None, {"obs": obs.numpy()})[0], expected.numpy(), atol=1e-5)


def observation_from_contract(contract, qpos, qvel, command, last_action):
    """What a robot's code does with the contract alone: each observation term from the state (qpos, qvel as MuJoCo
    lays them out, the command, the last action), rotated with MuJoCo's own quaternion functions, put at the
    contract's slices."""
    inverse = np.empty(4)
    mujoco.mju_negQuat(inverse, qpos[3:7])

    def to_trunk(v):
        out = np.empty(3)
        mujoco.mju_rotVecQuat(out, np.asarray(v, dtype=np.float64), inverse)
        return out

    actuators = contract["actuators"]
    terms = {
        "base_lin_vel": to_trunk(qvel[0:3]),
        "base_ang_vel": qvel[3:6],
        "projected_gravity": to_trunk([0.0, 0.0, -1.0]),
        "command": command,
        "joint_pos": qpos[actuators["qpos_index"]] - np.array(contract["actions"]["home_pose"]),
        "joint_vel": qvel[actuators["qvel_index"]],
        "last_action": last_action,
    }
    assert [e["name"] for e in contract["observation"]] == list(terms), "a term this test does not know"
    obs = np.full(contract["inputs"]["obs"]["shape"][1], np.nan)
    for entry in contract["observation"]:
        start, stop = entry["slice"]
        obs[start:stop] = terms[entry["name"]]
    return obs


def test_the_onnx_file_alone_runs_the_policy(exported):
    """The contract in the ONNX file's metadata (and in policy.json) is enough to run the policy: observations built
    from it, for states of the script's environment, give the script's own actions; joints, home pose, gains and
    timing are the model's."""
    import onnxruntime as ort

    run_dir, ckpt_path, onnx_path = exported
    session = ort.InferenceSession(str(onnx_path))
    contract = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert contract == json.loads((run_dir / "export" / "policy.json").read_text())
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert contract["source"]["iteration"] == ckpt["iteration"] and contract["source"]["args"] == json.loads(
        json.dumps(ckpt["args"])
    )
    assert contract["normalizer"]["folded_in"] and contract["normalizer"]["clip"] == ckpt["args"]["obs_clip"]
    assert contract["versions"]["mujoco"] == mujoco.__version__
    # Joints, home pose, gains and timing against go1.xml read here.
    mjm = mujoco.MjModel.from_xml_path(str(ROOT / contract["robot"]["model"]))
    joints = [mujoco.mj_id2name(mjm, mujoco.mjtObj.mjOBJ_JOINT, j) for j in mjm.actuator_trnid[:, 0]]
    assert contract["actions"]["joints"] == joints and len(joints) == 12
    assert contract["actions"]["home_pose"] == pytest.approx(mjm.key_qpos[0][mjm.jnt_qposadr[mjm.actuator_trnid[:, 0]]])
    assert contract["actuators"]["kp"] == pytest.approx(mjm.actuator_gainprm[:, 0].tolist())
    assert contract["actuators"]["kd"] == pytest.approx((-mjm.actuator_biasprm[:, 2]).tolist())
    timing = contract["timing"]
    assert timing["physics_dt"] == mjm.opt.timestep and timing["policy_dt"] == pytest.approx(
        timing["physics_dt"] * timing["decimation"]
    )
    assert contract["actions"]["scale"] == ckpt["args"]["action_scale"]
    assert contract["actions"]["clip"] == [-100.0, 100.0]

    # States of the script's environment: random actions for a few steps (tilted, moving, some resets).
    torch.manual_seed(3)
    env = loco.Go1Env(8, torch.device("cpu"))
    env.reset()
    for _ in range(6):
        env.step(torch.randn(8, 12))
    qpos, qvel = env.sim.qpos.double().numpy(), env.sim.qvel.double().numpy()
    user_obs = np.stack(
        [
            observation_from_contract(contract, qpos[i], qvel[i], env.commands[i].numpy(), env.actions[i].numpy())
            for i in range(8)
        ]
    )
    np.testing.assert_allclose(user_obs, env._observe().numpy(), atol=1e-5)
    with torch.no_grad():
        expected = scripts_policy(ckpt_path)(env._observe())
    actions = session.run(["actions"], {"obs": user_obs.astype(np.float32)})[0]
    np.testing.assert_allclose(actions, expected.numpy(), atol=1e-4)


def test_observation_table_docstring_and_function_agree():
    """Go1Env's docstring shows the observation table's slices and names (the rough terrain's height scan last), and
    observation() lays the terms out so."""
    shown = re.findall(r"\[(\d+):(\d+)\]\s+(\w+)", loco.Go1Env.__doc__)
    table = ec.observation_contract(loco.observation_table("rough"), 12)
    assert [(int(a), int(b), name) for a, b, name in shown] == [(*e["slice"], e["name"]) for e in table]
    qpos, qvel = torch.randn(2, 19), torch.randn(2, 18)
    qpos[:, 3:7] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # upright: trunk frame = world frame
    obs = loco.observation(qpos, qvel, torch.randn(2, 3), torch.randn(2, 12), torch.zeros(12))
    torch.testing.assert_close(obs[:, 0:6], qvel[:, 0:6])
    torch.testing.assert_close(obs[:, 6:9], torch.tensor([[0.0, 0.0, -1.0]] * 2))
    torch.testing.assert_close(obs[:, 12:24], qpos[:, 7:])


# ---------------------------------------------------------------------------------------------------------------
# Sim-to-sim: the exported policy in MuJoCo's C engine
# ---------------------------------------------------------------------------------------------------------------
def test_sim2sim_agrees_with_mujoco_warp_over_the_first_steps(exported):
    """The exported policy (onnxruntime) in MuJoCo's C engine against the script's policy in MuJoCo Warp, from the
    same initial states and commands (the same seed): 16 robots, the first 25 policy steps (0.5 s; the drop from
    the randomized reset pose and velocity onto the feet, where contacts make the largest differences).

    Tolerance, on the RMS over robots, steps and axes: 0.01 m/s for the trunk's linear velocity, 0.05 rad/s for its
    angular velocity. The two engines share the model and the algorithm (Newton, pyramidal cones, implicitfast, 4
    iterations) but MuJoCo Warp runs in float32 and MuJoCo C in float64, and each contact's onset can shift by a
    physics step; measured at this size: 0.0008 m/s and 0.004 rad/s (up to 0.0033 and 0.021 with other seeds).
    The bound still catches real differences: PD gains 10% lower in MuJoCo C give 0.023 m/s and 0.084 rad/s,
    MuJoCo Warp with --solver 1 5 0.075 m/s and 0.24 rad/s."""
    run_dir, ckpt_path, onnx_path = exported
    onnx_policy, own_policy = ec.OnnxPolicy(onnx_path), scripts_policy(ckpt_path)
    cpu = torch.device("cpu")
    nominal = dict(domain_rand=False, push_interval_s=0.0, obs_noise=False)  # as --sim2sim evaluates
    cfg = dataclasses.replace(loco.Go1Config.from_args(loco.Args()), **nominal)

    def trajectory(sim, policy):
        with ec.separate_rng(10_001, cpu), torch.no_grad():
            env = loco.Go1Env(16, cpu, cfg, sim=sim)
            obs = env.reset()
            first, rows = obs.clone(), []
            for _ in range(25):
                obs = env.step(policy(obs))[0]
                rows.append(torch.cat([env.base_lin_vel, env.root_ang_vel_b], dim=1))
        return first, env.commands.clone(), torch.stack(rows)

    first_w, commands_w, warp = trajectory(None, own_policy)
    first_c, commands_c, c = trajectory(ec.CEngineSim, onnx_policy)
    assert torch.equal(first_w, first_c) and torch.equal(commands_w, commands_c), "not the same start"
    rms = (warp - c).square().mean(dim=(0, 1)).sqrt()
    assert rms[:3].norm() / 3**0.5 < 0.01, f"linear velocity RMS difference {rms[:3]} m/s"
    assert rms[3:].norm() / 3**0.5 < 0.05, f"angular velocity RMS difference {rms[3:]} rad/s"
    assert warp[..., :3].abs().max() > 0.1, "nothing moved: the comparison would show nothing"


def test_sim2sim_prints_both_simulators(exported):
    """`--eval --sim2sim` as a user runs it: the run's own export (of this checkpoint) in MuJoCo C beside MuJoCo
    Warp, both tables' rows, sim2sim.json, and figures that agree for this standing policy."""
    run_dir, ckpt_path, onnx_path = exported
    out = run(["--device", "cpu", "--eval", "--sim2sim", "--num-envs", "2", "--checkpoint", str(ckpt_path)], run_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"using {onnx_path} (exported from this checkpoint)" in out.stdout
    assert "MuJoCo Warp" in out.stdout and "MuJoCo C (ONNX)" in out.stdout
    result = json.loads((run_dir / "sim2sim.json").read_text())
    for simulator in ("mujoco_warp", "mujoco_c"):
        metrics = result[simulator]
        for key in ("lin_vel_error", "lin_vel_error_steady", "yaw_rate_error", "fall_rate", "fall_rate_ci95_high"):
            assert f"  {key} " in out.stdout and math.isfinite(metrics[key]), (simulator, key)
        assert metrics["episodes"] >= 2
    assert result["mujoco_c"]["lin_vel_error"] == pytest.approx(result["mujoco_warp"]["lin_vel_error"], abs=0.02)
    assert result["mujoco_c_solver"] == {"iterations": 4, "ls_iterations": 8}  # go1.xml's own


# ---------------------------------------------------------------------------------------------------------------
# The viewer
# ---------------------------------------------------------------------------------------------------------------
def test_viewer_draws_the_policy_on_a_virtual_display(trained_run, tmp_path):
    """`--eval --viewer` under Xvfb (a display in memory): the viewer opens, draws the scene (a screenshot of the
    display is not blank, where it was before), plays policy steps, and Ctrl-C ends it cleanly."""
    import signal
    import threading

    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("Xvfb is not installed (Debian/Ubuntu: apt-get install xvfb): no display for the viewer")
    from PIL import ImageGrab

    _, run_dir, _ = trained_run
    server = subprocess.Popen(
        [xvfb, "-displayfd", "1", "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        display = ":" + server.stdout.readline().decode().strip()  # written once the server accepts clients
        blank = np.asarray(ImageGrab.grab(xdisplay=display))
        env = {**os.environ, "DISPLAY": display, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
        args = ["--device", "cpu", "--eval", "--viewer", "--checkpoint", str(run_dir / "checkpoints" / "latest.pt")]
        viewer = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines, started = [], threading.Event()

        def read():
            for line in viewer.stdout:
                lines.append(line)
                if line.startswith("viewer: playing"):
                    started.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert started.wait(180), "".join(lines)
        time.sleep(3.0)
        shot = np.asarray(ImageGrab.grab(xdisplay=display))
        viewer.send_signal(signal.SIGINT)
        try:
            viewer.wait(60)
        except subprocess.TimeoutExpired:  # say where it hangs: faulthandler prints every thread's stack on SIGABRT
            viewer.send_signal(signal.SIGABRT)
            viewer.wait(30)
            reader.join(10)
            pytest.fail("the viewer did not end within 60 s of Ctrl-C; its output and threads:\n" + "".join(lines))
        reader.join(10)
    finally:
        server.terminate()
        server.wait(10)
    output = "".join(lines)
    assert viewer.returncode == 0, output
    assert blank.std() == 0, "the display was not blank before the viewer opened"
    colours = len(np.unique(shot.reshape(-1, 3), axis=0))
    assert shot.std() > 10 and colours > 100, f"nothing drawn: {colours} colours"
    played = int(re.search(r"viewer: played (\d+) policy steps", output).group(1))
    assert played > 0, output
    assert list(tmp_path.iterdir()) == [], "the viewer wrote files"


def test_viewer_without_a_reachable_display_says_so(monkeypatch):
    """A DISPLAY that no X server answers: one UserError naming the display, not a viewer waiting forever."""
    monkeypatch.setenv("DISPLAY", ":987")
    mjm = mujoco.MjModel.from_xml_string("<mujoco/>")
    with pytest.raises(ec.UserError, match=r"--viewer cannot open a window \(.*:987"):
        with ec.viewer_window(mjm, mujoco.MjData(mjm)):
            pass


# ---------------------------------------------------------------------------------------------------------------
# Reward terms on hand-built states
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env():
    return loco.Go1Env(2, torch.device("cpu"))


def _set_base(env, quat=(1.0, 0, 0, 0), lin_vel_w=(0, 0, 0), ang_vel_b=(0, 0, 0), height=None):
    env.sim.qpos[:, 3:7] = torch.tensor(quat)
    env.sim.qvel[:, 0:3] = torch.tensor(lin_vel_w)
    env.sim.qvel[:, 3:6] = torch.tensor(ang_vel_b)
    if height is not None:
        env.sim.qpos[:, 2] = height
    env._refresh_base_state()  # as the environment does after every physics step


def test_reward_tracking_terms(env):
    yaw = math.pi / 2  # facing +y: a world velocity along +y is "forward" in the base frame
    _set_base(env, quat=(math.cos(yaw / 2), 0, 0, math.sin(yaw / 2)), lin_vel_w=(0, 0.5, 0), ang_vel_b=(0, 0, 0.3))
    env.commands[:] = torch.tensor([0.5, 0.0, 0.3])
    assert torch.allclose(env._reward_tracking_lin_vel(), torch.ones(2), atol=1e-6)
    assert torch.allclose(env._reward_tracking_ang_vel(), torch.ones(2))
    env.commands[:] = torch.tensor([0.0, 0.0, -0.2])  # errors of 0.5 m/s and 0.5 rad/s
    assert torch.allclose(env._reward_tracking_lin_vel(), torch.full((2,), math.exp(-1.0)), atol=1e-6)
    assert torch.allclose(env._reward_tracking_ang_vel(), torch.full((2,), math.exp(-1.0)))


def test_reward_base_motion_and_posture_terms(env):
    tilt = 0.3  # roll about x
    _set_base(
        env,
        quat=(math.cos(tilt / 2), math.sin(tilt / 2), 0, 0),
        lin_vel_w=(0, 0, 0.4),
        ang_vel_b=(0.1, -0.2, 5.0),
        height=env.base_height_target - 0.1,
    )
    # The base is rolled, so the world's vertical velocity has a base-frame y part too.
    assert torch.allclose(env._reward_lin_vel_z(), torch.full((2,), (0.4 * math.cos(tilt)) ** 2), atol=1e-6)
    assert torch.allclose(env._reward_ang_vel_xy(), torch.full((2,), 0.05))
    assert torch.allclose(env._reward_orientation(), torch.full((2,), math.sin(tilt) ** 2), atol=1e-6)
    assert torch.allclose(env._reward_base_height(), torch.full((2,), 0.01), atol=1e-6)


def test_reward_joint_and_action_terms(env):
    env.sim.act_force[:] = torch.tensor([2.0, -1.0] * 6)
    env.sim.qvel[:, 6:] = torch.tensor([3.0] * 12)
    assert torch.allclose(env._reward_torques(), torch.full((2,), 6 * 4.0 + 6 * 1.0))
    assert torch.allclose(env._reward_energy(), torch.full((2,), 6 * 6.0 + 6 * 3.0))
    env.last_dof_vel[:] = 2.0
    assert torch.allclose(env._reward_dof_acc(), torch.full((2,), 12 * (1.0 / env.dt) ** 2))
    env.actions[:] = 0.5
    env.last_actions[:] = 0.25
    assert torch.allclose(env._reward_action_rate(), torch.full((2,), 12 * 0.0625))


def test_reward_contact_terms(env):
    env.leg_contact[:] = torch.tensor([[True, False, True, False, False, False, False, False], [False] * 8])
    assert env._reward_collision().tolist() == [2.0, 0.0]
    env.terminated[:] = torch.tensor([True, False])
    assert env._reward_termination().tolist() == [1.0, 0.0]
    # Feet air time: env 0 is commanded to walk; foot 0 swings for 0.6 s then lands: reward 0.6 - 0.5 on landing.
    env.commands[:] = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    env.feet_air_time.zero_()
    env.last_contacts[:] = True
    swing = torch.tensor([False, True, True, True])
    rewards = []
    steps_in_air = round(0.6 / env.dt)
    for k in range(steps_in_air + 2):
        if k == 0:
            env.foot_contact[:] = True  # all feet down
        elif k < steps_in_air + 1:
            env.foot_contact[:] = swing  # foot 0 in the air
        else:
            env.foot_contact[:] = True  # touchdown
        env._filter_contacts()  # as step() does, before the reward terms
        rewards.append(env._reward_feet_air_time())
    assert all(r[0] == 0 for r in rewards[:-1])
    # Air time counts from the second airborne step (the first is OR-ed with the previous contact, a flicker
    # filter) up to and including the touchdown step: 0.6 s in all, so the reward is 0.6 - 0.5.
    assert rewards[-1][0].item() == pytest.approx(0.6 - 0.5, abs=1e-5)
    assert rewards[-1][1].item() == 0.0, "no air-time reward when told to stand still"


def test_reward_table_has_a_function_per_term():
    for name in loco.ROUGH_REWARD_SCALES:
        assert callable(getattr(loco.Go1Env, f"_reward_{name}")), name
    # Rough terrain adds its term to the flat table and lightens the fall penalty; the rest is the flat table.
    rough = dict(loco.ROUGH_REWARD_SCALES)
    assert rough.pop("feet_swing_height") < 0
    assert loco.REWARD_SCALES["termination"] < rough.pop("termination") < 0
    assert rough == {k: v for k, v in loco.REWARD_SCALES.items() if k != "termination"}


def test_resets_stay_inside_the_joint_ranges():
    """4096 environments reset three times (12,288 resets; legged_gym's rule home * U(0.5, 1.5) put a calf past its
    upper limit in 31% of them): every joint starts inside its range, MuJoCo's compiled jnt_range, and the draws
    still are home * U(0.5, 1.5), covering what of that lies in the range (calves from -2.25 rad up to the limit)."""
    torch.manual_seed(1)
    env = loco.Go1Env(4096, torch.device("cpu"))
    mjm = env.sim.mjm
    lower, upper = torch.tensor(mjm.jnt_range[1:], dtype=torch.float32).T  # joint 0 is the free joint
    home = env.default_dof_pos
    calves = [i for i in range(12) if mujoco.mj_id2name(mjm, mujoco.mjtObj.mjOBJ_JOINT, i + 1).endswith("calf_joint")]
    for _ in range(3):
        env.reset()
        q = env.dof_pos
        assert ((q >= lower) & (q <= upper)).all(), f"{((q < lower) | (q > upper)).sum()} joints outside their range"
        moving = home != 0
        factor = q[:, moving] / home[moving]
        assert (factor >= 0.5 - 1e-6).all() and (factor <= 1.5 + 1e-6).all()
        assert (q[:, ~moving] == 0).all()
        assert q[:, calves].max() > upper[calves].max() - 0.01 and q[:, calves].min() < -2.24
    assert torch.equal(env.sim.qvel[:, 6:], torch.zeros(4096, 12)), "joints start at rest"


def test_solver_option_reaches_the_simulator():
    """`--solver` sets the Newton and line-search iterations of the model MuJoCo Warp steps; else go1.xml's apply."""
    opt = loco.Go1Env(2, torch.device("cpu")).sim.m.opt
    assert (opt.iterations, opt.ls_iterations) == (4, 8)
    opt = loco.Go1Env(2, torch.device("cpu"), loco.Go1Config.from_args(loco.Args(solver=(1, 5)))).sim.m.opt
    assert (opt.iterations, opt.ls_iterations) == (1, 5)


def test_steady_state_error_leaves_out_the_second_after_a_command_change(env):
    """lin_vel_error averages every step; lin_vel_error_steady only the steps at least 1 s after a command change."""
    env.reset()
    env.pop_stats()
    env.commands[:] = torch.tensor([1.0, 0.0, 0.0])
    steady_from = int(round(loco.STEADY_AFTER_S / env.dt))
    no = torch.zeros(2, dtype=torch.bool)
    for age in range(1, steady_from + 11):
        env.command_age[:] = age
        env.base_lin_vel[:] = torch.tensor([1.0 if age >= steady_from else 0.0, 0.0, 0.0])  # a step response
        env.broken.zero_()
        env._accumulate_stats(torch.zeros(2), no, no, no, no)
    stats = env.pop_stats()
    assert stats["lin_vel_error"] == pytest.approx((steady_from - 1) / (steady_from + 10))
    assert stats["lin_vel_error_steady"] == pytest.approx(0.0)


def test_the_entropy_bonus_defaults_by_terrain():
    """--ent-coef: rsl_rl's 0.01 on flat ground, Isaac Lab's ANYmal-C rough 0.005 on rough terrain; a given value
    stays, and the command line resolves it the same way (tyro builds Args)."""
    assert loco.Args().ent_coef == 0.01 and loco.Args(terrain="rough").ent_coef == 0.005
    assert loco.Args(terrain="rough", ent_coef=0.02).ent_coef == 0.02 and loco.Args(ent_coef=0.0).ent_coef == 0.0
    import tyro

    assert tyro.cli(loco.Args, args=["--terrain", "rough"]).ent_coef == 0.005
    assert tyro.cli(loco.Args, args=["--terrain", "rough", "--ent-coef", "0.01"]).ent_coef == 0.01


def test_heading_commands_steer_the_yaw_rate_command():
    """--heading-command (legged_gym's heading_command): after every reset and step the yaw rate command is 0.5 times
    the heading error, wrapped to [-pi, pi) and clipped to the yaw rate range. On by default on rough terrain only."""
    assert not loco.Go1Config.from_args(loco.Args()).heading_command
    assert loco.Go1Config.from_args(loco.Args(terrain="rough")).heading_command
    assert not loco.Go1Config.from_args(loco.Args(terrain="rough", heading_command=False)).heading_command
    env = make_env(6, heading_command=True, domain_rand=False, push_interval_s=0.0)

    def yaw():  # by hand from the trunk's quaternion (w, x, y, z)
        w, x, y, z = env.root_quat.double().T
        return torch.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))

    def expected():
        error = (env.heading.double() - yaw() + math.pi) % (2 * math.pi) - math.pi
        return (0.5 * error).clamp(-1.0, 1.0).float()

    env.reset()
    assert env.heading.unique().numel() == 6 and env.heading.abs().max() <= math.pi
    torch.testing.assert_close(env.commands[:, 2], expected())
    env.heading.copy_(yaw().float() + torch.tensor([0.1, -0.1, 1.5, -1.5, 3.5, -3.5]))  # the last two wrap around
    env._steer_to_heading()
    torch.testing.assert_close(env.commands[:, 2], torch.tensor([0.05, -0.05, 0.75, -0.75, -1.0, 1.0]))
    for _ in range(3):
        env.step(torch.zeros(6, 12))
        torch.testing.assert_close(env.commands[:, 2], expected())


# ---------------------------------------------------------------------------------------------------------------
# Robustness: domain randomization, pushes, observation noise, action delay (the environment on the CPU)
# ---------------------------------------------------------------------------------------------------------------
def make_env(n, **overrides):
    return loco.Go1Env(n, torch.device("cpu"), loco.Go1Config.from_args(loco.Args(**overrides)))


def within(x, bounds, name):
    lo, hi = bounds
    assert (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all(), f"{name} outside [{lo}, {hi}]: {x.min()}, {x.max()}"
    assert x.unique().numel() == x.numel(), f"{name}: worlds share a draw"


def test_domain_randomization_draws_each_world_a_model_and_redraws_only_reset_worlds():
    """Every randomized quantity differs between worlds and lies in its DOMAIN_RAND range; the subtree masses follow
    the masses; a reset of two worlds draws theirs anew and leaves the others' fields bit for bit."""
    torch.manual_seed(0)
    n = 12
    env = make_env(n)  # the defaults: --domain-rand
    env.reset()
    field, nom, r, trunk = env.sim.model, env.sim.nominal, loco.DOMAIN_RAND, env.trunk
    friction = field["geom_friction"][:, env.foot_geoms, 0]
    assert (friction == friction[:, :1]).all(), "the four feet share one friction"
    within(friction[:, 0], r["foot_friction"], "foot friction")
    scale = field["body_inertia"][:, 1:, 0] / nom["body_inertia"][1:, 0]  # each body's mass and inertia scale
    within(scale[:, 0], r["link_mass_scale"], "mass scale")
    torch.testing.assert_close(field["body_inertia"][:, 1:], nom["body_inertia"][1:] * scale[..., None])
    torch.testing.assert_close(field["body_mass"][:, 2:], nom["body_mass"][2:] * scale[:, 1:])
    within(field["body_mass"][:, trunk] - nom["body_mass"][trunk] * scale[:, 0], r["trunk_added_mass"], "payload")
    offset = field["body_ipos"][:, trunk] - nom["body_ipos"][trunk]
    within(offset[:, 0], r["trunk_com_xy"], "com x")
    within(offset[:, 2], r["trunk_com_z"], "com z")
    assert torch.equal(field["body_ipos"][:, trunk + 1 :], nom["body_ipos"][trunk + 1 :].expand(n, -1, -1))
    kp = field["actuator_gainprm"][..., 0] / nom["actuator_gainprm"][:, 0]
    within(kp[:, 0], r["kp_scale"], "kp")
    assert torch.equal(field["actuator_biasprm"][..., 1], -field["actuator_gainprm"][..., 0])
    within(field["actuator_biasprm"][:, 0, 2] / nom["actuator_biasprm"][0, 2], r["kd_scale"], "kd")
    within(field["dof_frictionloss"][:, 6] / nom["dof_frictionloss"][6], r["joint_friction_scale"], "frictionloss")
    within(field["dof_armature"][:, 6] / nom["dof_armature"][6], r["armature_scale"], "armature")
    torch.testing.assert_close(field["body_subtreemass"][:, 0], field["body_mass"].sum(dim=1))
    torch.testing.assert_close(field["body_subtreemass"][:, trunk], field["body_mass"][:, trunk:].sum(dim=1))

    before = {k: v.clone() for k, v in field.items()}
    mask = torch.zeros(n, dtype=torch.bool)
    mask[[2, 5]] = True
    env.reset(mask)
    for k, v in field.items():
        assert torch.equal(v[~mask], before[k][~mask]), f"{k} changed in worlds that were not reset"
        assert (v[mask] != before[k][mask]).flatten(1).any(dim=1).all(), f"{k} not redrawn in a reset world"
    assert make_env(2, domain_rand=False).sim.model == {}, "--no-domain-rand: the compiled model, shared"


def test_randomized_pushed_noisy_delayed_environment_resumes_bit_for_bit():
    """state_dict() of an environment with everything on (randomized models, pushes every 3 steps, noise, delay,
    heading commands, short episodes so that worlds reset and redraw) loaded into a fresh one: the same observations,
    rewards and models step for step."""
    overrides = dict(episode_length_s=0.2, push_interval_s=0.06, action_delay=True, heading_command=True)
    actions = torch.randn(16, 6, 12, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    a = make_env(6, **overrides)
    obs = a.reset()
    a.desynchronize()
    for t in range(5):
        obs = a.step(actions[t])[0]
    state, rng = a.state_dict(), torch.get_rng_state()
    straight = [a.step(actions[t])[:2] for t in range(5, 16)]
    b = make_env(6, **overrides)
    torch.set_rng_state(rng)
    assert torch.equal(b.load_state_dict(state), obs), "the observations the policy acted on, noise included"
    for t in range(5, 16):
        got = b.step(actions[t])[:2]
        for x, y in zip(got, straight[t - 5]):
            assert torch.equal(x, y), f"step {t}"
    for k, v in a.sim.model.items():
        assert torch.equal(v, b.sim.model[k]), k
    assert a.stats["episodes"].sum() > 0, "no episode ended: resets (and their redraws) were not exercised"


def test_a_push_changes_only_the_pushed_worlds_velocity():
    """Twin environments, one pushing every 5 steps: after one step in which worlds 1 and 3 are due (their episodes
    have run 5 and 10 steps), only their trunk velocities differ, and a push itself sets the horizontal velocity of
    the due worlds to draws within +-push_vel and nothing else."""
    n, vel = 5, 0.7
    twins = []
    for push_s in (0.1, 0.0):
        torch.manual_seed(2)
        env = make_env(n, push_interval_s=push_s, push_vel=vel, obs_noise=False)
        env.reset()
        env.episode_length.copy_(torch.tensor([3, 5, 7, 10, 0]))
        twins.append(env)
    pushed, plain = twins
    due = torch.tensor([False, True, False, True, False])
    for env in twins:
        env.step(torch.zeros(n, 12))
    assert torch.equal(pushed.sim.qvel[~due], plain.sim.qvel[~due]), "a world that was not due moved otherwise"
    assert torch.equal(pushed.sim.qpos[~due], plain.sim.qpos[~due])
    assert ((pushed.sim.qvel[due, :2] - plain.sim.qvel[due, :2]).abs() > 1e-3).all(), "the due worlds were not pushed"

    pushed.episode_length.copy_(torch.tensor([5, 5, 4, 15, 0]))
    due = torch.tensor([True, True, False, True, False])
    qpos, qvel = pushed.sim.qpos.clone(), pushed.sim.qvel.clone()
    pushed._push_robots()
    assert torch.equal(pushed.sim.qpos, qpos) and torch.equal(pushed.sim.qvel[~due], qvel[~due])
    assert torch.equal(pushed.sim.qvel[due, 2:], qvel[due, 2:]), "only the horizontal velocity is set"
    kicks = pushed.sim.qvel[due, :2]
    assert (kicks.abs() <= vel).all() and (kicks != qvel[due, :2]).all()


def test_observation_noise_has_the_configured_scales():
    """4096 draws per observation: uniform within +-OBS_NOISE of its group (max, and the standard deviation
    s / sqrt(3) within 5%: its standard error is 0.7%), zero for commands and actions; the environment returns its
    observation plus the noise it keeps."""
    torch.manual_seed(4)
    env = make_env(8)
    draws = torch.cat([env._add_obs_noise(torch.zeros(8, env.num_obs)) for _ in range(512)])
    sizes = {name: 12 if n == "nu" else n for name, n, *_ in loco.OBSERVATION}
    start = 0
    for group, size in sizes.items():
        block, scale = draws[:, start : start + size], loco.OBS_NOISE[group]
        start += size
        if scale == 0:
            assert (block == 0).all(), group
            continue
        assert block.abs().max() <= scale
        torch.testing.assert_close(block.std(dim=0), torch.full((size,), scale / math.sqrt(3)), rtol=0.05, atol=0)
        assert block.mean(dim=0).abs().max() < 5 * scale / math.sqrt(3 * len(block)), group
    obs = env.reset()
    assert torch.equal(obs, env._observe() + env.obs_noise) and env.obs_noise.abs().sum() > 0
    quiet = make_env(2, obs_noise=False)
    assert torch.equal(quiet.reset(), quiet._observe())


@pytest.mark.parametrize("delay", [False, True])
def test_action_delay_applies_the_previous_action(delay):
    env = make_env(2, action_delay=delay, domain_rand=False, push_interval_s=0.0, obs_noise=False)
    env.reset()
    home, scale = env.default_dof_pos.expand(2, -1), env.cfg.action_scale
    a1, a2 = torch.full((2, 12), 0.2), torch.full((2, 12), -0.3)
    env.step(a1)
    first = env.sim.ctrl.clone()
    env.step(a2)
    second = env.sim.ctrl.clone()
    if delay:  # an episode starts with a zero action pending
        torch.testing.assert_close(first, home)
        torch.testing.assert_close(second, home + scale * a1)
    else:
        torch.testing.assert_close(first, home + scale * a1)
        torch.testing.assert_close(second, home + scale * a2)
    env.reset(torch.tensor([True, False]))
    env.step(a2)
    want = torch.stack([home[0], home[1] + scale * a2[1]]) if delay else home + scale * a2
    torch.testing.assert_close(env.sim.ctrl, want)


def test_nominal_and_randomized_evaluations_see_the_same_starts_and_commands():
    """The optional parts draw their random numbers whether on or off, so that evaluate()'s two conditions (and any
    two configurations) get the same initial states and the same command at every step: their difference is the
    models, pushes and noise, not the sample."""
    cpu = torch.device("cpu")
    runs = []
    for on in (False, True):
        extra = {} if on else dict(domain_rand=False, push_interval_s=0.0, obs_noise=False)
        cfg = dataclasses.replace(loco.Go1Config.from_args(loco.Args(push_interval_s=0.1)), **extra)
        with ec.separate_rng(123, cpu), torch.no_grad():
            env = loco.Go1Env(8, cpu, dataclasses.replace(cfg, command_resample_s=0.1))
            env.reset()
            start, commands = env.sim.qpos.clone(), []
            for _ in range(12):
                env.step(torch.zeros(8, env.num_actions))
                commands.append(env.commands.clone())
        runs.append((start, torch.stack(commands)))
    (start_n, commands_n), (start_r, commands_r) = runs
    assert torch.equal(start_n, start_r), "different initial states"
    assert torch.equal(commands_n, commands_r), "different commands"
    assert commands_n.std(dim=0).max() > 0, "the commands were never resampled: the test would show nothing"
