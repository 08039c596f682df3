"""ppo_isaac_reach.py as a user runs it (subprocesses on the CPU, tiny sizes, every control type), a real learning
test, and its pieces against references: the action mappings on hand-built actions, every reward term and the
target bookkeeping on hand-built states, GAE against a plain NumPy loop, the normalizer against NumPy's statistics,
the exported policy against the script's own."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import mujoco
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "ppo_isaac_reach.py"
TINY = ["--device", "cpu", "--num-envs", "4", "--num-steps", "8", "--num-minibatches", "2", "--update-epochs", "1",
        "--eval-interval", "0", "--episode-length-s", "0.2"]


def load_script():
    spec = importlib.util.spec_from_file_location("ppo_isaac_reach", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolves the Args annotations through it
    spec.loader.exec_module(module)
    return module


reach = load_script()


def run(args, cwd, env=None, timeout=600):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Two iterations of the default control (position_delta) with video and W&B (offline), as a user would."""
    cwd = tmp_path_factory.mktemp("reach")
    out = run([*TINY, "--num-iterations", "2", "--capture-video", "--video-interval", "2", "--video-length", "5",
               "--track", "--save-interval", "1"], cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    (run_dir,) = (cwd / "runs").iterdir()
    return cwd, run_dir, out.stdout


# ---------------------------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------------------------
def test_end_to_end_writes_logs_checkpoints_and_video(trained_run):
    cwd, run_dir, stdout = trained_run
    assert "iter     2/2" in stdout and "SPS" in stdout and "success" in stdout and "position_delta" in stdout
    assert list(run_dir.glob("events.out.tfevents.*")), "no TensorBoard events"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["ckpt_000001.pt", "ckpt_000002.pt", "latest.pt"]
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)
    assert ckpt["script"] == "ppo_isaac_reach" and ckpt["iteration"] == 2 and ckpt["args"]["control_type"] == \
        "position_delta"
    assert (ckpt["obs_dim"], ckpt["act_dim"]) == (30, 7) and set(ckpt["rng"]) >= {"python", "numpy", "torch"}
    video = run_dir / "videos" / "iter_000002.mp4"
    assert video.stat().st_size > 1000
    log = json.loads(video.with_suffix(".json").read_text())
    assert len(log) == 5 and len(log[0]["target"]) == 3 and len(log[0]["ee"]) == 3
    assert list((cwd / "wandb").glob("offline-run-*")), "--track with WANDB_MODE=offline wrote no run"
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["iteration"] == 2 and summary["global_step"] == 2 * 4 * 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = set(EventAccumulator(str(run_dir)).Reload().Tags()["scalars"])
    for tag in ["charts/SPS", "charts/learning_rate", "charts/action_std", "charts/episodic_return",
                "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
                "losses/explained_variance", "perf/rollout_time", "perf/update_time",
                "metrics/mean_distance", *[f"rewards/{n}" for n in reach.REWARD_SCALES]]:
        assert tag in tags, tag


@pytest.mark.parametrize("control_type", ["torque", "position"])
def test_end_to_end_other_control_types(tmp_path, control_type):
    out = run([*TINY, "--num-iterations", "2", "--control-type", control_type, "--eval-interval", "2",
               "--eval-steps", "30"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{control_type} control" in out.stdout and "iter     2/2" in out.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)
    assert ckpt["args"]["control_type"] == control_type
    summary = json.loads((run_dir / "metrics.json").read_text())
    for ev in (summary["initial_eval"], summary["final_eval"]):
        assert 0.0 <= ev["success_rate"] <= 1.0 and math.isfinite(ev["mean_distance"])


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


def test_eval_prints_the_task_metrics(trained_run):
    cwd, run_dir, _ = trained_run
    out = run(["--device", "cpu", "--num-envs", "4", "--eval-steps", "60", "--target-timeout-s", "0.5",
               "--eval", "--checkpoint", str(run_dir / "checkpoints" / "latest.pt")], cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    metrics = json.loads((run_dir / "eval.json").read_text())
    for key in ("success_rate", "final_distance", "time_to_reach", "mean_distance"):
        assert key in out.stdout and key in metrics
    assert 0.0 <= metrics["success_rate"] <= 1.0 and metrics["targets"] >= 4
    assert 0.0 < metrics["final_distance"] < 2.0 and metrics["control_type"] == "position_delta"


def test_export_matches_the_scripts_own_policy(trained_run):
    cwd, run_dir, _ = trained_run
    ckpt_path = run_dir / "checkpoints" / "latest.pt"
    out = run(["--device", "cpu", "--export", "--checkpoint", str(ckpt_path)], cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    ckpt = torch.load(ckpt_path, weights_only=False)
    agent = reach.ActorCritic(reach.ReachEnv.num_obs, reach.ReachEnv.num_actions)
    agent.load_state_dict(ckpt["model"])
    normalizer = reach.ObservationNormalizer(reach.ReachEnv.num_obs)
    normalizer.load_state_dict(ckpt["normalizer"])
    obs = torch.randn(64, reach.ReachEnv.num_obs) * 2
    with torch.no_grad():
        expected = agent.act_deterministic(normalizer(obs)).clamp(-1.0, 1.0)  # the env clamps actions so
    scripted = torch.jit.load(str(run_dir / "export" / "policy.pt"))
    torch.testing.assert_close(scripted(obs), expected)
    import onnxruntime as ort
    session = ort.InferenceSession(str(run_dir / "export" / "policy.onnx"))
    np.testing.assert_allclose(session.run(None, {"obs": obs.numpy()})[0], expected.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# A real learning test
# ---------------------------------------------------------------------------------------------------------------
LEARN = ["--device", "cpu", "--num-envs", "128", "--num-iterations", "25", "--eval-interval", "25",
         "--eval-envs", "128", "--eval-steps", "250", "--save-interval", "1000"]
LEARN_WALL_LIMIT_S = 150


def test_ppo_learns_to_reach(tmp_path):
    """position_delta control, 128 environments x 25 iterations x 24 steps (77k environment steps) on the CPU.

    Bound: the whole subprocess (start-up, kernels already cached, two evaluations, training) takes under
    LEARN_WALL_LIMIT_S = 150 s on a 2-core machine; measured about 26 s, of which 13 s of training. Bar: the deterministic policy's mean final distance to its targets (at a reach or a
    time-out) falls to under half of the untrained policy's, both measured by the script's own evaluation on the
    same fresh targets. The untrained policy outputs ~0, so the arm holds still: its figure is the distance from
    the home pose to the targets. Broken PPO (e.g. the policy loss's sign flipped) or rewards fail this.
    """
    t0 = time.time()
    out = run(LEARN, tmp_path, timeout=LEARN_WALL_LIMIT_S)
    wall = time.time() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "metrics.json").read_text())
    before, after = summary["initial_eval"]["final_distance"], summary["final_eval"]["final_distance"]
    print(f"untrained final distance {before:.4f} m, trained {after:.4f} m, "
          f"success {summary['final_eval']['success_rate']:.3f}, wall {wall:.1f} s")
    assert after < 0.5 * before, out.stdout
    assert wall < LEARN_WALL_LIMIT_S, f"the learning test took {wall:.0f} s, over its {LEARN_WALL_LIMIT_S} s bound"


# ---------------------------------------------------------------------------------------------------------------
# Action mappings on hand-built actions
# ---------------------------------------------------------------------------------------------------------------
LOWER = torch.tensor([-2.9, -1.76, -2.9, -3.07, -2.9, -0.0175, -2.9])
UPPER = torch.tensor([2.9, 1.76, 2.9, -0.07, 2.9, 3.75, 2.9])
TORQUE = torch.tensor([87.0, 87, 87, 87, 12, 12, 12])
# Franka Control Interface documentation, "Robot and interface specifications", Limits for Panda: joint speed limits
# (rad/s) and torque rate limit (N m/s).
FRANKA_SPEED_LIMITS = (2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61)
FRANKA_TORQUE_RATE_LIMITS = (1000.0,) * 7
FRANKA_SPEED_LIMIT = torch.tensor(FRANKA_SPEED_LIMITS)
FRANKA_TORQUE_RATE_LIMIT = torch.tensor(FRANKA_TORQUE_RATE_LIMITS)
KP = torch.tensor([600.0, 600, 600, 600, 250, 150, 50])  # panda.xml's servos (franka_ros's joint impedance example)
KV = torch.tensor([50.0, 50, 50, 50, 30, 25, 15])
DT = 0.02
MAX_STEP = reach.SPEED_FRACTION * FRANKA_SPEED_LIMIT * DT  # rad per policy step: 0.0261 (joints 1-4), 0.0313 (5-7)
MAX_LEAD = reach.SPEED_FRACTION * FRANKA_SPEED_LIMIT * KV / KP  # rad: 0.109 (1-4), 0.188, 0.261, 0.783 (5-7)
MID = (LOWER + UPPER) / 2


def handler(control_type, max_delta=1.0):
    return reach.ActionHandler(control_type, LOWER, UPPER, TORQUE, max_delta, FRANKA_SPEED_LIMIT, KP, KV, DT,
                               FRANKA_TORQUE_RATE_LIMIT)


def test_asset_holds_the_published_speed_and_torque_rate_limits():
    mjm = reach.ec.load_model(reach.ASSET)
    np.testing.assert_array_equal(reach.model_numeric(mjm, reach.SPEED_LIMIT_FIELD, 7), FRANKA_SPEED_LIMITS)
    np.testing.assert_array_equal(reach.model_numeric(mjm, reach.TORQUE_RATE_FIELD, 7), FRANKA_TORQUE_RATE_LIMITS)
    with pytest.raises(reach.UserError, match="joint_speed_limit"):
        reach.model_numeric(mjm, reach.SPEED_LIMIT_FIELD, 6)
    with pytest.raises(reach.UserError, match="no_such_field"):
        reach.model_numeric(mjm, "no_such_field", 7)


def test_torque_mapping_scales_to_each_joints_limit_at_the_torque_rate_limit():
    h = handler("torque")
    actions = torch.tensor([[1.0, -1.0, 0.5, 0.0, 1.0, -0.5, 3.0],
                            [-7.0, 2.0, -1.0, 1.0, -1.0, 0.25, -1.0]])
    goal = torch.tensor([[87.0, -87.0, 43.5, 0.0, 12.0, -6.0, 12.0],
                         [-87.0, 87.0, -87.0, 87.0, -12.0, 3.0, -12.0]])
    # From zero torque, each torque moves toward action x limit by at most 1000 N m/s x 0.02 s = 20 N m per step.
    ctrl = h(actions, torch.zeros(2, 7), None)
    torch.testing.assert_close(ctrl, goal.clamp(-20.0, 20.0))
    for _ in range(4):
        ctrl = h(actions, ctrl, None)
    torch.testing.assert_close(ctrl, goal)  # 87 N m after 5 steps (5 x 20 >= 87)
    assert (ctrl.abs() <= TORQUE).all(), "a torque beyond its joint's limit"
    torch.testing.assert_close(h(-actions, goal, None), goal + (-2 * goal).clamp(-20.0, 20.0))  # reversal


def test_position_mapping_moves_toward_its_goal_at_the_speed_limit():
    h = handler("position")
    mid = MID[None]
    # The goal spans each joint's range; the target moves toward it by at most max_step per policy step.
    torch.testing.assert_close(h(-torch.ones(1, 7), mid, mid), mid - MAX_STEP)
    torch.testing.assert_close(h(torch.ones(1, 7), mid, mid), mid + MAX_STEP)
    torch.testing.assert_close(h(torch.zeros(1, 7), mid, mid), mid)  # the goal is the middle: stay
    near = mid + torch.tensor([[0.01, -0.01, 0.0, 0.02, -0.02, 0.005, 0.0]])  # goal within one step: reach it
    torch.testing.assert_close(h(torch.zeros(1, 7), near, near), mid)
    # A joint that follows its target reaches any goal exactly, e.g. three quarters of the range.
    t = mid.clone()
    for _ in range(300):  # 300 x 0.026 rad > the widest range (5.8 rad)
        t = h(torch.full((1, 7), 0.5), t, t)
    torch.testing.assert_close(t[0], LOWER + 0.75 * (UPPER - LOWER))
    wild = h(torch.randn(100, 7) * 10, mid.expand(100, 7), mid.expand(100, 7))
    assert ((wild >= LOWER) & (wild <= UPPER)).all(), "a target outside its joint's range"


def test_position_delta_moves_the_previous_target_and_clamps_to_the_range():
    h = handler("position_delta", max_delta=0.5)
    targets = MID[None]
    actions = torch.tensor([[1.0, -1.0, 0.5, 0.0, -0.25, 5.0, -5.0]])  # beyond +-1: clamped to one step
    steps = torch.tensor([[1.0, -1.0, 0.5, 0.0, -0.25, 1.0, -1.0]]) * 0.5 * MAX_STEP
    torch.testing.assert_close(h(actions, targets, targets), targets + steps)
    # Near a limit the target stops at the limit, whichever way and however long it is pushed.
    near = torch.stack([UPPER - 0.01, LOWER + 0.01])
    pushed = h(torch.stack([torch.ones(7), -torch.ones(7)]), near, near)
    torch.testing.assert_close(pushed, torch.stack([UPPER, LOWER]))
    t = MID[None].clone()
    for _ in range(600):
        t = h(torch.ones(1, 7), t, t)
    torch.testing.assert_close(t[0], UPPER)
    assert torch.equal(h(torch.zeros(3, 7), near[:1].expand(3, 7), near[:1].expand(3, 7)), near[:1].expand(3, 7)), \
        "zero action holds"


@pytest.mark.parametrize("control_type", ["position", "position_delta"])
def test_position_targets_never_lead_their_joint_by_more_than_the_servo_needs(control_type):
    """A joint that does not follow (blocked, or pushed back by the other joints): its target stops max_lead away,
    where the servo's force kp * max_lead equals kv x SPEED_FRACTION x the speed limit; a target left further away
    (a joint thrown past it) is pulled back to max_lead."""
    h = handler(control_type)
    q = MID[None]
    t = q.clone()
    for _ in range(50):
        t = h(torch.ones(1, 7), t, q)
    torch.testing.assert_close(t, q + MAX_LEAD)
    torch.testing.assert_close(KP * MAX_LEAD, KV * reach.SPEED_FRACTION * FRANKA_SPEED_LIMIT)
    far = q - 1.0
    torch.testing.assert_close(h(torch.zeros(1, 7), far, q), torch.maximum(q - MAX_LEAD, LOWER[None]))


def test_torque_mode_makes_the_actuators_motors_with_a_torque_speed_line():
    mjm = reach.ec.load_model(reach.ASSET)
    forcerange = mjm.actuator_forcerange.copy()
    no_load_speed = reach.SPEED_FRACTION * np.array(FRANKA_SPEED_LIMITS)
    reach.make_torque_actuators(mjm, no_load_speed)
    data = mujoco.MjData(mjm)
    data.qpos[:] = mjm.key_qpos[0]
    data.qvel[:] = np.array([0.3, -0.3, 0.3, 1.0, -0.3, 2.0, 0.3])  # no -kp * q; a speed-proportional term instead
    data.ctrl[:] = forcerange[:, 1] * np.array([1.0, -0.5, 0.25, 0.0, -1.0, 0.5, 2.0])  # the last beyond its limit
    mujoco.mj_forward(mjm, data)
    ctrl = np.clip(data.ctrl, forcerange[:, 0], forcerange[:, 1])
    expected = np.clip(ctrl - forcerange[:, 1] / no_load_speed * data.qvel, forcerange[:, 0], forcerange[:, 1])
    np.testing.assert_allclose(data.actuator_force, expected, atol=1e-9)
    # Full torque at rest, none left at the no-load speed (joint 6 at 2.0 rad/s > 1.57: braking).
    assert expected[5] < 0 < data.ctrl[5]


# ---------------------------------------------------------------------------------------------------------------
# Joint speeds against the published limits, measured at every physics step of the real environment
# ---------------------------------------------------------------------------------------------------------------
BANG_BANG_PERIODS = (1, 2, 4, 8, 20, 40)  # policy steps between sign flips of saturated actions


@pytest.mark.parametrize("control_type", reach.CONTROL_TYPES)
def test_joint_speeds_stay_within_the_published_limits(control_type):
    """ReachEnv driven for 300 policy steps (6 s, one episode reset included) by uniform random actions, by
    constant saturated actions (+-1, a random sign per joint) and by saturated bang-bang actions flipping every 1 to 40
    steps (random phase per joint), 16 environments each. After every physics sub-step (200 Hz) every joint speed is
    within Franka's published limit (FRANKA_SPEED_LIMIT). No tolerance on the limit itself: the margin is in the design
    (no actuator drives a joint faster than SPEED_FRACTION = 0.6 of its limit; the other joints' motion adds the
    rest; measured peaks, 4 seeds x 600 steps: 0.71-0.74 of the limits with the position modes, 0.88-0.90 with
    torque control). The old mappings reached 2.4 (position_delta), 22 (position) and 48 (torque) times the limits
    here. The saturated actions must drive some joint past half its limit, so the test cannot pass by an arm that does
    not move."""
    per, steps = 16, 300
    n = per * (2 + len(BANG_BANG_PERIODS))
    torch.manual_seed(0)
    env = reach.ReachEnv(n, torch.device("cpu"), reach.Args(control_type=control_type))
    sim, nu = env.sim, env.sim.mjm.nu
    # One physics step per sim.step() call (set before the first step records its graph), called decimation times.
    substeps, sim.decimation, one_substep = sim.decimation, 1, sim.step
    peak = torch.zeros(n, nu)

    def every_substep():
        for _ in range(substeps):
            one_substep()
            torch.maximum(peak, sim.qvel.abs(), out=peak)

    sim.step = every_substep
    env.reset()
    sign = torch.where(torch.rand(n, nu) < 0.5, -1.0, 1.0)
    period = torch.tensor([0, 0] + list(BANG_BANG_PERIODS)).repeat_interleave(per)[:, None]
    phase = torch.randint(0, 1000, (n, nu))
    for t in range(steps):
        flips = torch.div(t + phase, period.clamp(min=1), rounding_mode="floor") % 2
        actions = torch.where(period > 0, sign * (1 - 2 * flips), sign)
        actions[:per] = torch.rand(per, nu) * 2 - 1
        env.step(actions)
    ratio = peak / FRANKA_SPEED_LIMIT
    groups = ["random", "saturated"] + [f"bang-bang {k}" for k in BANG_BANG_PERIODS]
    for g, name in enumerate(groups):
        print(f"{control_type} {name:13s} peak |qvel| / limit per joint: "
              + " ".join(f"{x:.3f}" for x in ratio[g * per:(g + 1) * per].max(0).values.tolist()))
    assert torch.isfinite(peak).all()
    assert ratio.max() <= 1.0, f"{control_type}: a joint reached {ratio.max():.3f} x its speed limit"
    assert ratio[per:].max() > 0.5, f"{control_type}: saturated actions hardly moved the arm"


# ---------------------------------------------------------------------------------------------------------------
# The environment on hand-built states: reward terms, target bookkeeping, observations
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env():
    return reach.ReachEnv(2, torch.device("cpu"), reach.Args())


def test_reward_terms(env):
    env.distance = torch.tensor([0.3, 0.0])
    env.reached = torch.tensor([False, True])
    torch.testing.assert_close(env._reward_distance(), torch.tensor([0.3, 0.0]))
    torch.testing.assert_close(env._reward_distance_fine(), torch.tensor([math.exp(-0.3 / reach.FINE_SIGMA), 1.0]))
    assert env._reward_success().tolist() == [0.0, 1.0]
    env.actions = torch.full((2, 7), 0.5)
    env.last_actions[:] = torch.tensor([[0.25] * 7, [0.5] * 7])
    torch.testing.assert_close(env._reward_action_rate(), torch.tensor([7 * 0.0625, 0.0]))
    env.sim.qvel[:] = torch.tensor([[2.0] * 7, [0.0] * 6 + [-1.0]])
    torch.testing.assert_close(env._reward_joint_vel(), torch.tensor([28.0, 1.0]))


def test_reward_table_has_a_function_per_term():
    for name in reach.REWARD_SCALES:
        assert callable(getattr(reach.ReachEnv, f"_reward_{name}")), name


def test_targets_are_reachable_samples_and_resampled_on_success(env):
    obs = env.reset()
    assert obs.shape == (2, reach.ReachEnv.num_obs) and torch.isfinite(obs).all()
    lo, hi = torch.tensor(reach.TARGET_LOW), torch.tensor(reach.TARGET_HIGH)
    assert ((env.target >= lo) & (env.target <= hi)).all()
    # The observation's pieces: scaled joints in [-1, 1], end-effector, target, and the vector between them.
    assert (obs[:, 0:7].abs() <= 1.0).all()
    torch.testing.assert_close(obs[:, 17:20], env.target)
    torch.testing.assert_close(obs[:, 20:23], obs[:, 17:20] - obs[:, 14:17])
    env.pop_stats()
    # Put env 0's target on its end-effector (it holds still under zero action): reached at once, then replaced.
    env.target[0] = env.ee_pos[0]
    env.target[1] = env.ee_pos[1] + torch.tensor([0.0, 0.0, 0.3])
    old = env.target.clone()
    _, reward, terminated, truncated, _ = env.step(torch.zeros(2, 7))
    assert env.reached.tolist() == [True, False] and not terminated.any() and not truncated.any()
    assert not torch.equal(env.target[0], old[0]) and torch.equal(env.target[1], old[1])
    assert reward[0] > reward[1] + 0.9 * reach.REWARD_SCALES["success"]
    stats = env.pop_stats()
    assert stats["targets"] == 1 and stats["success_rate"] == 1.0 and stats["time_to_reach"] == pytest.approx(env.dt)
    # Env 1 never gets there: after target_timeout_s its target is counted as missed and replaced.
    for _ in range(env.target_steps - 1):
        env.target[1] = old[1]
        env.step(torch.zeros(2, 7))
    stats = env.pop_stats()
    # Only env 1's target ended (env 0's second one is still running): missed, 0.3 m away.
    assert stats["targets"] == 1 and stats["success_rate"] == 0.0
    assert stats["final_distance"] == pytest.approx(0.3, abs=1e-3)
    assert not torch.equal(env.target[1], old[1]) and env.target_time[1] == 0


def test_episodes_have_a_fixed_length_and_end_in_a_time_out():
    args = reach.Args(episode_length_s=0.2)
    e = reach.ReachEnv(3, torch.device("cpu"), args)
    e.reset()
    steps = e.max_episode_length
    for k in range(steps):
        _, _, terminated, truncated, _ = e.step(torch.rand(3, 7) * 2 - 1)
        assert not terminated.any()
        assert truncated.all() == (k == steps - 1) and truncated.any() == (k == steps - 1)
    assert (e.episode_length == 0).all(), "the reset happened inside step"
    assert (e.sim.qpos - e.sim.default_qpos).abs().max() <= args.reset_noise + 1e-6




@pytest.mark.parametrize("reset_noise", [0.2, 3.0])
def test_resets_stay_inside_the_joint_ranges(reset_noise):
    """4096 environments reset twice, with the default noise and with one that reaches past every limit (which the
    reset clamps): every joint starts inside its range, MuJoCo's compiled jnt_range, at rest."""
    torch.manual_seed(1)
    env = reach.ReachEnv(4096, torch.device("cpu"), reach.Args(reset_noise=reset_noise))
    lower, upper = torch.tensor(env.sim.mjm.jnt_range, dtype=torch.float32).T
    for _ in range(2):
        env.reset()
        q = env.sim.qpos
        assert ((q >= lower) & (q <= upper)).all(), f"{((q < lower) | (q > upper)).sum()} joints outside their range"
        assert (env.sim.qvel == 0).all()
        if reset_noise > 1:
            assert (q == lower).any() and (q == upper).any(), "the large noise did not reach the limits"
