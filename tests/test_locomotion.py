"""ppo_isaac_locomotion.py as a user runs it (subprocesses on the CPU, tiny sizes), and its pieces against
references: GAE against a plain NumPy loop, the normalizer against NumPy's statistics, every reward term on
hand-built states, the exported policy against the script's own."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mujoco
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "ppo_isaac_locomotion.py"
TINY = [
    "--device",
    "cpu",
    "--num-envs",
    "4",
    "--num-steps",
    "8",
    "--num-minibatches",
    "2",
    "--update-epochs",
    "1",
    "--eval-interval",
    "0",
    "--episode-length-s",
    "1.0",
]


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
    out = run([*TINY, "--num-iterations", "2", *video, "--track", "--save-interval", "1"], cwd)
    assert out.returncode == 0, out.stdout + out.stderr
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


def test_export_matches_the_scripts_own_policy(trained_run):
    cwd, run_dir, _ = trained_run
    ckpt_path = run_dir / "checkpoints" / "latest.pt"
    out = run(["--device", "cpu", "--export", "--checkpoint", str(ckpt_path)], cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    ckpt = torch.load(ckpt_path, weights_only=False)
    agent = loco.ActorCritic(ckpt["obs_dim"], ckpt["act_dim"])
    agent.load_state_dict(ckpt["model"])
    normalizer = loco.ObservationNormalizer(ckpt["obs_dim"])
    normalizer.load_state_dict(ckpt["normalizer"])
    obs = torch.randn(64, ckpt["obs_dim"]) * 2
    with torch.no_grad():
        expected = agent.act_deterministic(normalizer(obs))
    scripted = torch.jit.load(str(run_dir / "export" / "policy.pt"))
    torch.testing.assert_close(scripted(obs), expected)
    import onnxruntime as ort

    session = ort.InferenceSession(str(run_dir / "export" / "policy.onnx"))
    np.testing.assert_allclose(session.run(None, {"obs": obs.numpy()})[0], expected.numpy(), atol=1e-5)


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
        rewards.append(env._reward_feet_air_time())
    assert all(r[0] == 0 for r in rewards[:-1])
    # Air time counts from the second airborne step (the first is OR-ed with the previous contact, a flicker
    # filter) up to and including the touchdown step: 0.6 s in all, so the reward is 0.6 - 0.5.
    assert rewards[-1][0].item() == pytest.approx(0.6 - 0.5, abs=1e-5)
    assert rewards[-1][1].item() == 0.0, "no air-time reward when told to stand still"


def test_reward_table_has_a_function_per_term():
    for name in loco.REWARD_SCALES:
        assert callable(getattr(loco.Go1Env, f"_reward_{name}")), name


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
    short episodes so that worlds reset and redraw) loaded into a fresh one: the same observations, rewards and
    models step for step."""
    overrides = dict(episode_length_s=0.2, push_interval_s=0.06, action_delay=True)
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
    sizes = {"lin_vel": 3, "ang_vel": 3, "gravity": 3, "commands": 3, "dof_pos": 12, "dof_vel": 12, "actions": 12}
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
