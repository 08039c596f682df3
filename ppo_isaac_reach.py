"""PPO that teaches a 7-joint Franka Panda arm to hold its end-effector on any target, thousands of arms at once.

    python ppo_isaac_reach.py --num-envs 4096 --track
    python ppo_isaac_reach.py --control-type position      # or torque; position_delta is the default

As in Isaac Gym, everything stays on the device: the policy's actions become torques, joint targets or target
increments in the simulator's ctrl tensor (MuJoCo Warp, zero-copy), four 200 Hz physics steps run, and
observations, rewards and resets are computed in torch straight from the simulator's state tensors.

Read top to bottom: Args; the task (ActionHandler, ReachEnv, one function per reward term, the scale table); the
observation normalizer; ActorCritic; PPO's pieces (rollout step, GAE, loss); main(), the training loop; then
evaluation, video and export. Plumbing that is not the lesson (simulation, checkpoints, loggers, export, video) is in
envs_common.py.
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # wall-clock figures count from the script's first line, imports included

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import envs_common as ec
from envs_common import UserError

SCRIPT = Path(__file__).stem
MAX_TIME_S = 86_400.0  # s: the longest episode or hold accepted (step counts stay machine integers)
POLICY_DT = 0.02  # s: a 50 Hz policy over panda.xml's 200 Hz physics (Isaac Lab's reach: 60 Hz; legged_gym: 50 Hz)
CONTROL_TYPES = ("torque", "position", "position_delta")


@dataclass
class Args:
    exp_name: str = SCRIPT
    """the name of this experiment (the first part of the run's folder name)"""
    seed: int = 1
    """seed of Python, NumPy and torch"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    device: str = "auto"
    """'auto' (the first GPU if there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'"""
    track: bool = False
    """if toggled, this experiment is tracked with Weights and Biases"""
    wandb_project_name: str = "isaac-ppo"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the entity (team) of the wandb project"""
    capture_video: bool = False
    """if toggled, render an mp4 of one environment every `video_interval` iterations (in runs/<run>/videos)"""
    video_interval: int = 100
    """iterations between two videos"""
    video_length: int = 250
    """policy steps (50 per second) in one video"""
    save_interval: int = 50
    """iterations between two checkpoints (one is always written at the end)"""
    checkpoint: str | None = None
    """a checkpoint to resume training from (its arguments are adopted), or the policy for --eval or --export"""
    eval: bool = False
    """play the deterministic policy of --checkpoint on fresh targets and print its metrics; no training"""
    export: bool = False
    """write the policy of --checkpoint (normalizer folded in) as TorchScript and ONNX, with its contract"""
    tf32: bool = True
    """on a GPU, let float32 matrix products use TF32 tensor cores"""
    compile: bool = True
    """on a GPU, torch.compile the rollout step and the loss (slower start, faster iterations)"""
    bf16: bool = True
    """on a GPU, run the hidden layers of actor and critic in bfloat16 (float32 outputs, losses and Adam)"""
    cudagraphs: bool = True
    """on a GPU, record the rollout step and the minibatch update as CUDA graphs and replay them"""

    # Sizes
    num_envs: int | None = None
    """number of parallel environments (default: 4096 on a GPU, 256 on the CPU)"""
    num_iterations: int | None = None
    """number of PPO iterations of num_envs * num_steps steps each (default: 300 on a GPU, 60 on the CPU)"""
    num_steps: int = 24
    """steps per environment per iteration (the rollout's length)"""

    # PPO (rsl_rl's values, as the locomotion script; they also train Isaac Lab's reach task)
    learning_rate: float = 1e-3
    """Adam's initial learning rate, then adapted to keep the KL divergence near `desired_kl`"""
    desired_kl: float = 0.01
    """target KL divergence of one minibatch step for the adaptive learning rate (0: fixed learning rate)"""
    gamma: float = 0.99
    """the discount factor"""
    gae_lambda: float = 0.95
    """the lambda of generalized advantage estimation"""
    num_minibatches: int = 4
    """the number of minibatches per epoch"""
    update_epochs: int = 5
    """the number of epochs over the rollout per update"""
    norm_adv: bool = True
    """normalize advantages per minibatch"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """clip the value loss like the policy loss"""
    ent_coef: float = 0.005
    """coefficient of the entropy bonus"""
    vf_coef: float = 1.0
    """coefficient of the value loss"""
    max_grad_norm: float = 1.0
    """the maximum norm for gradient clipping"""
    init_noise_std: float = 1.0
    """initial standard deviation of the Gaussian policy"""
    obs_clip: float = 5.0
    """normalized observations are clipped to [-obs_clip, obs_clip]"""

    # Task
    control_type: str = "position_delta"
    """what an action commands: torque, position (a joint target) or position_delta (a target increment)"""
    max_delta: float = 1.0
    """position_delta: the largest change of a joint target per step, as a fraction of what its speed limit allows"""
    episode_length_s: float = 5.0
    """episode length in seconds (the arm cannot fail: every episode ends in a bootstrapped time-out)"""
    target_hold_s: float = 2.5
    """seconds each target stays before the next one (Isaac Lab's reach holds each for 4 s)"""
    success_window_s: float = 0.5
    """a target is a success when the end-effector stays within success_threshold over this final part of its hold"""
    success_threshold: float = 0.02
    """distance of a success (m)"""
    reset_noise: float = 0.2
    """at a reset each joint starts at the home pose plus U(-reset_noise, reset_noise) rad"""
    eval_interval: int = 50
    """iterations between two deterministic evaluations logged under eval/ (0: never)"""
    eval_envs: int = 1024
    """environments of an evaluation during training (at most num_envs)"""
    eval_episodes: int = 2
    """episodes per environment in an evaluation"""


def check_args(args: Args) -> None:
    """Reject bad input before anything is created or written: UserError naming the flag and the fix."""
    ec.check_common_args(args)
    ec.check_range(args, "eval_episodes", 1, integer=True)
    if args.control_type not in CONTROL_TYPES:
        raise UserError(f"unknown --control-type {args.control_type!r}: use torque, position or position_delta")
    ec.check_range(args, "max_delta", 0, 1, lo_open=True, hint="a fraction of the largest step the speed limits allow")
    for name in ("episode_length_s", "target_hold_s", "success_window_s"):
        ec.check_range(args, name, POLICY_DT, MAX_TIME_S, hint=f"from one policy step ({POLICY_DT} s) to a day")
    if args.success_window_s > args.target_hold_s:
        raise UserError(
            f"--success-window-s {args.success_window_s} is longer than --target-hold-s "
            f"{args.target_hold_s}: the window is the end of the hold"
        )
    ec.check_range(args, "success_threshold", 0, lo_open=True)
    ec.check_range(args, "reset_noise", 0)


if __name__ == "__main__":  # the command line first: --help and mistakes answer before torch, MuJoCo and Warp load
    ARGS = ec.read_command_line(Args, check_args)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.distributions import Normal  # noqa: E402

# ==================================================================================================================
# The task: a 7-joint arm holding its end-effector on targets sampled in a reachable box
# ==================================================================================================================
ASSET = "panda.xml"
EE_SITE, TARGET_BODY = "ee", "target"

# Reward terms, per policy step (no dt factor). They follow Isaac Lab's reach task (reach_env_cfg.py:
# position_tracking -0.2 * d, position_tracking_fine_grained 0.1 * (1 - tanh(d / 0.1)), action_rate -1e-4,
# joint_vel -1e-4, each times dt), rescaled to per-step values, with a sharper fine term (2 cm is the bar here).
REWARD_SCALES = {
    "distance": -1.0,  # end-effector to target distance (m): pulls from anywhere in the workspace
    "distance_fine": 1.0,  # exp(-d / FINE_SIGMA): steep in the last few centimetres, where -d is flat
    "action_rate": -0.005,  # |a_t - a_{t-1}|^2: smooth commands
    "joint_vel": -0.001,  # |joint velocity|^2 (rad/s): no flailing, matters most under torque control
}
FINE_SIGMA = 0.02  # m
# Targets are sampled uniformly in this box (m, world frame, base at the origin): in front of the arm, inside its
# reach with margin, away from the base column and the floor.
TARGET_LOW, TARGET_HIGH = (0.3, -0.35, 0.15), (0.7, 0.35, 0.65)

# The observation, term by term in this order: name, size ("nu": one per actuator, in action order), units, meaning.
# ReachEnv._observe concatenates the terms by this table, ReachEnv's docstring shows it, and --export writes it into
# the policy's contract.
OBSERVATION = (
    ("joint_pos", "nu", "1", "joint positions scaled over the joint ranges: 2 (q - lower) / (upper - lower) - 1"),
    ("joint_vel", "nu", "rad/s", "joint velocities"),
    ("ee_pos", 3, "m", "position of the end-effector site, world frame (the arm's base at the origin)"),
    ("target_pos", 3, "m", "position of the target, world frame"),
    ("target_minus_ee", 3, "m", "target position minus end-effector position, world frame"),
    ("last_action", "nu", "1", "the previous policy step's actions, clipped to [-1, 1]"),
)


@dataclass
class ReachConfig:
    """The task's settings (the Args fields of the same names): what defines a trained policy's task."""

    control_type: str
    max_delta: float
    episode_length_s: float
    target_hold_s: float
    success_window_s: float
    success_threshold: float
    reset_noise: float

    @classmethod
    def from_args(cls, args: Args) -> ReachConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


# What a policy's observations and actions mean, and its task: --eval and --export take these from the checkpoint.
TASK_ARGS = tuple(f.name for f in dataclasses.fields(ReachConfig)) + ("obs_clip",)


# Speed limits. The arm's published joint speed limits and torque rate limit (Franka Control Interface documentation,
# "Robot and interface specifications", Limits for Panda: 2.175 rad/s for joints 1-4, 2.61 rad/s for 5-7, 1000 N m/s)
# are stored in panda.xml as <custom> numerics, read once. MuJoCo has no joint speed limit: each action mapping keeps
# every actuator from driving a joint faster than SPEED_FRACTION of its limit; the rest is margin for what the
# actuators cannot hold back, the motion of the other joints (near coaxial joints 1 and 3, or 5 and 7, one joint's
# swing speeds up the other; the README gives the measured peaks, tests/test_reach.py checks them at every physics
# step).
SPEED_FRACTION = 0.6
SPEED_LIMIT_FIELD, TORQUE_RATE_FIELD = "joint_speed_limit", "joint_torque_rate_limit"  # <numeric> names in the MJCF


def model_numeric(mjm, name: str, size: int) -> np.ndarray:
    """The values of the MJCF's <numeric name=...> as a float array of shape (size,). Raises UserError if the model
    has no such field or it holds another number of values."""
    try:
        values = np.array(mjm.numeric(name).data, dtype=np.float64)
    except KeyError:
        values = None
    if values is None or values.shape != (size,):
        raise UserError(
            f'{ASSET} needs <custom><numeric name="{name}" data="..."/></custom> with {size} values (one per actuator)'
        )
    return values


class ActionHandler:
    """Policy actions in [-1, 1] -> the simulator's ctrl, one method per control type, within the arm's speed limits.

    Pure torch functions of (actions a, previous ctrl c, measured joint positions q), joint by joint, so each mapping
    can be checked by hand; every limit below is a (nu,) tensor, positions in rad, torques in N m:
      torque:          ctrl = c + clamp(a * torque_limit - c, +-max_torque_step)
      position:        ctrl = clamp(c + clamp(goal - c, +-max_step), q +- max_lead, range),
                       goal = lower + (a + 1) / 2 * (upper - lower)        (a goal anywhere in the range)
      position_delta:  ctrl = clamp(c + a * max_delta * max_step, q +- max_lead, range)
    with max_step = SPEED_FRACTION * speed_limit * dt (the most a target moves in a policy step), max_lead =
    SPEED_FRACTION * speed_limit * kv / kp and max_torque_step = torque_rate_limit * dt (Franka's torque rate limit).
    A target at most max_lead from its joint makes the servo's force kp * (target - q) - kv * qdot turn against the
    motion before |qdot| reaches SPEED_FRACTION * speed_limit, at every physics step, however far the target ran ahead
    or the joint fell behind (without it, the PD servo wound up behind targets moving at the limit and carried joints
    to twice it). In torque mode the same holds through the motors themselves (make_torque_actuators), and the torque
    rate limit spreads a torque reversal over several steps (torques jumping straight to action x limit carried joints
    to 1.32 times their speed limits, the other joints' reaction outpacing the motors). The rate limits keep each
    command's own speed within the limits; the lead bound only acts when a joint lags its target by more than the
    servo needs at that speed.
    position_delta moves the previous target rather than the measured joint position: the PD loop always lags its
    target a little, and restarting from the measured angle would feed that lag (and sensor noise, on a robot) back
    into the command; integrating the target gives smooth commands, and zero action means "hold still".
    Arguments, each of shape (nu,) unless a float: joint ranges lower, upper (rad), torque_limit (N m), max_delta (0 to
    1, see Args), speed_limit (rad/s), the position servos' kp (N m/rad) and kv (N m s/rad), dt (the policy step, s),
    torque_rate_limit (N m/s).
    """

    def __init__(
        self,
        control_type: str,
        lower,
        upper,
        torque_limit,
        max_delta: float,
        speed_limit,
        kp,
        kv,
        dt: float,
        torque_rate_limit,
    ):
        self.control_type = control_type
        self.lower, self.upper, self.torque_limit = lower, upper, torque_limit
        self.max_delta = max_delta
        self.max_step = SPEED_FRACTION * speed_limit * dt
        self.max_lead = SPEED_FRACTION * speed_limit * kv / kp
        self.max_torque_step = torque_rate_limit * dt

    def __call__(self, actions: torch.Tensor, ctrl: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
        """(N, nu) actions, the current (N, nu) ctrl and joint positions -> the next (N, nu) ctrl."""
        actions = actions.clamp(-1.0, 1.0)
        if self.control_type == "torque":  # a Python string: no device sync
            return self.torque(actions, ctrl)
        if self.control_type == "position":
            return self.position(actions, ctrl, qpos)
        return self.position_delta(actions, ctrl, qpos)

    def torque(self, actions, torques):
        change = actions.clamp(-1.0, 1.0) * self.torque_limit - torques
        return torques + torch.clamp(change, -self.max_torque_step, self.max_torque_step)

    def position(self, actions, targets, qpos):
        goal = self.lower + (actions.clamp(-1.0, 1.0) + 1.0) * 0.5 * (self.upper - self.lower)
        return self._servo_target(targets + torch.clamp(goal - targets, -self.max_step, self.max_step), qpos)

    def position_delta(self, actions, targets, qpos):
        return self._servo_target(targets + actions.clamp(-1.0, 1.0) * self.max_delta * self.max_step, qpos)

    def _servo_target(self, targets, qpos):
        near = torch.clamp(targets, qpos - self.max_lead, qpos + self.max_lead)
        return torch.clamp(near, self.lower, self.upper)  # last: float rounding must not step past a limit

    def reset_ctrl(self, qpos: torch.Tensor) -> torch.Tensor:
        """ctrl at a reset: hold the start pose (position modes), or no torque (gravity is compensated; Franka's
        torque control also starts from zero)."""
        return torch.zeros_like(qpos) if self.control_type == "torque" else qpos


def make_torque_actuators(mjm, no_load_speed) -> None:
    """Turn the asset's position servos into motors with a torque-speed line, in place on the host model:
    force = clamp(ctrl - torque_limit / no_load_speed * qdot, torque limits), ctrl limited to the torque limits.

    Like an electric motor's, the torque a motor can add in the direction of motion falls linearly from its limit at
    rest to zero at `no_load_speed` ((nu,) rad/s), so a motor alone never drives its joint faster; MuJoCo evaluates
    it at every physics step, as an actuator damping term. Done before BatchedSim copies the model to the device."""
    for i in range(mjm.nu):
        mjm.actuator_gainprm[i, :] = 0.0
        mjm.actuator_gainprm[i, 0] = 1.0
        mjm.actuator_biasprm[i, :] = 0.0  # no -kp * q: the policy is the controller
        mjm.actuator_biasprm[i, 2] = -mjm.actuator_forcerange[i, 1] / no_load_speed[i]
        mjm.actuator_ctrlrange[i] = mjm.actuator_forcerange[i]
        mjm.actuator_ctrllimited[i] = 1


class ReachEnv:
    """Batched reaching. All state lives in (num_envs, ...) tensors on the device, written in place.

    Observation layout (the OBSERVATION table; num_obs = 9 + 3 * nu = 30 for the Panda; raw, the normalizer scales):
      [0:7]   joint_pos: scaled to [-1, 1] over the joint ranges   [7:14]  joint_vel (rad/s)
      [14:17] ee_pos: end-effector position (m, world)             [17:20] target_pos (m, world)
      [20:23] target_minus_ee (m)                                  [23:30] last_action
    Each target stays for target_hold_s (as in Isaac Lab's reach); it is a success when the end-effector stays
    within success_threshold over the hold's last success_window_s. Episodes have a fixed length (a bootstrapped
    time-out); a target cut short by the episode's end is counted as censored, not as a success or a failure.
    """

    def __init__(self, num_envs: int, device: torch.device, cfg: ReachConfig | None = None):
        self.cfg = cfg = cfg or ReachConfig.from_args(Args())
        self.device, self.num_envs = device, num_envs
        mjm = ec.load_model(ASSET)
        if mjm.nu != mjm.nq or list(mjm.actuator_trnid[:, 0]) != list(range(mjm.nu)):
            raise UserError(f"{ASSET} must have one actuator per joint, in joint order")
        # Speed limits and the servos' gains, read before make_torque_actuators replaces the servos.
        speed_limit = model_numeric(mjm, SPEED_LIMIT_FIELD, mjm.nu)
        torque_rate_limit = model_numeric(mjm, TORQUE_RATE_FIELD, mjm.nu)
        kp, kv = mjm.actuator_gainprm[:, 0].copy(), -mjm.actuator_biasprm[:, 2]  # position servo: bias (0, -kp, -kv)
        if cfg.control_type == "torque":
            make_torque_actuators(mjm, SPEED_FRACTION * speed_limit)
        decimation = max(1, round(POLICY_DT / mjm.opt.timestep))
        self.sim = s = ec.BatchedSim(mjm, num_envs, device, decimation=decimation)
        self.num_actions = nu = mjm.nu
        self.num_obs = ec.observation_size(OBSERVATION, nu)
        self.dt = mjm.opt.timestep * decimation
        self.max_episode_length = int(round(cfg.episode_length_s / self.dt))
        self.hold_steps = max(1, int(round(cfg.target_hold_s / self.dt)))
        self.window_steps = min(self.hold_steps, max(1, int(round(cfg.success_window_s / self.dt))))
        self.ee_site, self.target_mocap = s.site_id(EE_SITE), int(mjm.body_mocapid[s.body_id(TARGET_BODY)])

        def f32(a):
            return torch.tensor(np.asarray(a), dtype=torch.float32, device=device)

        self.lower, self.upper = f32(mjm.jnt_range[:, 0]), f32(mjm.jnt_range[:, 1])
        self.actions_to_ctrl = ActionHandler(
            cfg.control_type,
            self.lower,
            self.upper,
            f32(mjm.actuator_forcerange[:, 1]),
            cfg.max_delta,
            f32(speed_limit),
            f32(kp),
            f32(kv),
            self.dt,
            f32(torque_rate_limit),
        )
        self.target_low, self.target_high = f32(TARGET_LOW), f32(TARGET_HIGH)
        self.dof_pos, self.dof_vel = s.qpos, s.qvel  # a fixed base: every coordinate is a joint

        def z(*shape, dtype=torch.float32):
            return torch.zeros(num_envs, *shape, dtype=dtype, device=device)

        # Carried from one step to the next (with the simulator's state, which holds the targets as mocap bodies).
        self.actions, self.last_actions = z(nu), z(nu)
        self.target = s.mocap_pos[:, self.target_mocap]  # a view: the renderer draws each env's target sphere
        self.target_time, self.first_reach = z(dtype=torch.long), z(dtype=torch.long)  # steps; -1: not reached yet
        self.window_ok, self.window_err = z(dtype=torch.bool), z()
        self.episode_length, self.episode_return = z(dtype=torch.long), z()
        # Computed once per step, read by the reward terms.
        self.distance, self.broken = z(), z(dtype=torch.bool)
        self.reward_names = list(REWARD_SCALES)
        self.episode_sums = {name: z() for name in self.reward_names}
        # Statistics summed per environment on the device, reduced over environments once per iteration (pop_stats).
        stat_names = [
            "episodes",
            "return",
            "length",
            "targets",
            "successes",
            "reached",
            "reach_time",
            "hold_err",
            "censored",
            "dist",
            "dist_steps",
            "nonfinite",
            "overflows",
        ]
        self.stats = {k: z() for k in stat_names + [f"rew_{n}" for n in self.reward_names]}

    STATE = (
        "actions",
        "last_actions",
        "target_time",
        "first_reach",
        "window_ok",
        "window_err",
        "episode_length",
        "episode_return",
    )

    def state_dict(self) -> dict:
        return {
            "sim": self.sim.get_state(),
            "episode_sums": {k: v.clone() for k, v in self.episode_sums.items()},
            **{k: getattr(self, k).clone() for k in self.STATE},
        }

    def load_state_dict(self, state: dict) -> torch.Tensor:
        """Restore a state_dict() and return the observations it gives."""
        self.sim.set_state(state["sim"])
        for k, v in self.episode_sums.items():
            v.copy_(state["episode_sums"][k])
        for k in self.STATE:
            if k in state:
                getattr(self, k).copy_(state[k])
        return self._observe()

    # ------------------------------------------------------------------------------------------------------------
    def _rand(self, *shape, lo=0.0, hi=1.0):
        # torch's global generator (seeded, saved in checkpoints); a private one would stop torch.compile's tracing
        return lo + (hi - lo) * torch.rand(*shape, device=self.device)

    def _sample_targets(self, mask: torch.Tensor):
        new = self.target_low + (self.target_high - self.target_low) * self._rand(self.num_envs, 3)
        self.target.copy_(torch.where(mask[:, None], new, self.target))
        self.target_time.masked_fill_(mask, 0)
        self.first_reach.masked_fill_(mask, -1)
        self.window_ok.masked_fill_(mask, True)
        self.window_err.masked_fill_(mask, 0.0)

    def reset(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reset the environments in `mask` (all if None) on the device and return all observations."""
        if mask is None:
            mask = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        s, noise = self.sim, self.cfg.reset_noise
        qpos = s.default_qpos + self._rand(self.num_envs, self.num_actions, lo=-noise, hi=noise)
        qpos = torch.clamp(qpos, self.lower, self.upper)
        s.reset(mask, qpos, ctrl=self.actions_to_ctrl.reset_ctrl(qpos))
        m = mask[:, None]
        self.actions.masked_fill_(m, 0.0)
        self.last_actions.masked_fill_(m, 0.0)
        self.episode_length.masked_fill_(mask, 0)
        self._sample_targets(mask)
        return self._observe()

    def desynchronize(self) -> None:
        """Start every environment at a random point of its episode (rsl_rl's init_at_random_ep_len), so that they
        do not all time out on the same step."""
        self.episode_length.copy_((self._rand(self.num_envs) * self.max_episode_length).long())

    @property
    def ee_pos(self) -> torch.Tensor:
        return self.sim.site_xpos[:, self.ee_site]

    def _observe(self) -> torch.Tensor:
        ee = self.ee_pos
        terms = {
            "joint_pos": 2.0 * (self.dof_pos - self.lower) / (self.upper - self.lower) - 1.0,
            "joint_vel": self.dof_vel,
            "ee_pos": ee,
            "target_pos": self.target,
            "target_minus_ee": self.target - ee,
            "last_action": self.actions,
        }
        return torch.cat([terms[name] for name, *_ in OBSERVATION], dim=-1)

    # ------------------------------------------------------------------------------------------------------------
    def step(self, actions: torch.Tensor):
        """Apply actions (num_envs, num_actions) for one policy step. Returns (obs, reward, terminated, truncated,
        final_obs): environments that ended are already reset, so obs is their next episode's first observation
        and final_obs their last one (to bootstrap the value on time-outs). Only broken worlds terminate.

        State is written in place only and nothing branches on tensor values, so that a CUDA graph can replay it."""
        self.actions.copy_(actions.clamp(-1.0, 1.0))
        self.sim.ctrl.copy_(self.actions_to_ctrl(self.actions, self.sim.ctrl, self.dof_pos))
        self.sim.step()
        self.episode_length += 1
        self.target_time += 1
        # A world that blew up (NaN or infinity) or overflowed its constraint buffers is reset below; its last step
        # counts for nothing: reward 0, no bootstrap (it ends as terminated), no statistics.
        nonfinite, overflowed = self.sim.nonfinite(), self.sim.overflowed()
        self.broken.copy_(nonfinite | overflowed)
        self.distance.copy_(torch.where(self.broken, 1.0, (self.target - self.ee_pos).norm(dim=-1)))

        # The target's hold: when it is first reached, and whether the final window stays within the threshold.
        near = self.distance < self.cfg.success_threshold
        self.first_reach.copy_(torch.where((self.first_reach < 0) & near, self.target_time, self.first_reach))
        in_window = self.target_time > self.hold_steps - self.window_steps
        self.window_ok &= near | ~in_window
        self.window_err += self.distance * in_window
        held = (self.target_time >= self.hold_steps) & ~self.broken  # this target's hold is over
        truncated = (self.episode_length >= self.max_episode_length) & ~self.broken

        reward = self._compute_reward()
        self._accumulate_stats(reward, held, truncated, nonfinite, overflowed)
        self._sample_targets(held)  # the next target, same episode
        self.last_actions.copy_(self.actions)

        final_obs = torch.where(self.broken[:, None], 0.0, self._observe())  # NaN * 0 is NaN: select, never multiply
        obs = self.reset(truncated | self.broken)
        return obs, reward, self.broken.clone(), truncated, final_obs

    def _compute_reward(self) -> torch.Tensor:
        """Sum of every term times its scale, by name (legged_gym's compute_reward)."""
        total = torch.zeros(self.num_envs, device=self.device)
        for name in self.reward_names:
            term = torch.where(self.broken, 0.0, getattr(self, f"_reward_{name}")() * REWARD_SCALES[name])
            self.episode_sums[name] += term
            total += term
        return total

    def _accumulate_stats(self, reward, held, truncated, nonfinite, overflowed):
        st, done, ok = self.stats, truncated, ~self.broken
        self.episode_return += reward
        st["episodes"] += done
        st["return"] += self.episode_return * done
        st["length"] += self.episode_length * done
        st["targets"] += held
        st["successes"] += held & self.window_ok
        st["reached"] += held & (self.first_reach >= 0)
        st["reach_time"] += torch.where(held & (self.first_reach >= 0), self.first_reach, 0)
        st["hold_err"] += torch.where(held, self.window_err / self.window_steps, 0.0)
        st["censored"] += truncated & ~held  # the episode ended before this target's hold did
        st["dist"] += self.distance * ok
        st["dist_steps"] += ok
        st["nonfinite"] += nonfinite
        st["overflows"] += overflowed
        for name in self.reward_names:
            st[f"rew_{name}"] += self.episode_sums[name] * done
            self.episode_sums[name].masked_fill_(done | self.broken, 0.0)
        self.episode_return.masked_fill_(done | self.broken, 0.0)

    def pop_stats(self) -> dict[str, float]:
        """Means since the last call (one host sync). Target metrics are over the targets whose hold ended: success
        rate, the mean distance over the success window (hold error), the share ever within the threshold and the
        mean time to first get there; censored targets (cut by an episode's end) are counted apart."""
        v = dict(zip(self.stats, torch.stack(list(self.stats.values())).sum(dim=1).tolist()))
        for t in self.stats.values():
            t.zero_()
        targets = v["targets"]
        out = {
            "mean_distance": v["dist"] / max(v["dist_steps"], 1.0),
            "targets": targets,
            "successes": v["successes"],
            "censored_targets": v["censored"],
            "nonfinite_resets": v["nonfinite"],
            "overflows": v["overflows"],
        }
        if targets > 0:
            out.update(
                success_rate=v["successes"] / targets,
                hold_error=v["hold_err"] / targets,
                reached_rate=v["reached"] / targets,
            )
        if v["reached"] > 0:
            out["time_to_reach"] = v["reach_time"] / v["reached"] * self.dt
        if v["episodes"] > 0:
            episodes = v["episodes"]
            out.update(
                episodes=episodes, episodic_return=v["return"] / episodes, episodic_length=v["length"] / episodes
            )
            out.update({f"reward_{n}": v[f"rew_{n}"] / episodes for n in self.reward_names})
        return out

    # ---- Reward terms: one small function each, scaled by REWARD_SCALES ----------------------------------------
    def _reward_distance(self):
        return self.distance

    def _reward_distance_fine(self):
        return torch.exp(-self.distance / FINE_SIGMA)

    def _reward_action_rate(self):
        return (self.actions - self.last_actions).square().sum(dim=1)

    def _reward_joint_vel(self):
        return self.dof_vel.square().sum(dim=1)


# ==================================================================================================================
# Observation normalizer
# ==================================================================================================================
class ObservationNormalizer(nn.Module):
    """Running mean and variance of every observation over all environments and steps seen so far.

    Each batch (batch, size) is merged exactly (Chan et al.'s parallel algorithm): the statistics equal those of
    all batches concatenated. In a run of several processes (`dist`, an envs_common.Distributed) each update merges
    every process's batch of the step, so that every copy holds the statistics of all environments. Saved with the
    model (buffers), frozen at evaluation time.
    """

    def __init__(self, size: int, clip: float = 5.0, eps: float = 1e-8, dist=None):
        super().__init__()
        self.clip, self.eps, self.dist = clip, eps, dist
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("var", torch.ones(size))
        # float64: exact counts past 2^24. Shape (1,): torch.compile drops in-place writes to 0-d float64 buffers.
        self.register_buffer("count", torch.zeros(1, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        batch_mean, batch_var = x.mean(dim=0), x.var(dim=0, unbiased=False)
        if self.dist is not None and self.dist.world_size > 1:  # every process's batch, all of one size
            batch_mean, batch_var = self.dist.merge_moments(batch_mean, batch_var)
            n *= self.dist.world_size
        total = self.count + n
        w = (n / total).float()  # weight of the new batch
        delta = batch_mean - self.mean
        self.mean += delta * w
        # M2 of the union = M2_a + M2_b + delta^2 * n_a * n_b / n
        self.var.copy_(self.var * (1 - w) + batch_var * w + delta.square() * w * (1 - w))
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / torch.sqrt(self.var + self.eps)).clamp(-self.clip, self.clip)


# ==================================================================================================================
# Actor-critic
# ==================================================================================================================
def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(sizes: list[int], out_std: float) -> nn.Sequential:
    layers = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [layer_init(nn.Linear(a, b)), nn.ELU()]
    return nn.Sequential(*layers, layer_init(nn.Linear(sizes[-2], sizes[-1]), std=out_std))


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs, [256, 128, 64] with ELU (Isaac Lab's reach agent), and a state-independent
    learnable log standard deviation of the Gaussian policy. Observations (batch, num_obs), actions
    (batch, num_actions). With bf16, the hidden layers run in bfloat16 autocast."""

    def __init__(
        self, num_obs: int, num_actions: int, init_noise_std: float = 1.0, hidden=(256, 128, 64), bf16: bool = False
    ):
        super().__init__()
        self.actor = mlp([num_obs, *hidden, num_actions], out_std=0.01)
        self.critic = mlp([num_obs, *hidden, 1], out_std=1.0)
        self.actor_logstd = nn.Parameter(torch.full((num_actions,), float(np.log(init_noise_std))))
        self.bf16 = bf16

    def _mlp(self, net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        # Output layer in float32: PPO's probability ratios and value targets are differences of its outputs.
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = net[:-1](x)
        return net[-1](hidden.float())

    def get_value(self, x):
        return self._mlp(self.critic, x).squeeze(-1)

    def get_action(self, x):
        """Sample an action and its log-probability (the rollout)."""
        mean = self._mlp(self.actor, x)
        std = self.actor_logstd.exp().expand_as(mean)
        action = mean + std * torch.randn_like(mean)  # dist.sample() without its host-side check of std
        return action, Normal(mean, std, validate_args=False).log_prob(action).sum(-1)

    def get_action_and_value(self, x, action):
        """Log-probability and entropy of given actions under the current policy, and the value (the update)."""
        mean = self._mlp(self.actor, x)
        # validate_args=False: the argument checks read tensors on the host, a sync inside a CUDA graph
        dist = Normal(mean, self.actor_logstd.exp().expand_as(mean), validate_args=False)
        return action, dist.log_prob(action).sum(-1), dist.entropy().sum(-1), self.get_value(x)

    def act_deterministic(self, x):
        return self._mlp(self.actor, x)


# ==================================================================================================================
# PPO: the rollout step, GAE and the loss (module-level functions; main() applies compile and CUDA graphs)
# ==================================================================================================================
@dataclass
class RolloutStorage:
    """The rollout, preallocated on the device: row t of each (T, N, ...) buffer holds step t of every
    environment. `step` is t as a device tensor, so that one recorded CUDA graph can write any row."""

    obs: torch.Tensor  # (T, N, num_obs) normalized observations the policy acted on
    actions: torch.Tensor  # (T, N, num_actions)
    logprobs: torch.Tensor  # (T, N) log-probability of each action under the policy that sampled it
    rewards: torch.Tensor  # (T, N) plus gamma * V(final observation) on time-outs (finish_rollout)
    dones: torch.Tensor  # (T, N) bool: the episode ended after this step (broke or timed out)
    truncated: torch.Tensor  # (T, N) bool: ... by a time-out
    final_obs: torch.Tensor  # (T, N, num_obs) normalized last observation of the episodes that ended
    values: torch.Tensor  # (T, N) the critic's value of obs (finish_rollout)
    advantages: torch.Tensor  # (T, N) GAE advantages (finish_rollout)
    returns: torch.Tensor  # (T, N) advantages + values (finish_rollout)
    step: torch.Tensor  # (1,) long: the row the next rollout step writes
    next_obs: torch.Tensor  # (N, num_obs) raw observation the policy acts on next

    @classmethod
    def allocate(cls, T: int, N: int, num_obs: int, num_actions: int, device) -> RolloutStorage:
        def z(*shape, dtype=torch.float32):
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(
            obs=z(T, N, num_obs),
            actions=z(T, N, num_actions),
            logprobs=z(T, N),
            rewards=z(T, N),
            dones=z(T, N, dtype=torch.bool),
            truncated=z(T, N, dtype=torch.bool),
            final_obs=z(T, N, num_obs),
            values=z(T, N),
            advantages=z(T, N),
            returns=z(T, N),
            step=z(1, dtype=torch.long),
            next_obs=z(N, num_obs),
        )


@torch.no_grad()
def rollout_step(env: ReachEnv, agent: ActorCritic, normalizer: ObservationNormalizer, storage: RolloutStorage):
    """One step of every environment: normalize, act, simulate, store in row `storage.step`. In place only."""
    normalizer.update(storage.next_obs)
    obs = normalizer(storage.next_obs)
    action, logprob = agent.get_action(obs)
    next_obs, reward, terminated, truncated, final_obs = env.step(action)
    for buf, x in (
        (storage.obs, obs),
        (storage.actions, action),
        (storage.logprobs, logprob),
        (storage.rewards, reward),
        (storage.dones, terminated | truncated),
        (storage.truncated, truncated),
        (storage.final_obs, normalizer(final_obs)),
    ):
        buf.index_copy_(0, storage.step, x.unsqueeze(0))
    storage.next_obs.copy_(next_obs)
    storage.step.add_(1)


def compute_gae(rewards, values, dones, next_value, gamma: float, gae_lambda: float):
    """Generalized advantage estimation (Schulman et al. 2016) over a (T, N) rollout. Returns (advantages, returns).

    dones[t]: the episode ended after step t. A time-out's reward already holds gamma * V(final observation), so
    cutting the bootstrap at every done is right for both kinds of ending. next_value: V after the last step."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        next_v = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        not_done = 1.0 - dones[t].to(rewards.dtype)
        delta = rewards[t] + gamma * next_v * not_done - values[t]
        last = delta + gamma * gae_lambda * not_done * last
        advantages[t] = last
    return advantages, advantages + values


@torch.no_grad()
def finish_rollout(agent: ActorCritic, normalizer: ObservationNormalizer, storage: RolloutStorage, args: Args):
    """After the rollout: the critic's values of all T * N observations in one batch (the critic does not change
    during a rollout), the time-out bootstrap, and GAE, written into `storage`."""
    T, N = storage.rewards.shape
    storage.values.copy_(agent.get_value(storage.obs.view(T * N, -1)).view(T, N))
    final_values = agent.get_value(storage.final_obs.view(T * N, -1)).view(T, N)
    storage.rewards.add_(args.gamma * final_values * storage.truncated)  # time-outs are not failures
    next_value = agent.get_value(normalizer(storage.next_obs))
    advantages, returns = compute_gae(
        storage.rewards, storage.values, storage.dones, next_value, args.gamma, args.gae_lambda
    )
    storage.advantages.copy_(advantages)
    storage.returns.copy_(returns)


def ppo_loss(agent: ActorCritic, storage: RolloutStorage, mb: torch.Tensor, args: Args):
    """PPO's clipped surrogate (Schulman et al. 2017) on the rollout rows `mb` (a (B,) long tensor).

    Returns (loss, stats) with stats = (value loss, policy loss, entropy, old approx KL, approx KL, clip fraction).
    The value loss is rsl_rl's: the clipped squared error without CleanRL's factor 0.5. The KL is CleanRL's
    estimator from the sampled actions' log-ratios (Schulman's k3), where rsl_rl uses the Gaussians' exact KL."""
    obs, actions = storage.obs.flatten(0, 1)[mb], storage.actions.flatten(0, 1)[mb]
    old_logprobs, old_values = storage.logprobs.flatten()[mb], storage.values.flatten()[mb]
    advantages, returns = storage.advantages.flatten()[mb], storage.returns.flatten()[mb]
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(obs, actions)
    logratio = newlogprob - old_logprobs
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
    if args.norm_adv:
        # Over this process's minibatch alone, also in a run of several processes: its num_envs * num_steps /
        # num_minibatches samples, as many as one GPU's run has, set the mean and scale well enough, and statistics
        # over every process's minibatch would cost one more all_reduce per minibatch step. (rsl_rl's multi-GPU PPO
        # also normalizes advantages within each process.)
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
    if args.clip_vloss:
        v_clipped = old_values + (newvalue - old_values).clamp(-args.clip_coef, args.clip_coef)
        v_loss = torch.max((newvalue - returns).square(), (v_clipped - returns).square()).mean()
    else:
        v_loss = (newvalue - returns).square().mean()
    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss
    return loss, torch.stack([v_loss, pg_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac]).detach()


def ppo_minibatch_update(
    agent, optimizer, storage, mb, update_stats, args: Args, loss_fn=ppo_loss, dist: ec.Distributed | None = None
) -> None:
    """One minibatch step: the loss, backward, gradients and stats averaged over the processes of a data-parallel
    run (`dist`; nothing to do in one process), the KL-adaptive learning rate, gradient clipping, Adam. Adds the
    loss's stats to `update_stats` (6,). In place and without host syncs (a CUDA graph on a GPU)."""
    loss, stats = loss_fn(agent, storage, mb, args)
    optimizer.zero_grad(set_to_none=True)  # in a CUDA graph, backward then writes the gradients (no zeroing pass)
    loss.backward()
    if dist is not None:
        # One all_reduce averages every gradient (as DistributedDataParallel does) and the stats over the processes:
        # every copy of the policy takes the same step, at the rate that the KL of all their minibatches sets below.
        dist.average_([p.grad for p in agent.parameters()] + [stats])
    if args.desired_kl > 0:
        # rsl_rl's schedule, set from this minibatch's KL before its step; the rate is a device tensor (no sync)
        lr, kl = optimizer.param_groups[0]["lr"], stats[4]
        factor = torch.where(kl > 2.0 * args.desired_kl, 1 / 1.5, torch.where(kl < args.desired_kl / 2.0, 1.5, 1.0))
        lr.copy_((lr * factor).clamp(1e-5, 1e-2))
    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
    optimizer.step()
    update_stats.add_(stats)


# ==================================================================================================================
# Main: set-up, then the training loop
# ==================================================================================================================
# GPU memory per environment and rollout step (simulation, storage, update activations; --no-bf16 included): the
# slope of memory against --num-envs measured by tests/benchmark_throughput.py (README, Performance).
BYTES_PER_ENV_STEP = 6 * 1024


def main(args: Args) -> None:
    check_args(args)
    dist = ec.distributed()  # one process of a torchrun launch (its RANK, WORLD_SIZE, LOCAL_RANK), or the only one
    device = dist.choose_device(args.device)
    if device.type == "cpu" and not (args.eval or args.export) and None in (args.num_envs, args.num_iterations):
        print(
            f"note: no GPU in use, so running small on the CPU (--num-envs {args.num_envs or 256}, --num-iterations "
            f"{args.num_iterations or 60}): this learns to reach roughly; a GPU learns it precisely",
            flush=True,
        )
    args.num_envs = args.num_envs or (4096 if device.type == "cuda" else 256)
    args.num_iterations = args.num_iterations or (300 if device.type == "cuda" else 60)
    check_args(args)
    ec.note_gpu_only_flags(args, device)
    requested_speed = ec.gpu_speed_flags(args, device)
    ec.check_memory(device, args.num_envs, args.num_steps * BYTES_PER_ENV_STEP)
    if args.capture_video:
        ec.Renderer.check_available()
    if args.track and not (args.eval or args.export):
        ec.check_wandb_login()
    ckpt = ec.load_checkpoint(args.checkpoint, device, SCRIPT) if args.checkpoint else None
    ec.seed_everything((args.seed + dist.rank) % 2**32, args.torch_deterministic)  # each process its own samples

    env = ReachEnv(args.num_envs, device, ReachConfig.from_args(args))
    if ckpt is not None:
        ec.check_checkpoint_dims(ckpt, args.checkpoint, env.num_obs, env.num_actions)
    agent = ActorCritic(env.num_obs, env.num_actions, args.init_noise_std, bf16=args.bf16).to(device)
    normalizer = ObservationNormalizer(env.num_obs, clip=args.obs_clip, dist=dist).to(device)
    # The learning rate is a device tensor, so that the KL-adaptive schedule changes it without a host sync.
    optimizer = torch.optim.Adam(
        agent.parameters(),
        lr=torch.tensor(args.learning_rate, device=device),
        eps=1e-5,
        fused=device.type == "cuda",
        capturable=args.cudagraphs,
    )
    start_iteration, global_step = 1, 0
    if ckpt is not None:
        agent.load_state_dict(ckpt["model"])
        normalizer.load_state_dict(ckpt["normalizer"])
        ec.load_optimizer_state(optimizer, ckpt["optimizer"])
        start_iteration, global_step = ckpt["iteration"] + 1, ckpt["global_step"]
        if start_iteration > args.num_iterations and not (args.eval or args.export):
            raise UserError(
                f"{args.checkpoint} is at iteration {ckpt['iteration']} already: pass a larger "
                f"--num-iterations to train on"
            )

    if args.eval or args.export:
        return evaluate_or_export(agent, normalizer, env, device, args)

    # ---- Data-parallel (torchrun): the process group, then rank 0's policy in every process (one: nothing) ----
    dist.start(device)
    dist.broadcast_(agent, normalizer)
    main_process = dist.is_main  # rank 0 alone logs, evaluates, records videos and writes the run's files

    # ---- The rollout storage, and where the environments start ----
    T, N = args.num_steps, args.num_envs
    storage = RolloutStorage.allocate(T, N, env.num_obs, env.num_actions, device)
    own = dist.own_state(ckpt, N) if ckpt is not None else None  # this process's environments and generators
    if own is not None:
        storage.next_obs.copy_(env.load_state_dict(own["env"]))  # exactly where the checkpoint stopped
        ec.set_rng_state(own["rng"])
    else:
        if ckpt is not None:
            saved = f"{ckpt.get('processes', 1)} process(es) with {ckpt['args']['num_envs']} environments each"
            print(f"note: {args.checkpoint} was saved by {saved}: the environments start afresh", flush=True)
        storage.next_obs.copy_(env.reset())
        env.desynchronize()
    batch_size = T * N
    minibatch_size = batch_size // args.num_minibatches
    mb = torch.zeros(minibatch_size, dtype=torch.long, device=device)  # the rows of the current minibatch
    update_stats = torch.zeros(6, device=device)

    # ---- Speed (LeanRL's way): the same plain functions, compiled and recorded as CUDA graphs on a GPU ----
    step_fn = torch.compile(rollout_step, dynamic=False) if args.compile else rollout_step
    loss_fn = torch.compile(ppo_loss, dynamic=False) if args.compile else ppo_loss
    if args.compile:  # torch's own random kernels, as in eager mode: --compile changes the speed, not the rollout
        torch._inductor.config.fallback_random = True
    graphed = ec.cuda_graphed if args.cudagraphs else (lambda fn, _device: fn)
    run_rollout_step = graphed(lambda: step_fn(env, agent, normalizer, storage), device)
    run_finish_rollout = graphed(lambda: finish_rollout(agent, normalizer, storage, args), device)
    run_minibatch_update = graphed(
        lambda: ppo_minibatch_update(agent, optimizer, storage, mb, update_stats, args, loss_fn, dist), device
    )

    # ---- The run folder and its loggers (a resumed run keeps writing into its own folder) ----
    resuming = ckpt is not None and Path(args.checkpoint).resolve().parent.name == "checkpoints"
    run_dir = ec.run_dir_of(args.checkpoint) if resuming else ec.new_run_dir(args.exp_name, args.seed)
    logger = ec.Logger(
        run_dir,
        args,
        resume_step=global_step if ckpt is not None else None,
        wandb_id=ckpt.get("wandb_id") if resuming else None,
        enabled=main_process,
    )
    if main_process:
        ec.write_config(run_dir, SCRIPT, args, device, dist.world_size)
    stop = ec.StopRequest()
    W = dist.world_size  # processes; each iteration steps W * N environments T times
    envs = f"{N} environments on {ec.device_name(device)}"
    if W > 1:
        envs = f"{W * N} environments ({W} processes x {N}, each on {ec.device_name(device)})"
    print(
        f"{run_dir.name}: {envs}, iterations {start_iteration} to {args.num_iterations} of {T} steps; start-up took "
        f"{time.time() - PROCESS_START:.1f} s",
        flush=True,
    )
    if args.compile:
        print(
            "torch.compile: the first iteration compiles the rollout step and the loss (--no-compile skips this)",
            flush=True,
        )

    last_checkpoint, last_eval, eval_time, iteration_times, nan = None, {}, 0.0, [], float("nan")
    for iteration in range(start_iteration, args.num_iterations + 1):
        t_start = time.perf_counter()
        # ---- Rollout: num_steps steps of every environment, no host synchronisation ----
        storage.step.zero_()
        for _ in range(T):
            run_rollout_step()  # rollout_step(): normalize, act, simulate, store
        run_finish_rollout()  # finish_rollout(): values, time-out bootstrap, GAE
        global_step += W * batch_size
        if device.type == "cuda":
            torch.cuda.synchronize()  # so that the phase timings are real, not queued work
        t_rollout = time.perf_counter() - t_start

        # ---- PPO update: update_epochs passes over shuffled minibatches ----
        update_stats.zero_()
        for _epoch in range(args.update_epochs):
            perm = torch.randperm(batch_size, device=device)
            for start in range(0, batch_size, minibatch_size):
                mb.copy_(perm[start : start + minibatch_size])
                run_minibatch_update()  # ppo_loss(), KL-adaptive learning rate, backward, clip, Adam
        nonfinite = ec.nonfinite_tensors({"agent": agent, "normalizer": normalizer})
        explained_var = ec.explained_variance(storage.returns, storage.values, dist)  # over every process
        values = torch.cat(
            [
                update_stats / (args.update_epochs * args.num_minibatches),
                explained_var[None],
                agent.actor_logstd.exp().mean()[None],
                optimizer.param_groups[0]["lr"].view(1),
                nonfinite.float()[None],
            ]
        ).tolist()  # the iteration's one wait for the device; every value is the same in every process
        losses = dict(
            zip(
                [
                    "value_loss",
                    "policy_loss",
                    "entropy",
                    "old_approx_kl",
                    "approx_kl",
                    "clipfrac",
                    "explained_variance",
                    "action_std",
                    "learning_rate",
                    "nonfinite",
                ],
                values,
            )
        )
        t_update = time.perf_counter() - t_start - t_rollout
        if losses["nonfinite"] or not all(map(math.isfinite, values)):  # so every process stops here
            bad = ec.nonfinite_names({"agent": agent, "normalizer": normalizer}) or [
                k for k, v in losses.items() if not math.isfinite(v)
            ]
            if main_process:
                print(
                    f"error: training became non-finite at iteration {iteration} ({', '.join(bad[:4])}); nothing was "
                    f"saved from it. Last good checkpoint: {last_checkpoint or args.checkpoint or 'none yet'}. Try a "
                    "lower --learning-rate or --max-grad-norm",
                    file=sys.stderr,
                    flush=True,
                )
            logger.close()
            sys.exit(3)

        # ---- Logging: one host sync per iteration ----
        dist.sum_(list(env.stats.values()))  # every process's environments (sums per environment) in the figures
        stats = env.pop_stats()
        iteration_times.append(time.perf_counter() - t_start)
        sps = int(W * batch_size / iteration_times[-1])
        wall = time.time() - PROCESS_START
        scalars = {
            "charts/SPS": sps,
            "charts/learning_rate": losses["learning_rate"],
            "charts/action_std": losses["action_std"],
            **{
                f"losses/{k}": losses[k]
                for k in (
                    "value_loss",
                    "policy_loss",
                    "entropy",
                    "old_approx_kl",
                    "approx_kl",
                    "clipfrac",
                    "explained_variance",
                )
            },
            "perf/rollout_time": t_rollout,
            "perf/update_time": t_update,
            "perf/wall_time": wall,
            "metrics/mean_distance": stats["mean_distance"],
            "charts/nonfinite_resets": stats["nonfinite_resets"],
            "charts/overflows": stats["overflows"],
        }
        scalars.update(
            {f"metrics/{k}": stats[k] for k in ("success_rate", "hold_error", "time_to_reach") if k in stats}
        )
        if "episodes" in stats:
            scalars.update(
                {"charts/episodic_return": stats["episodic_return"], "charts/episodic_length": stats["episodic_length"]}
            )
            scalars.update({f"rewards/{n}": stats[f"reward_{n}"] for n in env.reward_names})
        logger.scalars(scalars, global_step)
        steady = iteration_times[2:][-20:]  # the first two iterations compile and record graphs
        left = float(np.median(steady)) * (args.num_iterations - iteration) if steady else float("nan")
        print(
            f"iter {iteration:5d}/{args.num_iterations} | steps {global_step:>11,} | SPS {sps:>9,} | "
            f"return {stats.get('episodic_return', nan):7.2f} | success {stats.get('success_rate', nan):.3f} | "
            f"hold err {stats.get('hold_error', nan):.4f} m | reach {stats.get('time_to_reach', nan):.2f} s | "
            f"{ec.duration(wall)}, {ec.duration(left)} left" + ec.fault_note(stats),
            flush=True,
        )

        # ---- Evaluation, checkpoint, video ----
        last = iteration == args.num_iterations
        due = args.eval_interval and (iteration % args.eval_interval == 0 or last)
        if main_process and stop.signal is None and due:
            t0 = time.time()
            last_eval = evaluate(agent, normalizer, device, args, min(args.eval_envs, N))
            logger.scalars(
                {
                    **{f"eval/{k}": v for k, v in last_eval.items()},
                    "eval/wall_time": t0 - PROCESS_START,
                    "eval/wall_time_without_evals": t0 - PROCESS_START - eval_time,
                },
                global_step,
            )
            print(
                f"  eval: success {last_eval['success_rate']:.3f} (95% CI {last_eval['success_rate_ci95_low']:.3f}-"
                f"{last_eval['success_rate_ci95_high']:.3f}, {last_eval['targets']} targets) | hold err "
                f"{last_eval['hold_error']:.4f} m | reach {last_eval['time_to_reach']:.2f} s | at "
                f"{ec.duration(t0 - PROCESS_START)} "
                f"({ec.duration(t0 - PROCESS_START - eval_time)} without evaluations)",
                flush=True,
            )
            eval_time += time.time() - t0
        stop_signal = dist.agree_on_signal(stop.signal)  # a signal to any process stops them all after this iteration
        if iteration % args.save_interval == 0 or last or stop_signal is not None:
            # Everything needed to go on exactly as if never stopped: every process's environments and generators
            # included (rank 0 writes them all), with a digest of each process's policy, which must be identical.
            payload = {
                "script": SCRIPT,
                "iteration": iteration,
                "global_step": global_step,
                "model": agent.state_dict(),
                "optimizer": optimizer.state_dict(),
                "normalizer": normalizer.state_dict(),
                "args": {**dataclasses.asdict(args), **requested_speed},
                "obs_dim": env.num_obs,
                "act_dim": env.num_actions,
                "wandb_id": logger.wandb_id,
            }
            own = {"env": env.state_dict(), "rng": ec.rng_state()}
            payload = dist.checkpoint(payload, own, state=(agent, normalizer, optimizer))  # None but on rank 0
            if payload is not None:
                ec.save_checkpoint(run_dir / "checkpoints" / f"ckpt_{iteration:06d}.pt", payload)
                ec.save_checkpoint(run_dir / "checkpoints" / "latest.pt", payload)
            last_checkpoint = run_dir / "checkpoints" / "latest.pt"
        if stop_signal is not None and not last:  # a signal during the last iteration: the run ends as finished
            logger.close()
            print(
                f"stopped after iteration {iteration}; resume with: {ec.launcher(dist)} {sys.argv[0]} --checkpoint "
                f"{last_checkpoint}",
                flush=True,
            )
            sys.exit(128 + stop_signal)
        if main_process and args.capture_video and (iteration % args.video_interval == 0 or last):
            t0 = time.time()
            video = run_dir / "videos" / f"iter_{iteration:06d}.mp4"
            record_video(agent, normalizer, device, args, video)
            logger.video(video, global_step)
            eval_time += time.time() - t0

    # The run's figures in one file: the last evaluation and rollout, and where the time went.
    if main_process:
        ec.write_json(
            run_dir / "metrics.json",
            {
                "iteration": args.num_iterations,
                "global_step": global_step,
                "wall_time_s": time.time() - PROCESS_START,
                "eval_and_video_time_s": eval_time,
                "last_eval": last_eval,
                "last_rollouts": stats,
            },
        )
    logger.close()
    print(
        f"done: {run_dir} (curves: tensorboard --logdir {run_dir.parent}; figures: {run_dir / 'metrics.json'})",
        flush=True,
    )


# ==================================================================================================================
# Evaluation and video (called by main)
# ==================================================================================================================
EVAL_UNITS = {"success_rate": "", "hold_error": "m", "reached_rate": "", "time_to_reach": "s", "mean_distance": "m"}


def evaluate_or_export(agent, normalizer, env, device, args: Args) -> None:
    """--export: the policy as TorchScript and ONNX with its contract in <run>/export; --eval: its metrics as a table
    and in <run>/eval.json (and a video with --capture-video)."""
    if args.export:
        policy = ec.deployed_policy(normalizer, agent.actor, clip=1.0)
        out_dir = ec.run_dir_of(args.checkpoint) / "export"
        for path in ec.export_policy(policy, env.num_obs, out_dir, policy_contract(env, args)):
            print(f"wrote {path}")
        return
    print(
        f"evaluating {args.checkpoint} on {args.num_envs} environments x {args.eval_episodes} episode(s)...",
        flush=True,
    )
    metrics = evaluate(agent, normalizer, device, args, args.num_envs)
    ec.print_metrics("evaluation (deterministic policy)", metrics, EVAL_UNITS)
    out = ec.run_dir_of(args.checkpoint) / "eval.json"
    ec.write_json(out, {"checkpoint": args.checkpoint, "num_envs": args.num_envs, **metrics})
    print(f"wrote {out}")
    if args.capture_video:
        video = out.with_name("eval_video.mp4")
        record_video(agent, normalizer, device, args, video)
        print(f"wrote {video}")


@torch.no_grad()
def evaluate(agent, normalizer, device, args: Args, num_envs: int) -> dict[str, float]:
    """The deterministic policy on fresh environments and targets for eval_episodes episodes. Success rate with a
    95% Wilson interval, hold error, share reached, time to first reach, and censored targets (see ReachEnv)."""
    with ec.separate_rng(args.seed + 10_000, device):  # the same environments every time; training's rng untouched
        env = ReachEnv(num_envs, device, ReachConfig.from_args(args))
        obs = env.reset()

        def eval_step():
            obs.copy_(env.step(agent.act_deterministic(normalizer(obs)))[0])

        run_eval_step = ec.cuda_graphed(eval_step, device) if args.cudagraphs else eval_step
        for _ in range(env.max_episode_length * args.eval_episodes):
            run_eval_step()
        s = env.pop_stats()
    low, high = ec.wilson_interval(s["successes"], s["targets"])
    return {
        "success_rate": s.get("success_rate", float("nan")),
        "success_rate_ci95_low": low,
        "success_rate_ci95_high": high,
        "hold_error": s.get("hold_error", float("nan")),
        "reached_rate": s.get("reached_rate", float("nan")),
        "time_to_reach": s.get("time_to_reach", float("nan")),
        "mean_distance": s["mean_distance"],
        "targets": int(s["targets"]),
        "censored_targets": int(s["censored_targets"]),
    }


# How each control type turns actions into the servos' ctrl (ActionHandler's formulas), for the export's contract.
ACTION_TO_CTRL = {
    "torque": "ctrl = c + clamp(a * torque_limit - c, -max_torque_step, max_torque_step)",
    "position": "ctrl = clamp(clamp(c + clamp(goal - c, -max_step, max_step), q - max_lead, q + max_lead), lower, "
    "upper) with goal = lower + (a + 1) / 2 * (upper - lower)",
    "position_delta": "ctrl = clamp(clamp(c + a * max_delta * max_step, q - max_lead, q + max_lead), lower, upper)",
}


def policy_contract(env: ReachEnv, args: Args) -> dict:
    """What a robot's code needs to run the exported policy, each section read from where the task reads it (the
    OBSERVATION table, the MuJoCo model as simulated, the action handler): observation layout, joints in action
    order, home pose, action clipping and the action-to-ctrl mapping with its limits, timing, the actuators' force
    laws, the folded-in normalizer; then where it came from (the checkpoint and its arguments) and the versions."""
    mjm, nu, h = env.sim.mjm, env.num_actions, env.actions_to_ctrl
    actuators = ec.actuator_contract(mjm)
    limits = {"lower": h.lower, "upper": h.upper, "max_step": h.max_step, "max_lead": h.max_lead}
    if env.cfg.control_type == "torque":
        limits = {"torque_limit": h.torque_limit, "max_torque_step": h.max_torque_step}
    elif env.cfg.control_type == "position_delta":
        limits["max_delta"] = torch.tensor(env.cfg.max_delta)
    return {
        "format": ec.CONTRACT_FORMAT,
        "script": SCRIPT,
        "task": "hold the end-effector site on a target position",
        "robot": {"model": f"assets/{ASSET}", "sha256": ec.file_sha256(ec.ASSETS / ASSET), "ee_site": EE_SITE},
        **ec.contract_io(OBSERVATION, env.num_obs, nu, args.obs_clip),
        "actions": {
            "joints": actuators["joints"],
            "clip": [-1.0, 1.0],
            "control_type": env.cfg.control_type,
            "to_ctrl": ACTION_TO_CTRL[env.cfg.control_type] + "; a: the action, c: the previous ctrl, q: the "
            "measured joint positions; every limit per joint",
            **{name: value.tolist() for name, value in limits.items()},
            "ctrl_at_reset": "zero torque" if env.cfg.control_type == "torque" else "the measured joint positions",
            "home_pose": env.sim.default_qpos.tolist(),
        },
        "timing": {"policy_dt": env.dt, "physics_dt": float(mjm.opt.timestep), "decimation": env.sim.decimation},
        "actuators": actuators,
        "conventions": {"frames": "world: z up, the arm's base at the origin"},
        "task_args": {name: getattr(args, name) for name in TASK_ARGS},
        **ec.contract_provenance(args.checkpoint, SCRIPT),
    }


@torch.no_grad()
def record_video(agent, normalizer, device, args: Args, path: Path) -> None:
    """One environment under the deterministic policy, rendered on the host; the red sphere is the target. Target,
    end-effector and distance frame by frame go to a JSON file beside the mp4."""
    with ec.separate_rng(args.seed + 20_000, device):
        env = ReachEnv(1, device, ReachConfig.from_args(args))
        obs, frames, log = env.reset(), [], []
        with ec.Renderer(env.sim, camera="front") as renderer:
            for _ in range(args.video_length):
                target = env.target[0].cpu().numpy().tolist()  # the target this step aims at (it may be replaced)
                obs, *_ = env.step(agent.act_deterministic(normalizer(obs)))
                frames.append(renderer.render(0))
                log.append(
                    {
                        "t": len(log) * env.dt,
                        "target": target,
                        "ee": env.ee_pos[0].cpu().numpy().tolist(),
                        "distance": float(env.distance[0]),
                    }
                )
    ec.save_video(frames, path, fps=1.0 / env.dt)
    ec.write_json(path.with_suffix(".json"), log)


if __name__ == "__main__":
    ec.run_main(main, ARGS, Args, SCRIPT, TASK_ARGS)
