"""PPO that teaches a 7-joint Franka Panda class arm to put its end-effector on any target, thousands of arms at once.

    python ppo_isaac_reach.py --num-envs 4096 --track
    python ppo_isaac_reach.py --control-type position      # or torque; position_delta is the default

The whole pipeline stays on the device, as in Isaac Gym (here on MuJoCo Warp):
  policy (torch) -> ActionHandler: joint torques, joint targets, or target increments, written into the ctrl tensor
  -> 4 physics sub-steps at 200 Hz replayed from one CUDA graph -> qpos/qvel/site views refreshed in place
  -> observations, rewards, target resampling and per-environment resets computed in torch -> rollout buffer -> PPO.
Nothing is copied to the host inside the rollout loop; statistics are read once per iteration. On a GPU, that
whole rollout step (policy, physics, observations, rewards, resets, storage) is recorded once as a CUDA graph and
replayed, and so is each minibatch step of the update (--no-cudagraphs runs the same code eagerly).

Read top to bottom: Args, the environment (ActionHandler, ReachEnv and its reward terms), the observation normalizer,
ActorCritic, then PPO (rollout, GAE, update) with logging, checkpoints, evaluation, export and video.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.distributions import Normal
from torch.utils.tensorboard import SummaryWriter

import envs_common as ec
from envs_common import UserError

SCRIPT = Path(__file__).stem
PROCESS_START = time.time()  # wall-clock figures count from here: start-up (imports, kernel loading) included
ASSET = "panda.xml"
CONTROL_TYPES = ("torque", "position", "position_delta")


@dataclass
class Args:
    exp_name: str = SCRIPT
    """the name of this experiment (the first part of the run's directory name)"""
    seed: int = 1
    """seed of the experiment (Python, NumPy, torch)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    device: str = "auto"
    """'auto' (the first GPU if there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'"""
    track: bool = False
    """if toggled, this experiment is tracked with Weights and Biases"""
    wandb_project_name: str = "isaac-ppo"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of the wandb project"""
    capture_video: bool = False
    """if toggled, render an mp4 of one environment every `video_interval` iterations (in runs/<run>/videos)"""
    video_interval: int = 100
    """iterations between two videos"""
    video_length: int = 250
    """policy steps (at 50 Hz) in one video"""
    save_interval: int = 50
    """iterations between two checkpoints (one is always written at the end)"""
    checkpoint: Optional[str] = None
    """a checkpoint to resume training from, or the policy to play with --eval or to write out with --export"""
    eval: bool = False
    """play the deterministic policy of --checkpoint on fresh targets and print its metrics; no training"""
    export: bool = False
    """write the policy of --checkpoint, observation normalizer folded in, as TorchScript and ONNX"""

    tf32: bool = True
    """on a GPU, let float32 matrix products use TF32 tensor cores (10-bit mantissa inputs, float32 accumulation):
    the output layers, and every layer with --no-bf16, where it makes the update faster (measured in the README's
    Performance section); PPO's noisy gradients do not need the last bits (--no-tf32: full float32)"""
    compile: bool = True
    """on a GPU, torch.compile the rollout step and the minibatch losses: fuses their few hundred small kernels
    into a few dozen (measured in the README's Performance section), at the cost of compiling them at start-up
    (about 30 s on an H100 the first time, then about 8 s from torch's on-disk cache). The CPU path runs eagerly"""
    bf16: bool = True
    """on a GPU, run the hidden layers of the actor and the critic in bfloat16 (torch.autocast; float32 output
    layers, losses, gradients and Adam): half the memory traffic of the update's activations and twice TF32's
    tensor-core rate (measured in the README's Performance section). --no-bf16: TF32 or float32, as --tf32 says"""
    cudagraphs: bool = True
    """on a GPU, record one rollout step (policy, physics, observations, rewards, resets, storage) as a CUDA graph
    once and replay it: one launch per step instead of hundreds of small ones (--no-cudagraphs: plain eager torch)"""

    # Sizes
    num_envs: Optional[int] = None
    """number of parallel environments (default: 4096 on a GPU, 256 on the CPU)"""
    num_iterations: Optional[int] = None
    """number of PPO iterations, each of num_envs * num_steps environment steps (default: 300 on a GPU, 60 on the CPU)"""
    num_steps: int = 24
    """environment steps per environment per iteration (rollout length)"""

    # PPO (rsl_rl's values, as the locomotion script; they also train Isaac Lab's reach task)
    learning_rate: float = 1e-3
    """the initial learning rate of Adam; then adapted to keep the KL divergence near `desired_kl`"""
    desired_kl: float = 0.01
    """target KL divergence between successive policies for the adaptive learning rate (0 turns adaptation off)"""
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
    """coefficient of the entropy bonus (Isaac Lab's reach task uses 0.01 with rewards scaled by dt)"""
    vf_coef: float = 1.0
    """coefficient of the value loss"""
    max_grad_norm: float = 1.0
    """the maximum norm for gradient clipping"""
    init_noise_std: float = 1.0
    """initial standard deviation of the Gaussian policy (actions are clamped to [-1, 1] by the environment)"""
    obs_clip: float = 5.0
    """normalized observations are clipped to [-obs_clip, obs_clip]"""

    # Task
    control_type: str = "position_delta"
    """torque, position or position_delta. torque: action x torque limit; position: action mapped into the joint
    range; position_delta: target += action x max_delta x the joint's largest step; every mode rate-limited to the
    arm's published speed limits, see ActionHandler (with --checkpoint, the checkpoint's control type is used)"""
    max_delta: float = 1.0
    """position_delta: largest change of a joint target per policy step, as a fraction (0 to 1) of the most that
    joint may move in one step (SPEED_FRACTION x its published speed limit x 0.02 s)"""
    episode_length_s: float = 5.0
    """episode length in seconds (fixed: the arm cannot fail, every episode ends in a time-out that is bootstrapped)"""
    target_timeout_s: float = 2.5
    """seconds the arm has to reach a target before it is counted as missed and a new one is sampled"""
    success_threshold: float = 0.02
    """a target counts as reached when the end-effector is closer than this (m)"""
    reset_noise: float = 0.2
    """at a reset each joint starts at the home pose plus U(-reset_noise, reset_noise) rad"""
    eval_interval: int = 50
    """iterations between two deterministic evaluations logged under eval/, plus one before training (0: never)"""
    eval_envs: int = 1024
    """environments of a deterministic evaluation (at most num_envs)"""
    eval_steps: int = 500
    """policy steps of a deterministic evaluation (500 = 10 s = two episodes)"""


# ==================================================================================================================
# The environment: a 7-joint arm moving its end-effector onto targets sampled in a reachable box
# ==================================================================================================================
# Reward terms are summed per policy step WITHOUT a dt factor: each scale is the reward per step (50 Hz).
# The terms follow Isaac Lab's reach task (isaaclab_tasks/manager_based/manipulation/reach/reach_env_cfg.py:
# position_tracking -0.2, position_tracking_fine_grained 0.1 with 1 - tanh(d / 0.1), action_rate -1e-4,
# joint_vel -1e-4, all times dt), rescaled to per-step values, with a sharper fine term (2 cm is the bar here)
# and a success bonus, since a reached target is replaced by a new one.
REWARD_SCALES = {
    "distance": -1.0,         # end-effector to target distance (m): pulls from anywhere in the workspace
    "distance_fine": 0.5,     # exp(-d / FINE_SIGMA): steep in the last few centimetres, where -d is flat
    "success": 10.0,          # once per reached target; must beat hovering just outside the threshold
    "action_rate": -0.005,    # |a_t - a_{t-1}|^2: smooth commands
    "joint_vel": -0.001,      # |joint velocity|^2 (rad/s): no flailing, matters most under torque control
}
FINE_SIGMA = 0.05  # m
# Targets are sampled uniformly in this box (m, world frame, base at the origin): in front of the arm, inside its
# reach with margin, away from the base column and the floor.
TARGET_LOW, TARGET_HIGH = (0.3, -0.35, 0.15), (0.7, 0.35, 0.65)


# Speed limits. The arm's published joint speed limits and torque rate limit (Franka Control Interface documentation,
# "Robot and interface specifications", Limits for Panda: 2.175 rad/s for joints 1-4, 2.61 rad/s for 5-7, 1000 N m/s)
# are stored in panda.xml as <custom> numerics, read once. MuJoCo has no joint speed limit: each action mapping keeps
# every actuator from driving a joint faster than SPEED_FRACTION of its limit; the rest is margin for what the
# actuators cannot hold back, the motion of the other joints (near coaxial joints 1 and 3, or 5 and 7, one joint's
# swing speeds up the other). With 0.6, random and saturated bang-bang actions peak at 0.71-0.77 (position modes) and
# 0.88-0.90 (torque) of the limits over 4 seeds; with 0.7, torque control passed them (1.08). Measured at every physics
# step by tests/test_reach.py::test_joint_speeds_stay_within_the_published_limits.
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
        raise UserError(f"{ASSET} needs <custom><numeric name=\"{name}\" data=\"...\"/></custom> with {size} values "
                        "(one per actuator)")
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

    def __init__(self, control_type: str, lower, upper, torque_limit, max_delta: float, speed_limit, kp, kv, dt: float,
                 torque_rate_limit):
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
    """Batched reaching task. All state lives in (num_envs, ...) tensors on the device.

    Observation layout (30 values; normalized later by ObservationNormalizer):
      [0:7]   joint positions scaled to [-1, 1] over their ranges   [7:14]  joint velocities (rad/s)
      [14:17] end-effector position (m, world)                      [17:20] target position (m, world)
      [20:23] target - end-effector (m)                             [23:30] last actions
    Targets: resampled when reached (closer than success_threshold) or after target_timeout_s. Episodes have a
    fixed length (a time-out, bootstrapped), then the arm restarts near the home pose.
    """

    num_obs, num_actions = 30, 7

    def __init__(self, num_envs: int, device: torch.device, args: Args):
        self.args, self.device, self.num_envs = args, device, num_envs
        mjm = ec.load_model(ASSET)
        if mjm.nu != 7 or mjm.nq != 7 or list(mjm.actuator_trnid[:, 0]) != list(range(7)):
            raise UserError(f"{ASSET} must have 7 joints driven by 7 actuators in the same order")
        # Speed limits and the servos' gains, read before make_torque_actuators replaces the servos.
        speed_limit = model_numeric(mjm, SPEED_LIMIT_FIELD, mjm.nu)
        torque_rate_limit = model_numeric(mjm, TORQUE_RATE_FIELD, mjm.nu)
        kp, kv = mjm.actuator_gainprm[:, 0].copy(), -mjm.actuator_biasprm[:, 2]  # position servo: bias (0, -kp, -kv)
        if args.control_type == "torque":
            make_torque_actuators(mjm, SPEED_FRACTION * speed_limit)
        # The asset's physics step (200 Hz), a 50 Hz policy: Isaac Lab's reach task runs at 60 Hz, legged_gym at 50.
        decimation = max(1, round(0.02 / mjm.opt.timestep))
        self.sim = s = ec.BatchedSim(mjm, num_envs, device, decimation=decimation)
        self.dt = mjm.opt.timestep * decimation
        self.max_episode_length = int(round(args.episode_length_s / self.dt))
        self.target_steps = int(round(args.target_timeout_s / self.dt))
        self.ee_site, self.target_mocap = s.site_id("ee"), int(mjm.body_mocapid[s.body_id("target")])

        f32 = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32, device=device)  # noqa: E731
        self.lower, self.upper = f32(mjm.jnt_range[:7, 0]), f32(mjm.jnt_range[:7, 1])
        self.actions_to_ctrl = ActionHandler(args.control_type, self.lower, self.upper,
                                             f32(mjm.actuator_forcerange[:, 1]), args.max_delta, f32(speed_limit),
                                             f32(kp), f32(kv), self.dt, f32(torque_rate_limit))
        self.target_low, self.target_high = f32(TARGET_LOW), f32(TARGET_HIGH)
        self.dof_pos, self.dof_vel = s.qpos, s.qvel  # a fixed base: every coordinate is a joint

        z = lambda *shape: torch.zeros(num_envs, *shape, device=device)  # noqa: E731
        self.actions, self.last_actions = z(7), z(7)
        self.target = s.mocap_pos[:, self.target_mocap]  # a view: the renderer draws each env's target sphere
        self.reached = z().bool()
        self.broken = z().bool()  # worlds that blew up or overflowed this step
        self.episode_length = torch.zeros(num_envs, dtype=torch.long, device=device)
        self.target_time = torch.zeros(num_envs, dtype=torch.long, device=device)
        self.reward_names = list(REWARD_SCALES)
        self.episode_sums = {name: z() for name in self.reward_names}
        self.episode_return = z()
        # Statistics summed per environment on the device (elementwise adds, no reduction inside the step) and over
        # environments once per iteration, in pop_stats.
        self.stats = {k: z() for k in
                      ["episodes", "return", "length", "reached", "missed", "final_dist", "reach_time", "dist",
                       "dist_steps", "nonfinite", "overflows"] + [f"rew_{n}" for n in self.reward_names]}

    # Task state carried from one step to the next (with the simulator's state, which holds the targets as mocap
    # bodies; random numbers come from torch's global generator, saved in the checkpoint's "rng"): a checkpoint that
    # holds it resumes bit for bit.
    STATE = ("actions", "last_actions", "episode_length", "target_time", "episode_return")

    def state_dict(self) -> dict:
        return {"sim": self.sim.get_state(),
                "episode_sums": {k: v.clone() for k, v in self.episode_sums.items()},
                **{k: getattr(self, k).clone() for k in self.STATE}}

    def load_state_dict(self, state: dict) -> torch.Tensor:
        """Restore a state_dict() and return the observations it gives."""
        self.sim.set_state(state["sim"])
        for k, v in self.episode_sums.items():
            v.copy_(state["episode_sums"][k])
        for k in self.STATE:
            getattr(self, k).copy_(state[k])
        return self._observe()

    # ------------------------------------------------------------------------------------------------------------
    def _rand(self, *shape, lo=0.0, hi=1.0):
        # torch's global generator (seed_everything seeds it, checkpoints save it): a private torch.Generator would
        # stop torch.compile from tracing the step (--compile)
        return lo + (hi - lo) * torch.rand(*shape, device=self.device)

    def _sample_targets(self, mask: torch.Tensor):
        new = self.target_low + (self.target_high - self.target_low) * self._rand(self.num_envs, 3)
        self.target.copy_(torch.where(mask[:, None], new, self.target))
        self.target_time.masked_fill_(mask, 0)

    def reset(self, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Reset the environments in `mask` (all if None) on the device and return all observations."""
        if mask is None:
            mask = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        s, a = self.sim, self.args
        qpos = s.default_qpos + self._rand(self.num_envs, 7, lo=-a.reset_noise, hi=a.reset_noise)
        qpos = torch.clamp(qpos, self.lower, self.upper)
        s.reset(mask, qpos, ctrl=self.actions_to_ctrl.reset_ctrl(qpos))
        m = mask[:, None]
        self.actions.masked_fill_(m, 0.0)
        self.last_actions.masked_fill_(m, 0.0)
        self.episode_length.masked_fill_(mask, 0)
        self._sample_targets(mask)
        return self._observe()

    def desynchronize(self) -> None:
        """Start every environment at a random point of its episode and of its first target (rsl_rl's
        init_at_random_ep_len): otherwise all of them time out on the same step, forever, and each rollout sees
        either no ending at all or thousands at once."""
        self.episode_length.copy_((self._rand(self.num_envs) * self.max_episode_length).long())
        self.target_time.copy_((self._rand(self.num_envs) * self.target_steps).long())

    @property
    def ee_pos(self) -> torch.Tensor:
        return self.sim.site_xpos[:, self.ee_site]

    def _observe(self) -> torch.Tensor:
        q_scaled = 2.0 * (self.dof_pos - self.lower) / (self.upper - self.lower) - 1.0
        ee = self.ee_pos
        return torch.cat([q_scaled, self.dof_vel, ee, self.target, self.target - ee, self.actions], dim=-1)

    # ------------------------------------------------------------------------------------------------------------
    def step(self, actions: torch.Tensor):
        """Apply actions for one policy step. Returns (obs, reward, terminated, truncated, final_obs): for
        environments whose episode ended, obs is already the first observation of the next one and final_obs their
        last one (to bootstrap the value on time-outs). terminated is always False: an arm cannot fail here.

        Persistent state is only ever written in place (copy_, +=, masked_fill_) and nothing branches on tensor
        values, so that this can be recorded in a CUDA graph (--cudagraphs) and replayed."""
        self.actions.copy_(actions.clamp(-1.0, 1.0))
        self.sim.ctrl.copy_(self.actions_to_ctrl(self.actions, self.sim.ctrl, self.dof_pos))
        self.sim.step()
        self.episode_length += 1
        self.target_time += 1
        # A world that blew up (a NaN or an infinity in its state) or whose constraint buffers overflowed is reset
        # below; its last step counts for nothing: reward 0, no bootstrap (it ends as "terminated"), no statistics.
        nonfinite, overflowed = self.sim.nonfinite(), self.sim.overflowed()
        self.broken = nonfinite | overflowed

        self.distance = torch.where(self.broken, 1.0, (self.target - self.ee_pos).norm(dim=-1))
        self.reached = (self.distance < self.args.success_threshold) & ~self.broken
        missed = (self.target_time >= self.target_steps) & ~self.reached & ~self.broken
        truncated = (self.episode_length >= self.max_episode_length) & ~self.broken

        reward = self._compute_reward()
        self._accumulate_stats(reward, missed, truncated)
        self.stats["nonfinite"] += nonfinite
        self.stats["overflows"] += overflowed
        self._sample_targets(self.reached | missed)  # a new target, same episode
        self.last_actions.copy_(self.actions)

        final_obs = torch.where(self.broken[:, None], 0.0, self._observe())  # NaN * 0 is NaN: select, never multiply
        obs = self.reset(truncated | self.broken)
        return obs, reward, self.broken.clone(), truncated, final_obs

    def _compute_reward(self) -> torch.Tensor:
        total = torch.zeros(self.num_envs, device=self.device)
        for name in self.reward_names:
            term = torch.where(self.broken, 0.0, getattr(self, f"_reward_{name}")() * REWARD_SCALES[name])
            self.episode_sums[name] += term
            total += term
        return total

    def _accumulate_stats(self, reward, missed, done):
        st, ended = self.stats, self.reached | missed  # targets that ended this step
        self.episode_return += reward
        st["episodes"] += done
        st["return"] += self.episode_return * done
        st["length"] += self.episode_length * done
        st["reached"] += self.reached
        st["missed"] += missed
        st["final_dist"] += self.distance * ended
        st["reach_time"] += self.target_time * self.reached
        st["dist"] += self.distance * ~self.broken
        st["dist_steps"] += ~self.broken
        for name in self.reward_names:
            st[f"rew_{name}"] += self.episode_sums[name] * done
            self.episode_sums[name].masked_fill_(done | self.broken, 0.0)
        self.episode_return.masked_fill_(done | self.broken, 0.0)

    def pop_stats(self) -> dict[str, float]:
        """Means since the last call (one host sync). Target metrics are over the targets that ended (reached or
        missed); episode means over the episodes that ended."""
        values = dict(zip(self.stats, torch.stack(list(self.stats.values())).sum(dim=1).tolist()))
        for t in self.stats.values():
            t.zero_()
        targets = values["reached"] + values["missed"]
        out = {"mean_distance": values["dist"] / max(values["dist_steps"], 1.0), "targets": targets,
               "nonfinite_resets": values["nonfinite"], "overflows": values["overflows"]}
        if targets > 0:
            out.update(success_rate=values["reached"] / targets, final_distance=values["final_dist"] / targets)
        if values["reached"] > 0:
            out["time_to_reach"] = values["reach_time"] / values["reached"] * self.dt
        if values["episodes"] > 0:
            episodes = values["episodes"]
            out.update(episodes=episodes, episodic_return=values["return"] / episodes,
                       episodic_length=values["length"] / episodes)
            out.update({f"reward_{n}": values[f"rew_{n}"] / episodes for n in self.reward_names})
        return out

    # ---- Reward terms: one small function each, scaled by REWARD_SCALES ----------------------------------------
    def _reward_distance(self):
        return self.distance

    def _reward_distance_fine(self):
        return torch.exp(-self.distance / FINE_SIGMA)

    def _reward_success(self):
        return self.reached.float()

    def _reward_action_rate(self):
        return (self.actions - self.last_actions).square().sum(dim=1)

    def _reward_joint_vel(self):
        return self.dof_vel.square().sum(dim=1)


# ==================================================================================================================
# Observation normalizer
# ==================================================================================================================
class ObservationNormalizer(nn.Module):
    """Running mean and variance of every observation over all environments and steps seen so far.

    Each batch is merged exactly (Chan et al.'s parallel algorithm), so the statistics equal those of all batches
    concatenated. Saved with the model (buffers), frozen at evaluation time.
    """

    def __init__(self, size: int, clip: float = 5.0, eps: float = 1e-8):
        super().__init__()
        self.clip, self.eps = clip, eps
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("var", torch.ones(size))
        # float64: exact sample counts past 2^24. Shape (1,), not a 0-d scalar: torch.compile (2.13, CPU) drops
        # in-place writes to 0-d float64 buffers.
        self.register_buffer("count", torch.zeros(1, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        batch_mean, batch_var = x.mean(dim=0), x.var(dim=0, unbiased=False)
        total = self.count + n
        w = (n / total).float()  # weight of the new batch
        delta = batch_mean - self.mean
        self.mean += delta * w
        # M2 (sum of squared deviations) of the union = M2_a + M2_b + delta^2 * n_a * n_b / n
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
    learnable log standard deviation for the Gaussian policy."""

    def __init__(self, num_obs: int, num_actions: int, init_noise_std: float = 1.0, hidden=(256, 128, 64)):
        super().__init__()
        self.actor = mlp([num_obs, *hidden, num_actions], out_std=0.01)
        self.critic = mlp([num_obs, *hidden, 1], out_std=1.0)
        self.actor_logstd = nn.Parameter(torch.full((num_actions,), float(np.log(init_noise_std))))
        self.bf16 = False  # main() sets it from --bf16, on a GPU

    def _mlp(self, net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        # Hidden layers in bfloat16 with --bf16 (the matrix products accumulate in float32); the output layer in
        # float32, so that action means and values keep float32 resolution: PPO's probability ratios and value
        # targets are differences of these.
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = net[:-1](x)
        return net[-1](hidden.float())

    def get_value(self, x):
        return self._mlp(self.critic, x).squeeze(-1)

    def get_action(self, x):
        """Sample an action and its log-probability: the rollout's step (the critic runs after the rollout)."""
        mean = self._mlp(self.actor, x)
        std = self.actor_logstd.exp().expand_as(mean)
        action = mean + std * torch.randn_like(mean)  # as dist.sample(), without its host-side check of std
        return action, Normal(mean, std, validate_args=False).log_prob(action).sum(-1)

    def get_action_and_value(self, x, action):
        """Log-probability and entropy of the rollout's `action` under the current policy, and the value: the
        update's forward pass."""
        mean = self._mlp(self.actor, x)
        # validate_args=False: the argument checks would read tensors on the host, a sync inside a CUDA graph
        dist = Normal(mean, self.actor_logstd.exp().expand_as(mean), validate_args=False)
        return action, dist.log_prob(action).sum(-1), dist.entropy().sum(-1), self.get_value(x)

    def act_deterministic(self, x):
        return self._mlp(self.actor, x)


# ==================================================================================================================
# PPO pieces
# ==================================================================================================================
def compute_gae(rewards, values, dones, next_value, gamma: float, gae_lambda: float):
    """Generalized advantage estimation over a (T, N) rollout.

    dones[t] is True when the episode ended after step t (terminated or timed out); a time-out's reward already
    holds gamma * V(final observation), so cutting the bootstrap at every done is right for both kinds of ending.
    next_value is V of the observation after the last step. Returns (advantages, returns).
    """
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        next_v = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        not_done = 1.0 - dones[t].to(rewards.dtype)
        delta = rewards[t] + gamma * next_v * not_done - values[t]
        last = delta + gamma * gae_lambda * not_done * last
        advantages[t] = last
    return advantages, advantages + values


@dataclass
class RolloutStorage:
    """The rollout, preallocated on the device: row t of each (T, N, ...) buffer holds rollout step t of every
    environment. `step` is t as a device tensor, so that one recorded CUDA graph can write any row."""

    obs: torch.Tensor          # (T, N, num_obs) normalized observations the policy acted on
    actions: torch.Tensor      # (T, N, num_actions)
    logprobs: torch.Tensor     # (T, N) log-probability of each action under the policy that sampled it
    rewards: torch.Tensor      # (T, N) with gamma * V(final observation) added on time-outs (by finish_rollout)
    dones: torch.Tensor        # (T, N) bool: the episode ended after this step (terminated or timed out)
    truncated: torch.Tensor    # (T, N) bool: ... by a time-out
    final_obs: torch.Tensor    # (T, N, num_obs) normalized last observation of the episodes that ended
    values: torch.Tensor       # (T, N) critic's value of obs              } filled after the rollout,
    advantages: torch.Tensor   # (T, N) GAE advantages                      } by finish_rollout
    returns: torch.Tensor      # (T, N) advantages + values                 }
    step: torch.Tensor         # (1,) long: the row the next rollout step writes
    next_obs: torch.Tensor     # (N, num_obs) raw observation the policy acts on next

    @classmethod
    def allocate(cls, T: int, N: int, num_obs: int, num_actions: int, device) -> RolloutStorage:
        z = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        return cls(obs=z(T, N, num_obs), actions=z(T, N, num_actions), logprobs=z(T, N), rewards=z(T, N),
                   dones=z(T, N, dtype=torch.bool), truncated=z(T, N, dtype=torch.bool), final_obs=z(T, N, num_obs),
                   values=z(T, N), advantages=z(T, N), returns=z(T, N), step=z(1, dtype=torch.long),
                   next_obs=z(N, num_obs))


def make_rollout_step(env: ReachEnv, agent: ActorCritic, normalizer: ObservationNormalizer, storage: RolloutStorage,
                      args: Args):
    """One environment step of the rollout: normalize, act, simulate, store in row `storage.step`. It reads and
    writes its tensors in place only, so that on a GPU it can be recorded once as a CUDA graph and replayed.
    With --compile, torch.compile fuses its few hundred small torch operations into a few dozen kernels."""

    @torch.no_grad()
    def rollout_step() -> None:
        normalizer.update(storage.next_obs)
        obs = normalizer(storage.next_obs)
        action, logprob = agent.get_action(obs)
        next_obs, reward, terminated, truncated, final_obs = env.step(action)
        for buf, x in ((storage.obs, obs), (storage.actions, action), (storage.logprobs, logprob),
                       (storage.rewards, reward), (storage.dones, terminated | truncated),
                       (storage.truncated, truncated), (storage.final_obs, normalizer(final_obs))):
            buf.index_copy_(0, storage.step, x.unsqueeze(0))
        storage.next_obs.copy_(next_obs)
        storage.step.add_(1)

    if args.compile:
        # Random numbers from torch's own kernels, as in eager mode (inductor would draw others): --compile changes
        # the speed, not the rollout. The physics is not traced: envs_common runs MuJoCo Warp as it is.
        torch._inductor.config.fallback_random = True
        return torch.compile(rollout_step, dynamic=False)
    return rollout_step


def make_finish_rollout(agent: ActorCritic, normalizer: ObservationNormalizer, storage: RolloutStorage, args: Args):
    """After the rollout: the critic's values of every stored observation, the bootstrap of time-outs, and GAE,
    written into `storage`. The critic does not change during a rollout, so it runs here once on all T * N rows
    rather than on N rows at every step: one large batch instead of 2 * T small ones (measured in the README's
    Performance section). In place and without host syncs, like the rollout step: on a GPU it is recorded as one
    CUDA graph (not compiled: it runs once per iteration, and compiling it would lengthen the start-up)."""

    @torch.no_grad()
    def finish_rollout() -> None:
        T, N = storage.rewards.shape
        storage.values.copy_(agent.get_value(storage.obs.view(T * N, -1)).view(T, N))
        # Time-outs are not failures: bootstrap with the value of the last observation of the episode.
        final_values = agent.get_value(storage.final_obs.view(T * N, -1)).view(T, N)
        storage.rewards.add_(args.gamma * final_values * storage.truncated)
        next_value = agent.get_value(normalizer(storage.next_obs))
        advantages, returns = compute_gae(storage.rewards, storage.values, storage.dones, next_value, args.gamma,
                                          args.gae_lambda)
        storage.advantages.copy_(advantages)
        storage.returns.copy_(returns)

    return finish_rollout


def make_ppo_update(agent: ActorCritic, optimizer: torch.optim.Optimizer, storage: RolloutStorage, args: Args):
    """PPO's clipped surrogate on the rollout in `storage` (advantages and returns filled by finish_rollout):
    update_epochs passes over shuffled minibatches.

    Returns update() -> the losses and statistics as device tensors (reading them is the
    caller's one host sync). One minibatch step (forward, backward, gradient clipping, Adam, learning rate) reads
    its rows through the index tensor `mb` and writes everything in place, so that on a GPU it is recorded once
    as a CUDA graph and replayed (--cudagraphs): a few hundred small kernels at the cost of one launch."""
    device = storage.obs.device
    batch_size = storage.rewards.numel()
    minibatch_size = batch_size // args.num_minibatches
    b_obs, b_actions = storage.obs.view(batch_size, -1), storage.actions.view(batch_size, -1)
    b_logprobs, b_values = storage.logprobs.view(-1), storage.values.view(-1)
    b_advantages, b_returns = storage.advantages.view(-1), storage.returns.view(-1)
    mb = torch.zeros(minibatch_size, dtype=torch.long, device=device)  # the rows of the current minibatch
    lr = optimizer.param_groups[0]["lr"]  # a tensor on the device, shared by every parameter group
    last = torch.zeros(4, device=device)  # value loss, policy loss, entropy, old approx KL of the last minibatch
    sums = torch.zeros(2, device=device)  # approx KL and clip fraction, summed over the minibatches

    def minibatch_losses():
        _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb], b_actions[mb])
        logratio = newlogprob - b_logprobs[mb]
        ratio = logratio.exp()
        with torch.no_grad():
            old_approx_kl = (-logratio).mean()
            approx_kl = ((ratio - 1) - logratio).mean()
            clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
        mb_adv = b_advantages[mb]
        if args.norm_adv:
            mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
        pg_loss = torch.max(-mb_adv * ratio, -mb_adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
        if args.clip_vloss:
            v_clipped = b_values[mb] + (newvalue - b_values[mb]).clamp(-args.clip_coef, args.clip_coef)
            v_loss = 0.5 * torch.max((newvalue - b_returns[mb]).square(), (v_clipped - b_returns[mb]).square()).mean()
        else:
            v_loss = 0.5 * (newvalue - b_returns[mb]).square().mean()
        entropy_loss = entropy.mean()
        loss = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss
        return loss, v_loss, pg_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac

    losses_fn = torch.compile(minibatch_losses, dynamic=False) if args.compile else minibatch_losses

    def minibatch_step() -> None:
        loss, v_loss, pg_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac = losses_fn()
        optimizer.zero_grad(set_to_none=True)  # in a CUDA graph, backward then writes the gradients (no zeroing pass)
        loss.backward()
        nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
        optimizer.step()
        # KL-adaptive learning rate (rsl_rl's schedule): keep each update's step in policy space steady.
        # Computed on the device: no .item(), so the GPU never waits for Python between minibatches.
        if args.desired_kl > 0:
            factor = torch.where(approx_kl > 2.0 * args.desired_kl, 1 / 1.5,
                                 torch.where(approx_kl < args.desired_kl / 2.0, 1.5, 1.0))
            lr.copy_((lr * factor).clamp(1e-5, 1e-2))
        with torch.no_grad():
            last.copy_(torch.stack([v_loss, pg_loss, entropy_loss, old_approx_kl]))
            sums.add_(torch.stack([approx_kl, clipfrac]))

    run_minibatch_step = ec.cuda_graphed(minibatch_step, device) if args.cudagraphs else minibatch_step

    def update() -> dict[str, torch.Tensor]:
        sums.zero_()
        for _ in range(args.update_epochs):
            perm = torch.randperm(batch_size, device=device)
            for start in range(0, batch_size, minibatch_size):
                mb.copy_(perm[start:start + minibatch_size])
                run_minibatch_step()
        explained_var = 1 - (b_returns - b_values).var() / b_returns.var().clamp(min=1e-8)
        n = args.update_epochs * args.num_minibatches
        return {"value_loss": last[0], "policy_loss": last[1], "entropy": last[2], "old_approx_kl": last[3],
                "approx_kl": sums[0] / n, "clipfrac": sums[1] / n, "explained_variance": explained_var,
                "action_std": agent.actor_logstd.exp().mean(), "learning_rate": lr}

    return update


class DeployedPolicy(nn.Module):
    """Raw observation -> action in [-1, 1], with the normalizer folded in: what a robot runs (its controller then
    applies the same ActionHandler mapping)."""

    def __init__(self, normalizer: ObservationNormalizer, actor: nn.Module):
        super().__init__()
        self.normalizer, self.actor = normalizer, actor

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(self.normalizer(obs)).clamp(-1.0, 1.0)


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic: write a temporary file, then rename over the target, so a kill never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave an empty file either
    os.replace(tmp, path)


def load_checkpoint(path: str, device: torch.device) -> dict:
    if os.path.isdir(path):
        raise UserError(f"--checkpoint {path} is a directory: give a file in it, e.g. {Path(path) / 'latest.pt'}")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path} (look in runs/<run>/checkpoints/)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or not a torch file: one message
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): it is truncated or not a "
                        "checkpoint; use another one, e.g. runs/<run>/checkpoints/latest.pt") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
        raise UserError(f"{path} is not a checkpoint of {SCRIPT}.py (it comes from "
                        f"{ckpt.get('script', 'something else') if isinstance(ckpt, dict) else 'something else'})")
    if (ckpt["obs_dim"], ckpt["act_dim"]) != (ReachEnv.num_obs, ReachEnv.num_actions):
        raise UserError(f"{path} has {ckpt['obs_dim']} observations and {ckpt['act_dim']} actions; "
                        f"this task has {ReachEnv.num_obs} and {ReachEnv.num_actions}")
    return ckpt


# The arguments that define what an action means: a policy only makes sense with the ones it was trained with.
POLICY_ARGS = ("control_type", "max_delta")


def adopt_policy_args(args: Args, ckpt: dict) -> None:
    for name in POLICY_ARGS:
        saved = ckpt["args"].get(name, getattr(args, name))
        if saved != getattr(args, name):
            print(f"note: using the checkpoint's --{name.replace('_', '-')} {saved} (its policy was trained with it)",
                  flush=True)
            setattr(args, name, saved)


@torch.no_grad()
def evaluate(agent, normalizer, device, args, num_envs: int) -> dict[str, float]:
    """Deterministic policy (the mean action) on fresh environments and targets for eval_steps policy steps."""
    # Random numbers of its own (the same environments at every evaluation); training's generator is left where it was.
    with ec.separate_rng(args.seed + 10_000, device):
        env = ReachEnv(num_envs, device, args)
        obs = env.reset()

        def eval_step():
            obs.copy_(env.step(agent.act_deterministic(normalizer(obs)))[0])

        run_eval_step = ec.cuda_graphed(eval_step, device) if args.cudagraphs else eval_step
        for _ in range(args.eval_steps):
            run_eval_step()
        stats = env.pop_stats()
        # A policy that never reaches a target: success 0, and every target ended by a time-out at its start distance.
        return {"success_rate": stats.get("success_rate", 0.0),
                "final_distance": stats.get("final_distance", float("nan")),
                "time_to_reach": stats.get("time_to_reach", float("nan")), "mean_distance": stats["mean_distance"],
                "targets": stats["targets"]}


def finite_or_none(tree):
    """NaN (e.g. the time to reach of a policy that reached nothing) as JSON's null, which every parser reads."""
    if isinstance(tree, dict):
        return {k: finite_or_none(v) for k, v in tree.items()}
    return None if isinstance(tree, float) and not np.isfinite(tree) else tree


def print_metrics_table(metrics: dict[str, float]) -> None:
    units = {"success_rate": "", "final_distance": "m", "time_to_reach": "s", "mean_distance": "m", "targets": ""}
    print(f"{'metric':<16}{'value':>12}")
    for k, v in metrics.items():
        print(f"{k:<16}{v:>12.4f} {units.get(k, '')}")


@torch.no_grad()
def record_video(agent, normalizer, device, args, path: Path) -> None:
    """One environment under the deterministic policy, rendered on the host (outside the training loop). The red
    sphere is the target (the mocap body); target and end-effector positions go to a JSON file beside the mp4."""
    # Random numbers of its own (the same episode in every video); training's generator is left where it was.
    with ec.separate_rng(args.seed + 20_000, device):
        env = ReachEnv(1, device, args)
        renderer = ec.Renderer(env.sim, width=640, height=480, camera="front")
        obs, frames, log = env.reset(), [], []
        try:
            for _ in range(args.video_length):
                target = env.target[0].cpu().numpy().tolist()  # the target this step aims at (it may be replaced)
                obs, *_ = env.step(agent.act_deterministic(normalizer(obs)))
                frames.append(renderer.render(0))
                log.append({"t": len(log) * env.dt, "target": target, "ee": env.ee_pos[0].cpu().numpy().tolist(),
                            "distance": float(env.distance[0]), "reached": bool(env.reached[0])})
        finally:
            renderer.close()
        ec.save_video(frames, path, fps=1.0 / env.dt)
        path.with_suffix(".json").write_text(json.dumps(log))


def run_dir_of(ckpt_path: str) -> Path:
    """runs/<run>/ for runs/<run>/checkpoints/x.pt; else the checkpoint's own folder."""
    folder = Path(ckpt_path).resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def export_policy(agent, normalizer, ckpt_path: str) -> list[Path]:
    out_dir = run_dir_of(ckpt_path) / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    policy = DeployedPolicy(normalizer, agent.actor).cpu().eval()
    example = torch.zeros(1, ReachEnv.num_obs)
    written = [out_dir / "policy.pt"]
    torch.jit.trace(policy, example).save(str(written[0]))
    try:
        torch.onnx.export(policy, (example,), str(out_dir / "policy.onnx"), input_names=["obs"],
                          output_names=["actions"], dynamic_axes={"obs": {0: "batch"}}, dynamo=False)
        written.append(out_dir / "policy.onnx")
    except Exception as e:  # noqa: BLE001 - ONNX is optional: TorchScript was written
        print(f"note: ONNX export skipped ({type(e).__name__}: {e}); pip install onnx to enable it")
    return written


# ==================================================================================================================
# Main: PPO
# ==================================================================================================================
def check_args(args: Args) -> None:
    """Reject bad input before anything is created or written."""
    for name in ("num_envs", "num_iterations", "num_steps", "num_minibatches", "update_epochs", "save_interval",
                 "video_interval", "video_length", "eval_envs", "eval_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("max_delta", "episode_length_s", "target_timeout_s", "success_threshold"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_delta > 1:
        raise UserError(f"--max-delta is a fraction of the largest step the speed limits allow: at most 1, got "
                        f"{args.max_delta}")
    if args.control_type not in CONTROL_TYPES:
        raise UserError(f"unknown --control-type {args.control_type!r}: use torque, position or position_delta")
    if (args.eval or args.export) and not args.checkpoint:
        raise UserError(f"--{'eval' if args.eval else 'export'} needs a policy: add --checkpoint "
                        "runs/<run>/checkpoints/latest.pt")
    if args.num_envs is not None and (args.num_envs * args.num_steps) % args.num_minibatches:
        raise UserError(f"the batch of num_envs * num_steps = {args.num_envs * args.num_steps} does not split into "
                        f"{args.num_minibatches} minibatches: change --num-minibatches or --num-envs")


# GPU memory per environment at the default sizes (simulation, rollout storage, update activations): the slope of the
# memory in use against --num-envs in tests/benchmark_throughput.py on an H100 is 0.06 MB at 24 steps; --no-bf16 adds
# float32 activations (0.13 MB for the locomotion script's networks, which are twice as wide). 0.15 MB, to cover both.
BYTES_PER_ENV_STEP = 6 * 1024


def fault_note(stats: dict) -> str:
    """The iteration line's mention of simulation faults, only when there were any."""
    n, o = int(stats["nonfinite_resets"]), int(stats["overflows"])
    return f" | reset {n} blown-up, {o} overflowed" if n or o else ""


def check_wandb_login() -> None:
    """--track with no credentials would stop at wandb's interactive prompt or fail after start-up: say it now."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc().authenticators(host):  # where `wandb login` keeps the key
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise UserError("--track needs a Weights & Biases login: run `wandb login` (or set WANDB_API_KEY), or log "
                    "offline with WANDB_MODE=offline (then `wandb sync` later)")


def main(args: Args) -> None:
    check_args(args)
    device = ec.resolve_device(args.device)
    cpu_envs, cpu_iterations = 256, 60
    if device.type == "cpu" and (args.num_envs is None or args.num_iterations is None):
        print(f"note: no GPU in use, so running small on the CPU with --num-envs {args.num_envs or cpu_envs} "
              f"--num-iterations {args.num_iterations or cpu_iterations} (pass --num-envs / --num-iterations to "
              "change); this learns to reach roughly, a GPU learns it precisely", flush=True)
    args.num_envs = args.num_envs or (4096 if device.type == "cuda" else cpu_envs)
    args.num_iterations = args.num_iterations or (300 if device.type == "cuda" else cpu_iterations)
    args.compile = args.compile and device.type == "cuda"  # on the CPU, compiling costs more than it saves
    check_args(args)
    ec.check_memory(device, args.num_envs, args.num_steps * BYTES_PER_ENV_STEP)
    if args.capture_video:
        ec.Renderer.check_available()
    if args.track and not (args.eval or args.export):
        check_wandb_login()
    ec.seed_everything(args.seed, args.torch_deterministic)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    ckpt = load_checkpoint(args.checkpoint, device) if args.checkpoint else None
    if ckpt is not None:
        adopt_policy_args(args, ckpt)

    agent = ActorCritic(ReachEnv.num_obs, ReachEnv.num_actions, args.init_noise_std).to(device)
    agent.bf16 = args.bf16 and device.type == "cuda"
    normalizer = ObservationNormalizer(ReachEnv.num_obs, clip=args.obs_clip).to(device)
    # The learning rate is a tensor on the device, so that ppo_update's KL-adaptive schedule changes it without a
    # host sync; the fused Adam kernel (GPU) reads it from there.
    optimizer = torch.optim.Adam(agent.parameters(), lr=torch.tensor(args.learning_rate, device=device), eps=1e-5,
                                 fused=device.type == "cuda", capturable=device.type == "cuda" and args.cudagraphs)
    start_iteration, global_step = 1, 0
    if ckpt is not None:
        agent.load_state_dict(ckpt["model"])
        normalizer.load_state_dict(ckpt["normalizer"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iteration, global_step = ckpt["iteration"] + 1, ckpt["global_step"]
        if start_iteration > args.num_iterations and not (args.eval or args.export):
            raise UserError(f"{args.checkpoint} is at iteration {ckpt['iteration']} already: pass a larger "
                            f"--num-iterations to train on")

    if args.export:
        for path in export_policy(agent, normalizer, args.checkpoint):
            print(f"wrote {path}")
        return
    if args.eval:
        print(f"evaluating {args.checkpoint} ({args.control_type} control) on {args.num_envs} environments for "
              f"{args.eval_steps} steps...", flush=True)
        metrics = evaluate(agent, normalizer, device, args, args.num_envs)
        print_metrics_table(metrics)
        out = run_dir_of(args.checkpoint) / "eval.json"
        out.write_text(json.dumps(finite_or_none({"checkpoint": args.checkpoint, "control_type": args.control_type,
                                                  **metrics}), indent=2))
        print(f"wrote {out}")
        if args.capture_video:
            video = out.with_name("eval_video.mp4")  # its frame log, eval_video.json, leaves eval.json alone
            record_video(agent, normalizer, device, args, video)
            print(f"wrote {video}")
        return

    # Everything that may fail on bad input or memory comes before anything is written.
    env = ReachEnv(args.num_envs, device, args)
    T, N = args.num_steps, args.num_envs
    # Rollout storage, preallocated on the device, and the rollout step (one CUDA graph on a GPU, --cudagraphs).
    storage = RolloutStorage.allocate(T, N, ReachEnv.num_obs, ReachEnv.num_actions, device)
    resume_env = ckpt is not None and "env" in ckpt and ckpt["args"]["num_envs"] == N
    if ckpt is not None and not resume_env:
        print(f"note: {args.checkpoint} was saved with {ckpt['args']['num_envs']} environments: the "
              "environments start afresh", flush=True)

    # A resumed run keeps writing into its own directory.
    if ckpt is not None and Path(args.checkpoint).resolve().parent.name == "checkpoints":
        run_dir = run_dir_of(args.checkpoint)
    else:
        run_dir = Path("runs") / f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = run_dir.name
    if args.track:
        try:
            import wandb  # only --track needs it
        except ImportError:
            raise UserError("--track needs wandb: pip install wandb") from None
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    # flush_secs: a killed run loses at most 10 s of curves; purge_step: a resumed run drops what the killed one
    # logged after its checkpoint, so that no curve doubles back.
    writer = SummaryWriter(str(run_dir), flush_secs=10, purge_step=global_step + 1 if ckpt is not None else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    print(f"{run_name}: {args.num_envs} environments on {device}, {args.control_type} control, "
          f"{args.num_iterations} iterations of {args.num_steps} steps", flush=True)

    # Ctrl-C or SIGTERM (a pre-empted job): finish the iteration, write a checkpoint, close the logs, exit.
    stop = {"signal": None}

    def request_stop(signum, _frame):
        stop["signal"] = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one stops at once
        print(f"\n{signal.Signals(signum).name}: finishing this iteration, then saving a checkpoint "
              "(send it again to stop at once)", flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)

    summary = {"control_type": args.control_type, "num_envs": N}

    t_outside = 0.0  # seconds spent in evaluations and videos, left out of the training wall time

    def run_eval(tag: str) -> dict[str, float]:
        nonlocal t_outside
        t0 = time.time()
        ev = evaluate(agent, normalizer, device, args, min(args.eval_envs, args.num_envs))
        for k, v in ev.items():
            writer.add_scalar(f"eval/{k}", v, global_step)
        print(f"  eval ({tag}): success {ev['success_rate']:.3f} | final dist {ev['final_distance']:.4f} m | "
              f"reach {ev['time_to_reach']:.2f} s | mean dist {ev['mean_distance']:.4f} m | "
              f"training wall time {t0 - start_time - t_outside:.1f} s", flush=True)
        t_outside += time.time() - t0
        return ev

    shown = dict.fromkeys(["episodic_return", "success_rate", "final_distance", "time_to_reach"], float("nan"))
    start_time = PROCESS_START  # training wall time: start-up included, evaluations and videos left out
    print(f"start-up took {time.time() - start_time:.1f} s", flush=True)
    if args.compile:
        print("torch.compile: the first iteration compiles the rollout step and the update (about 30 s the first "
              "time, seconds once torch's cache holds them; --no-compile skips this)", flush=True)
    if args.eval_interval and start_iteration == 1:
        summary["initial_eval"] = run_eval("untrained")  # the baseline every learning curve starts from
    if resume_env:  # exactly where the checkpoint stopped (after the evaluation above, which draws no numbers)
        storage.next_obs.copy_(env.load_state_dict(ckpt["env"]))
        ec.set_rng_state(ckpt["rng"])
    else:
        storage.next_obs.copy_(env.reset())
        env.desynchronize()
    rollout_step = make_rollout_step(env, agent, normalizer, storage, args)
    run_rollout_step = ec.cuda_graphed(rollout_step, device) if args.cudagraphs else rollout_step
    finish_rollout = make_finish_rollout(agent, normalizer, storage, args)
    run_finish_rollout = ec.cuda_graphed(finish_rollout, device) if args.cudagraphs else finish_rollout
    ppo_update = make_ppo_update(agent, optimizer, storage, args)
    for iteration in range(start_iteration, args.num_iterations + 1):
        # ---------------- rollout: no host synchronisation in here ----------------
        t_rollout = time.perf_counter()
        storage.step.zero_()
        for _ in range(T):
            run_rollout_step()
        run_finish_rollout()  # values, time-out bootstrap, GAE
        global_step += T * N
        if device.type == "cuda":
            torch.cuda.synchronize()  # so the phase timings below are real, not queued work
        t_rollout = time.perf_counter() - t_rollout

        # ---------------- PPO update ----------------
        t_update = time.perf_counter()
        losses = ppo_update()
        losses = dict(zip(losses, torch.stack(list(losses.values())).tolist()))  # the iteration's one wait for the GPU
        t_update = time.perf_counter() - t_update

        # ---------------- logging (one host sync per iteration) ----------------
        stats = env.pop_stats()
        sps = int(T * N / (t_rollout + t_update))
        wall = time.time() - start_time - t_outside  # training only: rollouts, updates, logging
        scalars = {
            "charts/SPS": sps, "charts/learning_rate": losses["learning_rate"], "charts/action_std": losses["action_std"],
            **{f"losses/{k}": losses[k] for k in ("value_loss", "policy_loss", "entropy", "old_approx_kl", "approx_kl",
                                                   "clipfrac", "explained_variance")},
            "perf/rollout_time": t_rollout, "perf/update_time": t_update, "perf/wall_time": wall,
            "metrics/mean_distance": stats["mean_distance"],
            "charts/nonfinite_resets": stats["nonfinite_resets"], "charts/overflows": stats["overflows"],
        }
        for key in ("success_rate", "final_distance", "time_to_reach"):
            if key in stats:
                scalars[f"metrics/{key}"] = stats[key]
        if "episodes" in stats:
            scalars.update({"charts/episodic_return": stats["episodic_return"],
                            "charts/episodic_length": stats["episodic_length"]})
            scalars.update({f"rewards/{n}": stats[f"reward_{n}"] for n in env.reward_names})
        for k, v in scalars.items():
            writer.add_scalar(k, v, global_step)
        # A rollout (24 steps, 0.5 s) is shorter than a target (up to 2.5 s) or an episode (5 s), so some iterations
        # see none end: the console shows the latest figures (TensorBoard gets only fresh ones).
        shown.update(stats)
        print(f"iter {iteration:5d}/{args.num_iterations} | steps {global_step:>11,} | SPS {sps:>9,} | "
              f"return {shown['episodic_return']:8.2f} | success {shown['success_rate']:.3f} | "
              f"final dist {shown['final_distance']:.4f} m | reach {shown['time_to_reach']:.2f} s | "
              f"{wall:6.1f} s" + fault_note(stats), flush=True)

        last = iteration == args.num_iterations
        if stop["signal"] is None and args.eval_interval and (iteration % args.eval_interval == 0 or last):
            summary["final_eval"] = run_eval(f"iteration {iteration}")
        if iteration % args.save_interval == 0 or last or stop["signal"] is not None:
            # Everything needed to go on exactly as if never stopped: the environments and every generator included.
            payload = {"script": SCRIPT, "iteration": iteration, "global_step": global_step,
                       "model": agent.state_dict(), "optimizer": optimizer.state_dict(),
                       "normalizer": normalizer.state_dict(), "args": dataclasses.asdict(args),
                       "obs_dim": ReachEnv.num_obs, "act_dim": ReachEnv.num_actions,
                       "env": env.state_dict(), "rng": ec.rng_state()}
            save_checkpoint(run_dir / "checkpoints" / f"ckpt_{iteration:06d}.pt", payload)
            save_checkpoint(run_dir / "checkpoints" / "latest.pt", payload)
        if stop["signal"] is not None:
            writer.close()
            if args.track:
                wandb.finish()
            latest = run_dir / "checkpoints" / "latest.pt"
            print(f"stopped after iteration {iteration}; resume with: python {SCRIPT}.py --checkpoint {latest}",
                  flush=True)
            sys.exit(128 + stop["signal"])
        if args.capture_video and (iteration % args.video_interval == 0 or last):
            video = run_dir / "videos" / f"iter_{iteration:06d}.mp4"
            video.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            record_video(agent, normalizer, device, args, video)
            t_outside += time.time() - t0
            if args.track:
                wandb.log({"videos/policy": wandb.Video(str(video), format="mp4"), "global_step": global_step})

    # The run's figures in one file (what the learning test and a benchmark read): the last rollout's metrics,
    # the deterministic evaluations before and after training, and the training wall time (no evaluations).
    summary.update(iteration=args.num_iterations, global_step=global_step, train_wall_time_s=time.time() - start_time - t_outside,
                   last_rollouts={k: shown[k] for k in ("success_rate", "final_distance", "time_to_reach")})
    (run_dir / "metrics.json").write_text(json.dumps(finite_or_none(summary), indent=2))
    writer.close()
    if args.track:
        wandb.finish()
    print(f"done: {run_dir}", flush=True)


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - only running out of memory is translated; anything else is a bug
        if not ec.out_of_memory(e):
            raise
        print(f"error: out of memory with --num-envs {args.num_envs} ({str(e).splitlines()[0][:120]}): use a smaller "
              "--num-envs, e.g. half", file=sys.stderr)
        sys.exit(2)
