"""PPO that teaches a Go1 quadruped to walk on command, thousands of robots at once on one GPU.

    python ppo_isaac_locomotion.py --num-envs 4096 --track

As in Isaac Gym, everything stays on the device: the policy's actions become joint targets in the simulator's
ctrl tensor (MuJoCo Warp, zero-copy), four 200 Hz physics steps run, and observations, rewards and resets are
computed in torch straight from the simulator's state tensors.

Read top to bottom: Args; the task (Go1Env, one function per reward term, the scale table); the observation
normalizer; ActorCritic; PPO's pieces (rollout step, GAE, loss); main(), the training loop; then evaluation,
video and export. Plumbing that is not the lesson (simulation, checkpoints, loggers, export, video) is in
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
POLICY_DT = 0.02  # s: a 50 Hz policy over go1.xml's 200 Hz physics, as legged_gym (sim dt 0.005 s, decimation 4)


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
    video_interval: int = 200
    """iterations between two videos"""
    video_length: int = 250
    """policy steps (50 per second) in one video"""
    save_interval: int = 100
    """iterations between two checkpoints (one is always written at the end)"""
    checkpoint: str | None = None
    """a checkpoint to resume training from (its arguments are adopted), or the policy for --eval or --export"""
    eval: bool = False
    """play the deterministic policy of --checkpoint on fresh commands and print its metrics; no training"""
    export: bool = False
    """write the policy of --checkpoint, normalizer folded in, as TorchScript and ONNX"""
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
    """number of parallel environments (default: 4096 on a GPU, 32 on the CPU)"""
    num_iterations: int | None = None
    """number of PPO iterations of num_envs * num_steps steps each (default: 500 on a GPU, 5 on the CPU)"""
    num_steps: int = 24
    """steps per environment per iteration (the rollout's length)"""

    # PPO (rsl_rl's values for legged_gym, which train this task in minutes)
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
    ent_coef: float = 0.01
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
    episode_length_s: float = 20.0
    """episode length in seconds (a time-out, bootstrapped, not a failure)"""
    lin_vel_x_range: tuple[float, float] = (-1.0, 1.0)
    """range of forward velocity commands (m/s)"""
    lin_vel_y_range: tuple[float, float] = (-1.0, 1.0)
    """range of lateral velocity commands (m/s)"""
    ang_vel_yaw_range: tuple[float, float] = (-1.0, 1.0)
    """range of yaw rate commands (rad/s)"""
    command_resample_s: float = 10.0
    """seconds between two velocity commands of an environment"""
    only_positive_rewards: bool = False
    """clip each step's reward (termination aside) at zero, as legged_gym can"""
    action_scale: float = 0.25
    """joint target = home pose + action_scale * action (rad)"""
    solver: tuple[int, int] | None = None
    """Newton and line-search iterations per physics step instead of go1.xml's 4 and 8 (faster, less accurate)"""
    eval_interval: int = 100
    """iterations between two deterministic evaluations logged under eval/ (0: never)"""
    eval_envs: int = 1024
    """environments of an evaluation during training (at most num_envs)"""
    eval_episodes: int = 1
    """episodes per environment in an evaluation"""


def check_args(args: Args) -> None:
    """Reject bad input before anything is created or written: UserError naming the flag and the fix."""
    ec.check_common_args(args)
    ec.check_range(args, "eval_episodes", 1, integer=True)
    for name in ("episode_length_s", "command_resample_s"):
        ec.check_range(args, name, POLICY_DT, hint=f"at least one policy step ({POLICY_DT} s)")
    for name in ("lin_vel_x_range", "lin_vel_y_range", "ang_vel_yaw_range"):
        ec.check_pair(args, name)
    ec.check_range(args, "action_scale", 0, lo_open=True)
    ec.check_pair(args, "solver", lo=1, integer=True, ordered=False)


if __name__ == "__main__":  # the command line first: --help and mistakes answer before torch, MuJoCo and Warp load
    ARGS = ec.read_command_line(Args, check_args)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.distributions import Normal  # noqa: E402

# ==================================================================================================================
# The task: a Go1 tracking a commanded base velocity on flat ground
# ==================================================================================================================
ASSET = "go1.xml"
TRUNK = "trunk"
FEET = ("FR_foot", "FL_foot", "RR_foot", "RL_foot")
LEG_LINKS = tuple(f"{leg}_{part}" for leg in ("FR", "FL", "RR", "RL") for part in ("thigh", "calf"))

# Reward scales, per second of simulated time (each term is multiplied by its scale and by the policy step dt).
# Values of legged_gym's LeggedRobotCfg and its A1 configuration unless noted.
REWARD_SCALES = {
    "tracking_lin_vel": 1.0,  # exp(-|v_xy command error|^2 / 0.25)
    "tracking_ang_vel": 0.5,  # exp(-(yaw rate error)^2 / 0.25)
    "lin_vel_z": -2.0,  # vertical base velocity^2
    "ang_vel_xy": -0.05,  # roll and pitch rates^2
    "orientation": -1.0,  # tilt: |projected gravity xy|^2 (Isaac Lab's flat Go1: -2.5)
    "base_height": -10.0,  # (height - target)^2
    "torques": -1e-5,  # |torque|^2
    "energy": -1e-4,  # sum |torque * joint velocity| (mechanical power, W); not in legged_gym
    "dof_acc": -2.5e-7,  # |joint acceleration|^2
    "action_rate": -0.01,  # |a_t - a_{t-1}|^2: smoothness
    "feet_air_time": 1.0,  # rewards steps of about 0.5 s, only while asked to move
    "collision": -1.0,  # thigh or calf touching the ground
    "termination": -1000.0,  # falling (not time-outs); legged_gym's A1 uses -0 to -200: see the README
}
TRACKING_SIGMA = 0.25
STEADY_AFTER_S = 1.0  # tracking counts as steady-state from this long after a command change


@dataclass
class Go1Config:
    """The task's settings (the Args fields of the same names): what defines a trained policy's task."""

    episode_length_s: float
    lin_vel_x_range: tuple[float, float]
    lin_vel_y_range: tuple[float, float]
    ang_vel_yaw_range: tuple[float, float]
    command_resample_s: float
    only_positive_rewards: bool
    action_scale: float
    solver: tuple[int, int] | None

    @classmethod
    def from_args(cls, args: Args) -> Go1Config:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


# What a policy's observations and actions mean, and its task: --eval and --export take these from the checkpoint.
TASK_ARGS = tuple(f.name for f in dataclasses.fields(Go1Config)) + ("obs_clip",)


class Go1Env:
    """Batched velocity tracking. All state lives in (num_envs, ...) tensors on the device, written in place.

    Observation layout (num_obs = 12 + 3 * num_actions = 48 for the Go1; normalized by ObservationNormalizer):
      [0:3]   base linear velocity, base frame (m/s)      [3:6]   base angular velocity, base frame (rad/s)
      [6:9]   projected gravity (unit, base frame)        [9:12]  command (vx m/s, vy m/s, yaw rate rad/s)
      [12:24] joint positions minus the home pose (rad)   [24:36] joint velocities (rad/s)
      [36:48] last actions
    Actions: one per actuator (the model's nu), joint target = home pose + action_scale * action.
    """

    def __init__(self, num_envs: int, device: torch.device, cfg: Go1Config | None = None):
        self.cfg = cfg = cfg or Go1Config.from_args(Args())
        self.device, self.num_envs = device, num_envs
        mjm = ec.load_model(ASSET)
        if cfg.solver is not None:  # read when the model goes to MuJoCo Warp
            mjm.opt.iterations, mjm.opt.ls_iterations = cfg.solver
        # Contact forces: for feet air time, collisions and falls. No body poses: nothing here reads them.
        decimation = max(1, round(POLICY_DT / mjm.opt.timestep))
        self.sim = s = ec.BatchedSim(mjm, num_envs, device, decimation=decimation, contact_forces=True, poses=False)
        self.num_actions = nu = mjm.nu
        self.num_obs = 12 + 3 * nu
        self.dt = mjm.opt.timestep * decimation
        self.max_episode_length = int(round(cfg.episode_length_s / self.dt))
        self.resample_steps = max(1, int(round(cfg.command_resample_s / self.dt)))
        # Views into the simulator (Isaac Gym: the root state tensor and the DOF state tensor).
        self.root_pos, self.root_quat = s.qpos[:, 0:3], s.qpos[:, 3:7]
        self.root_lin_vel_w, self.root_ang_vel_b = s.qvel[:, 0:3], s.qvel[:, 3:6]  # MuJoCo: angular in body frame
        self.dof_pos, self.dof_vel = s.qpos[:, 7:], s.qvel[:, 6:]
        self.default_dof_pos = s.default_qpos[7:]
        # Resets draw each joint from legged_gym's home * U(0.5, 1.5), restricted to the joint's range (read from the
        # model): unrestricted, 31% of resets started a calf up to 0.135 rad past its limit, to snap back at 16 rad/s.
        # Uniform on what is left (calves: home * U(0.592, 1.5)), so no start piles up on a limit.
        if list(mjm.jnt_qposadr[1:]) != list(range(7, mjm.nq)) or not mjm.jnt_limited[1:].all():
            raise UserError("go1.xml must have its free joint first, then one limited hinge per actuator")
        self.dof_lower, self.dof_upper = torch.tensor(mjm.jnt_range[1:].T, dtype=torch.float32, device=device)
        home_lo, home_hi = (
            torch.minimum(self.default_dof_pos * 0.5, self.default_dof_pos * 1.5),
            torch.maximum(self.default_dof_pos * 0.5, self.default_dof_pos * 1.5),
        )
        self.reset_dof_lo = torch.maximum(home_lo, self.dof_lower)
        self.reset_dof_hi = torch.minimum(home_hi, self.dof_upper)
        if not bool((self.reset_dof_lo <= self.reset_dof_hi).all()):  # once, at start-up
            raise UserError("go1.xml's home pose (keyframe 0) must lie inside the joint ranges")
        self.base_height_target = float(s.default_qpos[2]) - 0.02  # the home height, a little crouched
        self.trunk = s.body_id(TRUNK)
        self.feet = torch.tensor([s.body_id(f) for f in FEET], device=device)
        self.leg_links = torch.tensor([s.body_id(b) for b in LEG_LINKS], device=device)
        ranges = (cfg.lin_vel_x_range, cfg.lin_vel_y_range, cfg.ang_vel_yaw_range)
        self.command_lo = torch.tensor([r[0] for r in ranges], device=device)
        self.command_hi = torch.tensor([r[1] for r in ranges], device=device)

        def z(*shape, dtype=torch.float32):
            return torch.zeros(num_envs, *shape, dtype=dtype, device=device)

        # Carried from one step to the next (saved in checkpoints, for an exact resume).
        self.actions, self.last_actions, self.last_dof_vel = z(nu), z(nu), z(nu)
        self.commands, self.command_age = z(3), z(dtype=torch.long)
        self.feet_air_time, self.last_contacts = z(len(FEET)), z(len(FEET), dtype=torch.bool)
        self.episode_length, self.episode_return = z(dtype=torch.long), z()
        # Computed once per step, read by several reward terms (legged_gym's post_physics_step).
        self.base_lin_vel, self.projected_gravity = z(3), z(3)
        self.foot_contact, self.leg_contact = z(len(FEET), dtype=torch.bool), z(len(LEG_LINKS), dtype=torch.bool)
        self.terminated, self.broken = z(dtype=torch.bool), z(dtype=torch.bool)
        self.reward_names = list(REWARD_SCALES)
        self.episode_sums = {name: z() for name in self.reward_names}
        # Statistics summed per environment on the device, reduced over environments once per iteration (pop_stats).
        stat_names = [
            "episodes",
            "falls",
            "return",
            "length",
            "lin_err",
            "ang_err",
            "err_steps",
            "lin_err_ss",
            "ang_err_ss",
            "ss_steps",
            "nonfinite",
            "overflows",
        ]
        self.stats = {k: z() for k in stat_names + [f"rew_{n}" for n in self.reward_names]}

    STATE = (
        "actions",
        "last_actions",
        "last_dof_vel",
        "commands",
        "command_age",
        "feet_air_time",
        "last_contacts",
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
        self._refresh_base_state()
        return self._observe()

    # ------------------------------------------------------------------------------------------------------------
    def _rand(self, *shape, lo=0.0, hi=1.0):
        # torch's global generator (seeded, saved in checkpoints); a private one would stop torch.compile's tracing
        return lo + (hi - lo) * torch.rand(*shape, device=self.device)

    def _sample_commands(self, mask: torch.Tensor):
        cmd = self.command_lo + (self.command_hi - self.command_lo) * self._rand(self.num_envs, 3)
        cmd[:, :2] *= cmd[:, :2].norm(dim=1, keepdim=True) > 0.2  # tiny commands mean "stand still"
        self.commands.copy_(torch.where(mask[:, None], cmd, self.commands))
        self.command_age.masked_fill_(mask, 0)

    def reset(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reset the environments in `mask` (all if None) on the device and return all observations."""
        if mask is None:
            mask = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        n, s = self.num_envs, self.sim
        qpos = s.default_qpos.expand(n, -1).clone()
        qpos[:, 3:7] = ec.quat_from_yaw(self._rand(n, lo=-math.pi, hi=math.pi))  # any heading
        qpos[:, 7:] = self._rand(
            n, self.num_actions, lo=self.reset_dof_lo, hi=self.reset_dof_hi
        )  # home * U(0.5, 1.5), in range
        qpos[:, 7:].clamp_(self.dof_lower, self.dof_upper)  # float rounding must not step past a limit
        qvel = torch.zeros(n, s.mjm.nv, device=self.device)
        qvel[:, 0:6] = self._rand(n, 6, lo=-0.5, hi=0.5)  # legged_gym: base velocities U(-0.5, 0.5)
        s.reset(mask, qpos, qvel, ctrl=qpos[:, 7:])
        m = mask[:, None]
        for t in (self.actions, self.last_actions, self.last_dof_vel, self.feet_air_time):
            t.masked_fill_(m, 0.0)
        self.last_contacts.masked_fill_(m, False)
        self.episode_length.masked_fill_(mask, 0)
        self._sample_commands(mask)
        self._refresh_base_state()
        return self._observe()

    def desynchronize(self) -> None:
        """Start every environment at a random point of its episode (legged_gym's init_at_random_ep_len), so that
        they do not all time out on the same step."""
        self.episode_length.copy_((self._rand(self.num_envs) * self.max_episode_length).long())

    def _observe(self) -> torch.Tensor:
        return torch.cat(
            [
                self.base_lin_vel,
                self.root_ang_vel_b,
                self.projected_gravity,
                self.commands,
                self.dof_pos - self.default_dof_pos,
                self.dof_vel,
                self.actions,
            ],
            dim=-1,
        )

    def _refresh_base_state(self) -> None:
        self.base_lin_vel.copy_(ec.quat_rotate_inverse(self.root_quat, self.root_lin_vel_w))
        self.projected_gravity.copy_(ec.projected_gravity(self.root_quat))

    # ------------------------------------------------------------------------------------------------------------
    def step(self, actions: torch.Tensor):
        """Apply actions (num_envs, num_actions) for one policy step. Returns (obs, reward, terminated, truncated,
        final_obs): environments that ended are already reset, so obs is their next episode's first observation
        and final_obs their last one (to bootstrap the value on time-outs).

        State is written in place only and nothing branches on tensor values, so that a CUDA graph can replay it."""
        self.actions.copy_(actions.clamp(-100.0, 100.0))  # legged_gym's clip_actions
        self.sim.ctrl.copy_(self.default_dof_pos + self.cfg.action_scale * self.actions)  # PD targets
        self.sim.step()
        self._refresh_base_state()
        self.episode_length += 1
        self.command_age += 1
        # A world that blew up (NaN or infinity) or overflowed its contact buffers is reset below; its last step
        # counts for nothing: reward 0, no bootstrap, no statistics.
        nonfinite, overflowed = self.sim.nonfinite(), self.sim.overflowed()
        self.broken.copy_(nonfinite | overflowed)

        # Contacts (Isaac Gym: the net contact force tensor) and terminations.
        forces = self.sim.contact_force
        self.foot_contact.copy_(forces[:, self.feet, 2] > 1.0)
        self.leg_contact.copy_(forces[:, self.leg_links].norm(dim=-1) > 0.1)
        fell = (forces[:, self.trunk].norm(dim=-1) > 1.0) | (self.projected_gravity[:, 2] > -0.5)  # > 60 deg tilt
        self.terminated.copy_(fell & ~self.broken)
        truncated = (self.episode_length >= self.max_episode_length) & ~self.terminated & ~self.broken

        reward = self._compute_reward()
        self._accumulate_stats(reward, self.terminated, truncated, nonfinite, overflowed)
        self._sample_commands(self.episode_length % self.resample_steps == 0)  # new commands mid-episode
        self.last_actions.copy_(self.actions)
        self.last_dof_vel.copy_(self.dof_vel)

        final_obs = torch.where(self.broken[:, None], 0.0, self._observe())  # NaN * 0 is NaN: select, never multiply
        done = self.terminated | self.broken
        obs = self.reset(done | truncated)
        return obs, reward, done, truncated, final_obs

    def _compute_reward(self) -> torch.Tensor:
        """Sum of every term times its scale and dt, by name (legged_gym's compute_reward)."""
        total = torch.zeros(self.num_envs, device=self.device)
        for name in self.reward_names:
            if name == "termination":
                continue
            term = torch.where(self.broken, 0.0, getattr(self, f"_reward_{name}")() * REWARD_SCALES[name] * self.dt)
            self.episode_sums[name] += term
            total += term
        if self.cfg.only_positive_rewards:  # a Python bool: no device sync
            total.clamp_(min=0.0)
        term = self._reward_termination() * REWARD_SCALES["termination"] * self.dt
        self.episode_sums["termination"] += term
        return total + term

    def _accumulate_stats(self, reward, fell, truncated, nonfinite, overflowed):
        st, done, ok = self.stats, fell | truncated, ~self.broken
        self.episode_return += reward
        st["episodes"] += done
        st["falls"] += fell
        st["return"] += self.episode_return * done
        st["length"] += self.episode_length * done
        lin_err = torch.where(ok, (self.commands[:, :2] - self.base_lin_vel[:, :2]).norm(dim=1), 0.0)
        ang_err = torch.where(ok, (self.commands[:, 2] - self.root_ang_vel_b[:, 2]).abs(), 0.0)
        steady = ok & (self.command_age * self.dt >= STEADY_AFTER_S)
        st["lin_err"] += lin_err
        st["ang_err"] += ang_err
        st["err_steps"] += ok
        st["lin_err_ss"] += lin_err * steady
        st["ang_err_ss"] += ang_err * steady
        st["ss_steps"] += steady
        st["nonfinite"] += nonfinite
        st["overflows"] += overflowed
        for name in self.reward_names:
            st[f"rew_{name}"] += self.episode_sums[name] * done
            self.episode_sums[name].masked_fill_(done | self.broken, 0.0)
        self.episode_return.masked_fill_(done | self.broken, 0.0)

    def pop_stats(self) -> dict[str, float]:
        """Means since the last call (one host sync). Tracking errors: overall, and steady-state (from
        STEADY_AFTER_S after each command change on); episode means over the episodes that ended."""
        v = dict(zip(self.stats, torch.stack(list(self.stats.values())).sum(dim=1).tolist()))
        for t in self.stats.values():
            t.zero_()
        steps, steady = max(v["err_steps"], 1.0), v["ss_steps"]
        out = {
            "lin_vel_error": v["lin_err"] / steps,
            "yaw_rate_error": v["ang_err"] / steps,
            "lin_vel_error_steady": v["lin_err_ss"] / steady if steady else float("nan"),
            "yaw_rate_error_steady": v["ang_err_ss"] / steady if steady else float("nan"),
            "nonfinite_resets": v["nonfinite"],
            "overflows": v["overflows"],
            "episodes": v["episodes"],
            "falls": v["falls"],
        }
        if v["episodes"] > 0:
            episodes = v["episodes"]
            out.update(
                fall_rate=v["falls"] / episodes,
                episodic_return=v["return"] / episodes,
                episodic_length_s=v["length"] / episodes * self.dt,
            )
            out.update({f"reward_{n}": v[f"rew_{n}"] / episodes for n in self.reward_names})
        return out

    # ---- Reward terms: one small function each, scaled by REWARD_SCALES ----------------------------------------
    def _reward_tracking_lin_vel(self):
        err = (self.commands[:, :2] - self.base_lin_vel[:, :2]).square().sum(dim=1)
        return torch.exp(-err / TRACKING_SIGMA)

    def _reward_tracking_ang_vel(self):
        err = (self.commands[:, 2] - self.root_ang_vel_b[:, 2]).square()
        return torch.exp(-err / TRACKING_SIGMA)

    def _reward_lin_vel_z(self):
        return self.base_lin_vel[:, 2].square()

    def _reward_ang_vel_xy(self):
        return self.root_ang_vel_b[:, :2].square().sum(dim=1)

    def _reward_orientation(self):
        return self.projected_gravity[:, :2].square().sum(dim=1)

    def _reward_base_height(self):
        return (self.root_pos[:, 2] - self.base_height_target).square()

    def _reward_torques(self):
        return self.sim.act_force.square().sum(dim=1)

    def _reward_energy(self):
        return (self.sim.act_force * self.dof_vel).abs().sum(dim=1)

    def _reward_dof_acc(self):
        return ((self.dof_vel - self.last_dof_vel) / self.dt).square().sum(dim=1)

    def _reward_action_rate(self):
        return (self.actions - self.last_actions).square().sum(dim=1)

    def _reward_feet_air_time(self):
        # legged_gym: on touchdown, reward (air time - 0.5 s); contact is OR-ed with the previous step's because
        # a foot's contact force on flat ground flickers.
        contact = self.foot_contact | self.last_contacts
        first_contact = (self.feet_air_time > 0.0) & contact
        self.feet_air_time += self.dt
        reward = ((self.feet_air_time - 0.5) * first_contact).sum(dim=1)
        reward *= self.commands[:, :2].norm(dim=1) > 0.1
        self.feet_air_time *= ~contact
        self.last_contacts.copy_(self.foot_contact)
        return reward

    def _reward_collision(self):
        return self.leg_contact.float().sum(dim=1)

    def _reward_termination(self):
        return self.terminated.float()


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
    """Separate actor and critic MLPs, [512, 256, 128] with ELU (legged_gym's ActorCritic), and a state-independent
    learnable log standard deviation of the Gaussian policy. Observations (batch, num_obs), actions
    (batch, num_actions). With bf16, the hidden layers run in bfloat16 autocast."""

    def __init__(
        self, num_obs: int, num_actions: int, init_noise_std: float = 1.0, hidden=(512, 256, 128), bf16: bool = False
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
    dones: torch.Tensor  # (T, N) bool: the episode ended after this step (fell or timed out)
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
def rollout_step(env: Go1Env, agent: ActorCritic, normalizer: ObservationNormalizer, storage: RolloutStorage):
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
BYTES_PER_ENV_STEP = 12 * 1024


def main(args: Args) -> None:
    check_args(args)
    dist = ec.distributed()  # one process of a torchrun launch (its RANK, WORLD_SIZE, LOCAL_RANK), or the only one
    device = dist.choose_device(args.device)
    if device.type == "cpu" and not (args.eval or args.export) and None in (args.num_envs, args.num_iterations):
        print(
            f"note: no GPU in use, so running small on the CPU (--num-envs {args.num_envs or 32}, --num-iterations "
            f"{args.num_iterations or 5}): this shows the pipeline; learning to walk needs a GPU",
            flush=True,
        )
    args.num_envs = args.num_envs or (4096 if device.type == "cuda" else 32)
    args.num_iterations = args.num_iterations or (500 if device.type == "cuda" else 5)
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

    env = Go1Env(args.num_envs, device, Go1Config.from_args(args))
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

    last_checkpoint, last_eval, eval_time, iteration_times = None, {}, 0.0, []
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
            "metrics/lin_vel_error": stats["lin_vel_error"],
            "metrics/yaw_rate_error": stats["yaw_rate_error"],
            "charts/nonfinite_resets": stats["nonfinite_resets"],
            "charts/overflows": stats["overflows"],
        }
        if "fall_rate" in stats:
            scalars.update(
                {
                    "charts/episodic_return": stats["episodic_return"],
                    "charts/episodic_length": stats["episodic_length_s"] / env.dt,
                    "metrics/fall_rate": stats["fall_rate"],
                }
            )
            scalars.update({f"rewards/{n}": stats[f"reward_{n}"] for n in env.reward_names})
        logger.scalars(scalars, global_step)
        steady = iteration_times[2:][-20:]  # the first two iterations compile and record graphs
        left = float(np.median(steady)) * (args.num_iterations - iteration) if steady else float("nan")
        print(
            f"iter {iteration:5d}/{args.num_iterations} | steps {global_step:>11,} | SPS {sps:>9,} | "
            f"return {stats.get('episodic_return', float('nan')):7.2f} | v err {stats['lin_vel_error']:.3f} m/s | "
            f"yaw err {stats['yaw_rate_error']:.3f} rad/s | falls {stats.get('fall_rate', float('nan')):.3f} | "
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
                f"  eval: v err {last_eval['lin_vel_error']:.3f} m/s (steady {last_eval['lin_vel_error_steady']:.3f})"
                f" | yaw err {last_eval['yaw_rate_error']:.3f} rad/s | falls {last_eval['fall_rate']:.3f} "
                f"(95% CI {last_eval['fall_rate_ci95_low']:.3f}-{last_eval['fall_rate_ci95_high']:.3f}, "
                f"{last_eval['episodes']} episodes) | at {ec.duration(t0 - PROCESS_START)} "
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
                f"stopped after iteration {iteration}; resume with: python {sys.argv[0]} --checkpoint "
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
EVAL_UNITS = {
    "lin_vel_error": "m/s",
    "lin_vel_error_steady": "m/s",
    "yaw_rate_error": "rad/s",
    "yaw_rate_error_steady": "rad/s",
    "episode_length_s": "s",
}


def evaluate_or_export(agent, normalizer, env, device, args: Args) -> None:
    """--export: the policy as TorchScript and ONNX in <run>/export; --eval: its metrics as a table and in
    <run>/eval.json (and a video with --capture-video)."""
    if args.export:
        out_dir = ec.run_dir_of(args.checkpoint) / "export"
        for path in ec.export_policy(ec.deployed_policy(normalizer, agent.actor, clip=100.0), env.num_obs, out_dir):
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
    """The deterministic policy on fresh environments and commands for eval_episodes episode lengths (a robot that
    falls starts a new episode). Tracking errors overall and steady-state; falls with a 95% Wilson interval."""
    with ec.separate_rng(args.seed + 10_000, device):  # the same environments every time; training's rng untouched
        env = Go1Env(num_envs, device, Go1Config.from_args(args))
        obs = env.reset()

        def eval_step():
            obs.copy_(env.step(agent.act_deterministic(normalizer(obs)))[0])

        run_eval_step = ec.cuda_graphed(eval_step, device) if args.cudagraphs else eval_step
        for _ in range(env.max_episode_length * args.eval_episodes):
            run_eval_step()
        s = env.pop_stats()
    low, high = ec.wilson_interval(s["falls"], s["episodes"])
    return {
        "lin_vel_error": s["lin_vel_error"],
        "lin_vel_error_steady": s["lin_vel_error_steady"],
        "yaw_rate_error": s["yaw_rate_error"],
        "yaw_rate_error_steady": s["yaw_rate_error_steady"],
        "fall_rate": s.get("fall_rate", 0.0),
        "fall_rate_ci95_low": low,
        "fall_rate_ci95_high": high,
        "episodes": int(s["episodes"]),
        "episode_length_s": s.get("episodic_length_s", 0.0),
    }


@torch.no_grad()
def record_video(agent, normalizer, device, args: Args, path: Path) -> None:
    """One environment under the deterministic policy, rendered on the host, with gauges of commanded (green) and
    actual (red) velocity; the velocities frame by frame go to a JSON file beside the mp4."""
    with ec.separate_rng(args.seed + 20_000, device):
        env = Go1Env(1, device, Go1Config.from_args(args))
        obs, frames, log = env.reset(), [], []
        with ec.Renderer(env.sim, camera="track") as renderer:
            for _ in range(args.video_length):
                obs, *_ = env.step(agent.act_deterministic(normalizer(obs)))
                command = env.commands[0].cpu().numpy()
                actual = torch.cat([env.base_lin_vel[0, :2], env.root_ang_vel_b[0, 2:]]).cpu().numpy()
                frames.append(ec.draw_gauges(renderer.render(0), command, actual, span=1.5))
                log.append({"t": len(log) * env.dt, "command": command.tolist(), "actual": actual.tolist()})
    ec.save_video(frames, path, fps=1.0 / env.dt)
    ec.write_json(path.with_suffix(".json"), log)


if __name__ == "__main__":
    ec.run_main(main, ARGS, Args, SCRIPT, TASK_ARGS)
