"""PPO that teaches a Go1-class quadruped to walk on command, thousands of robots at once on one GPU.

    python ppo_isaac_locomotion.py --num-envs 4096 --track

The whole pipeline stays on the device, as in Isaac Gym (here on MuJoCo Warp):
  policy (torch) -> joint position targets written into the simulator's ctrl tensor (zero-copy)
  -> 4 physics sub-steps at 200 Hz replayed from one CUDA graph -> qpos/qvel/contact-force views refreshed in place
  -> observations, rewards, terminations and per-environment resets computed in torch -> rollout buffer -> PPO update.
Nothing is copied to the host inside the rollout loop; statistics are read once per iteration. On a GPU, that
whole rollout step (policy, physics, observations, rewards, resets, storage) is recorded once as a CUDA graph and
replayed, and so is each minibatch step of the update (--no-cudagraphs runs the same code eagerly).

Read top to bottom: Args, the environment (Go1Env, its reward terms), the observation normalizer, ActorCritic,
then PPO (rollout, GAE, update) with logging, checkpoints, evaluation, export and video.
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
    video_interval: int = 200
    """iterations between two videos"""
    video_length: int = 250
    """policy steps (at 50 Hz) in one video"""
    save_interval: int = 100
    """iterations between two checkpoints (one is always written at the end)"""
    checkpoint: Optional[str] = None
    """a checkpoint to resume training from, or the policy to play with --eval or to write out with --export"""
    eval: bool = False
    """play the deterministic policy of --checkpoint on fresh commands and print its metrics; no training"""
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
    """number of parallel environments (default: 4096 on a GPU, 32 on the CPU)"""
    num_iterations: Optional[int] = None
    """number of PPO iterations, each of num_envs * num_steps environment steps (default: 500 on a GPU, 5 on the CPU)"""
    num_steps: int = 24
    """environment steps per environment per iteration (rollout length)"""

    # PPO (values of rsl_rl's PPO for legged_gym, which train this task in minutes)
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
    """episode length in seconds; reaching it is a time-out, not a termination (the value is bootstrapped)"""
    lin_vel_x_range: tuple[float, float] = (-1.0, 1.0)
    """forward velocity commands are sampled uniformly in this range (m/s; legged_gym's default)"""
    lin_vel_y_range: tuple[float, float] = (-1.0, 1.0)
    """lateral velocity commands are sampled uniformly in this range (m/s; legged_gym's default)"""
    ang_vel_yaw_range: tuple[float, float] = (-1.0, 1.0)
    """yaw rate commands are sampled uniformly in this range (rad/s; legged_gym's default)"""
    only_positive_rewards: bool = False
    """clip each step's reward (termination aside) at zero, as legged_gym: with large early penalties the sum stays
    at 0 and the policy gets no signal, so it is off by default"""
    command_resample_s: float = 10.0
    """seconds between two resamplings of an environment's velocity command"""
    action_scale: float = 0.25
    """joint target = home pose + action_scale * action (rad), as legged_gym"""
    solver: Optional[tuple[int, int]] = None
    """Newton iterations and line-search iterations of MuJoCo's constraint solver per physics step, instead of
    go1.xml's 4 and 8, which converge in the states training visits. `--solver 1 5` (MuJoCo Playground's setting for
    its Go1) trains about 20% faster and learns to walk about as fast, but each step's contact and joint-friction
    forces are then only roughly solved: the joint velocities are off by 0.35 rad/s (median) from a converged solve's
    while the targets move. Both measured in the README's Performance section (tests/solver_fidelity.py: the error)"""
    eval_interval: int = 100
    """iterations between two deterministic evaluations logged under eval/ (0: never)"""
    eval_envs: int = 1024
    """environments of a deterministic evaluation (on a CPU: at most num_envs)"""
    eval_episodes: int = 1
    """episodes per environment in an evaluation (each episode_length_s long unless the robot falls)"""


# ==================================================================================================================
# The environment: a Go1-class quadruped tracking a commanded base velocity on flat ground
# ==================================================================================================================
# Reward scales, per second of simulated time (each term is multiplied by its scale and by the policy step dt).
# Values follow legged_gym's LeggedRobotCfg/A1 configuration (github.com/leggedrobotics/legged_gym) unless noted.
REWARD_SCALES = {
    "tracking_lin_vel": 1.0,     # exp(-|v_xy command error|^2 / 0.25)
    "tracking_ang_vel": 0.5,     # exp(-(yaw rate error)^2 / 0.25)
    "lin_vel_z": -2.0,           # vertical base velocity^2
    "ang_vel_xy": -0.05,         # roll and pitch rates^2
    "orientation": -1.0,         # tilt: |projected gravity xy|^2 (Isaac Lab's flat Go1 uses -2.5)
    "base_height": -10.0,        # (height - target)^2
    "torques": -1e-5,            # |torque|^2
    "energy": -1e-4,             # sum |torque * joint velocity| (mechanical power, W): 100 W costs 0.01 per second
    "dof_acc": -2.5e-7,          # |joint acceleration|^2
    "action_rate": -0.01,        # |a_t - a_{t-1}|^2: smoothness
    "feet_air_time": 1.0,        # rewards steps of about 0.5 s, only while asked to move
    "collision": -1.0,           # thigh or calf touching the ground
    "termination": -1000.0,      # falling (not time-outs): 20 per fall; measured on an H100, -200 left 1.5-3% of
                                 # evaluation episodes falling after command changes, -1000 1.3-1.8%
}
TRACKING_SIGMA = 0.25
FEET = ("FR_foot", "FL_foot", "RR_foot", "RL_foot")
LEG_LINKS = tuple(f"{leg}_{part}" for leg in ("FR", "FL", "RR", "RL") for part in ("thigh", "calf"))


class Go1Env:
    """Batched velocity-tracking task. All state lives in (num_envs, ...) tensors on the device.

    Observation layout (48 values; normalized later by ObservationNormalizer, so no hand-tuned scales):
      [0:3]   base linear velocity, base frame (m/s)      [3:6]   base angular velocity, base frame (rad/s)
      [6:9]   projected gravity (unit, base frame)        [9:12]  command (vx, vy, yaw rate)
      [12:24] joint positions minus the home pose (rad)   [24:36] joint velocities (rad/s)
      [36:48] last actions
    """

    num_obs, num_actions = 48, 12

    def __init__(self, num_envs: int, device: torch.device, args: Args):
        self.args, self.device, self.num_envs = args, device, num_envs
        mjm = ec.load_model("go1.xml")
        if args.solver is not None:  # MuJoCo's opt.iterations and opt.ls_iterations, read when the model goes to Warp
            mjm.opt.iterations, mjm.opt.ls_iterations = args.solver
        # 200 Hz physics, 50 Hz policy, as legged_gym (sim dt 0.005, decimation 4).
        # Contact forces: for feet air time, collisions and falls. No body poses: nothing here reads them.
        self.sim = ec.BatchedSim(mjm, num_envs, device, decimation=4, contact_forces=True, poses=False)
        self.dt = mjm.opt.timestep * self.sim.decimation
        self.max_episode_length = int(round(args.episode_length_s / self.dt))
        self.resample_steps = int(round(args.command_resample_s / self.dt))
        s = self.sim
        # Views into the simulator (Isaac Gym: root state tensor and DOF state tensor).
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
        home_lo, home_hi = (torch.minimum(self.default_dof_pos * 0.5, self.default_dof_pos * 1.5),
                            torch.maximum(self.default_dof_pos * 0.5, self.default_dof_pos * 1.5))
        self.reset_dof_lo = torch.maximum(home_lo, self.dof_lower)
        self.reset_dof_hi = torch.minimum(home_hi, self.dof_upper)
        if not bool((self.reset_dof_lo <= self.reset_dof_hi).all()):  # once, at start-up
            raise UserError("go1.xml's home pose (keyframe 0) must lie inside the joint ranges")
        self.base_height_target = float(s.default_qpos[2]) - 0.02  # home height, a little crouched
        self.trunk = s.body_id("trunk")
        self.feet = torch.tensor([s.body_id(f) for f in FEET], device=device)
        self.leg_links = torch.tensor([s.body_id(b) for b in LEG_LINKS], device=device)

        z = lambda *shape: torch.zeros(num_envs, *shape, device=device)  # noqa: E731
        self.actions, self.last_actions, self.last_dof_vel = z(12), z(12), z(12)
        self.commands = z(3)
        self.feet_air_time, self.last_contacts = z(4), z(4).bool()
        self.broken = z().bool()  # worlds that blew up or overflowed this step
        # Base-frame quantities that observations, rewards and terminations share: computed once after each physics
        # step and each reset (legged_gym's post_physics_step), not again by every term that reads them.
        self.base_lin_vel, self.projected_gravity = z(3), z(3)
        self.episode_length = torch.zeros(num_envs, dtype=torch.long, device=device)
        self.reward_names = list(REWARD_SCALES)
        self.episode_sums = {name: z() for name in self.reward_names}
        self.episode_return = z()
        # Statistics of finished episodes and of tracking, summed per environment on the device (elementwise adds,
        # no reduction inside the step) and over environments once per iteration, in pop_stats.
        self.stats = {k: z() for k in
                      ["episodes", "falls", "return", "length", "lin_err", "ang_err", "err_steps", "nonfinite",
                       "overflows"]
                      + [f"rew_{n}" for n in self.reward_names]}
        ranges = (args.lin_vel_x_range, args.lin_vel_y_range, args.ang_vel_yaw_range)
        self.command_lo = torch.tensor([r[0] for r in ranges], device=device)
        self.command_hi = torch.tensor([r[1] for r in ranges], device=device)

    # Task state carried from one step to the next (with the simulator's state; random numbers come from torch's
    # global generator, saved in the checkpoint's "rng"): a checkpoint that holds it resumes bit for bit.
    STATE = ("actions", "last_actions", "last_dof_vel", "commands", "feet_air_time", "last_contacts",
             "episode_length", "episode_return")

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
        self._refresh_base_state()
        return self._observe()

    # ------------------------------------------------------------------------------------------------------------
    def _rand(self, *shape, lo=0.0, hi=1.0):
        # torch's global generator (seed_everything seeds it, checkpoints save it): a private torch.Generator would
        # stop torch.compile from tracing the step (--compile)
        return lo + (hi - lo) * torch.rand(*shape, device=self.device)

    def _sample_commands(self, mask: torch.Tensor):
        cmd = self.command_lo + (self.command_hi - self.command_lo) * self._rand(self.num_envs, 3)
        cmd[:, :2] *= (cmd[:, :2].norm(dim=1, keepdim=True) > 0.2)  # tiny commands mean "stand still"
        self.commands.copy_(torch.where(mask[:, None], cmd, self.commands))

    def reset(self, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Reset the environments in `mask` (all if None) on the device and return all observations."""
        if mask is None:
            mask = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        n, s = self.num_envs, self.sim
        qpos = s.default_qpos.expand(n, -1).clone()
        qpos[:, 3:7] = ec.quat_from_yaw(self._rand(n, lo=-np.pi, hi=np.pi))  # any heading
        qpos[:, 7:] = self._rand(n, 12, lo=self.reset_dof_lo, hi=self.reset_dof_hi)  # home * U(0.5, 1.5), in range
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
        """Start every environment at a random point of its episode (legged_gym's init_at_random_ep_len): otherwise
        all of them time out on the same step, forever, and each rollout sees no ending or thousands at once."""
        self.episode_length.copy_((self._rand(self.num_envs) * self.max_episode_length).long())

    def _observe(self) -> torch.Tensor:
        return torch.cat([
            self.base_lin_vel, self.root_ang_vel_b, self.projected_gravity, self.commands,
            self.dof_pos - self.default_dof_pos, self.dof_vel, self.actions], dim=-1)

    def _refresh_base_state(self) -> None:
        self.base_lin_vel.copy_(ec.quat_rotate_inverse(self.root_quat, self.root_lin_vel_w))
        self.projected_gravity.copy_(ec.projected_gravity(self.root_quat))

    # ------------------------------------------------------------------------------------------------------------
    def step(self, actions: torch.Tensor):
        """Apply actions for one policy step (4 physics steps). Returns (obs, reward, terminated, truncated,
        final_obs): for environments that ended, obs is already the first observation of their next episode and
        final_obs their last one (to bootstrap the value on time-outs).

        Persistent state is only ever written in place (copy_, +=, masked_fill_) and nothing branches on tensor
        values, so that this can be recorded in a CUDA graph (--cudagraphs) and replayed."""
        self.actions.copy_(actions.clamp(-100.0, 100.0))  # legged_gym's clip_actions
        self.sim.ctrl.copy_(self.default_dof_pos + self.args.action_scale * self.actions)  # PD targets
        self.sim.step()
        self._refresh_base_state()
        self.episode_length += 1
        # A world that blew up (a NaN or an infinity in its state) or whose contact or constraint buffers overflowed
        # is reset below; its last step counts for nothing: reward 0, no bootstrap, no statistics.
        nonfinite, overflowed = self.sim.nonfinite(), self.sim.overflowed()
        self.broken = nonfinite | overflowed

        # Contacts (Isaac Gym: net contact force tensor) and terminations.
        forces = self.sim.contact_force
        self.foot_contact = forces[:, self.feet, 2] > 1.0
        self.leg_contact = forces[:, self.leg_links].norm(dim=-1) > 0.1
        fell = (forces[:, self.trunk].norm(dim=-1) > 1.0) | (self.projected_gravity[:, 2] > -0.5)  # > 60 deg tilt
        fell &= ~self.broken
        truncated = (self.episode_length >= self.max_episode_length) & ~fell & ~self.broken
        self.terminated = fell

        reward = self._compute_reward()
        self._accumulate_stats(reward, fell, truncated)
        self.stats["nonfinite"] += nonfinite
        self.stats["overflows"] += overflowed

        # Commands are resampled mid-episode, so a policy learns to change gait on the fly.
        resample = (self.episode_length % self.resample_steps == 0)
        self._sample_commands(resample)
        self.last_actions.copy_(self.actions)
        self.last_dof_vel.copy_(self.dof_vel)

        final_obs = torch.where(self.broken[:, None], 0.0, self._observe())  # NaN * 0 is NaN: select, never multiply
        obs = self.reset(fell | truncated | self.broken)
        return obs, reward, fell | self.broken, truncated, final_obs

    def _compute_reward(self) -> torch.Tensor:
        total = torch.zeros(self.num_envs, device=self.device)
        for name in self.reward_names:
            if name == "termination":
                continue
            term = torch.where(self.broken, 0.0, getattr(self, f"_reward_{name}")() * REWARD_SCALES[name] * self.dt)
            self.episode_sums[name] += term
            total += term
        if self.args.only_positive_rewards:  # a Python bool: no device sync
            total.clamp_(min=0.0)
        term = self._reward_termination() * REWARD_SCALES["termination"] * self.dt
        self.episode_sums["termination"] += term
        return total + term

    def _accumulate_stats(self, reward, fell, truncated):
        st, done, ok = self.stats, fell | truncated, ~self.broken
        self.episode_return += reward
        st["episodes"] += done
        st["falls"] += fell
        st["return"] += self.episode_return * done
        st["length"] += self.episode_length * done
        st["lin_err"] += torch.where(ok, (self.commands[:, :2] - self.base_lin_vel[:, :2]).norm(dim=1), 0.0)
        st["ang_err"] += torch.where(ok, (self.commands[:, 2] - self.root_ang_vel_b[:, 2]).abs(), 0.0)
        st["err_steps"] += ok
        for name in self.reward_names:
            st[f"rew_{name}"] += self.episode_sums[name] * done
            self.episode_sums[name].masked_fill_(done | self.broken, 0.0)
        self.episode_return.masked_fill_(done | self.broken, 0.0)

    def pop_stats(self) -> dict[str, float]:
        """Means since the last call (one host sync). Episode means are over the episodes that ended."""
        values = dict(zip(self.stats, torch.stack(list(self.stats.values())).sum(dim=1).tolist()))
        for t in self.stats.values():
            t.zero_()
        episodes, steps = max(values["episodes"], 1.0), max(values["err_steps"], 1.0)
        out = {"lin_vel_error": values["lin_err"] / steps, "yaw_rate_error": values["ang_err"] / steps,
               "nonfinite_resets": values["nonfinite"], "overflows": values["overflows"]}
        if values["episodes"] > 0:
            out.update(episodes=values["episodes"], fall_rate=values["falls"] / episodes,
                       episodic_return=values["return"] / episodes,
                       episodic_length_s=values["length"] / episodes * self.dt)
            out.update({f"reward_{n}": values[f"rew_{n}"] / episodes for n in self.reward_names})
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
        # legged_gym: on touchdown, reward (air time - 0.5 s); contact is OR-ed with the previous step's
        # because the contact force of a foot on flat ground flickers.
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
    """Separate actor and critic MLPs, [512, 256, 128] with ELU (legged_gym's ActorCritic), and a state-independent
    learnable log standard deviation for the Gaussian policy."""

    def __init__(self, num_obs: int, num_actions: int, init_noise_std: float = 1.0, hidden=(512, 256, 128)):
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

    dones[t] is True when the episode ended after step t (fell or timed out); a time-out's reward already holds
    gamma * V(final observation), so cutting the bootstrap at every done is right for both kinds of ending.
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
    dones: torch.Tensor        # (T, N) bool: the episode ended after this step (fell or timed out)
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


def make_rollout_step(env: Go1Env, agent: ActorCritic, normalizer: ObservationNormalizer, storage: RolloutStorage,
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
    """Raw observation -> joint action, with the normalizer folded in: what a robot runs."""

    def __init__(self, normalizer: ObservationNormalizer, actor: nn.Module):
        super().__init__()
        self.normalizer, self.actor = normalizer, actor

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(self.normalizer(obs)).clamp(-100.0, 100.0)


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
    if (ckpt["obs_dim"], ckpt["act_dim"]) != (Go1Env.num_obs, Go1Env.num_actions):
        raise UserError(f"{path} has {ckpt['obs_dim']} observations and {ckpt['act_dim']} actions; "
                        f"this task has {Go1Env.num_obs} and {Go1Env.num_actions}")
    return ckpt


@torch.no_grad()
def evaluate(agent, normalizer, device, args, num_envs: int) -> dict[str, float]:
    """Deterministic policy on fresh environments and commands, for eval_episodes full episodes per environment
    (an environment that falls starts a new episode and counts one fall)."""
    # Random numbers of its own (the same environments at every evaluation); training's generator is left where it was.
    with ec.separate_rng(args.seed + 10_000, device):
        env = Go1Env(num_envs, device, args)
        obs = env.reset()

        def eval_step():
            obs.copy_(env.step(agent.act_deterministic(normalizer(obs)))[0])

        run_eval_step = ec.cuda_graphed(eval_step, device) if args.cudagraphs else eval_step
        for _ in range(env.max_episode_length * args.eval_episodes):
            run_eval_step()
        stats = env.pop_stats()
        return {"lin_vel_error": stats["lin_vel_error"], "yaw_rate_error": stats["yaw_rate_error"],
                "fall_rate": stats.get("fall_rate", 0.0), "episode_length_s": stats.get("episodic_length_s", 0.0),
                "episodes": stats.get("episodes", 0.0)}


def speed_gauge(frame: np.ndarray, command: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Draw three gauges (vx, vy, yaw rate; range -1.5..1.5) at the top of a video frame: green = command,
    red = actual. Plain NumPy, so no font or GUI toolkit is needed."""
    frame = frame.copy()
    h, w, _ = frame.shape
    for row, (c, a) in enumerate(zip(command, actual)):
        y = 8 + row * 14
        frame[y:y + 8, 10:w - 10] = 40
        frame[y:y + 8, w // 2] = 255
        for value, color in ((c, (0, 220, 0)), (a, (230, 30, 30))):
            x = int(w / 2 + np.clip(value / 1.5, -1, 1) * (w / 2 - 12))
            frame[y:y + 8, max(x - 2, 0):x + 2] = color
    return frame


@torch.no_grad()
def record_video(agent, normalizer, device, args, path: Path) -> None:
    """One environment under the deterministic policy, rendered on the host (outside the training loop)."""
    # Random numbers of its own (the same episode in every video); training's generator is left where it was.
    with ec.separate_rng(args.seed + 20_000, device):
        env = Go1Env(1, device, args)
        renderer = ec.Renderer(env.sim, width=640, height=480, camera="track")
        obs, frames, log = env.reset(), [], []
        try:
            for _ in range(args.video_length):
                obs, *_ = env.step(agent.act_deterministic(normalizer(obs)))
                command = env.commands[0].cpu().numpy()
                actual = torch.cat([env.base_lin_vel[0, :2], env.root_ang_vel_b[0, 2:]]).cpu().numpy()
                frames.append(speed_gauge(renderer.render(0), command, actual))
                log.append({"t": len(log) * env.dt, "command": command.tolist(), "actual": actual.tolist()})
        finally:
            renderer.close()
        ec.save_video(frames, path, fps=1.0 / env.dt)
        path.with_suffix(".json").write_text(json.dumps(log))  # commanded vs actual velocity, frame by frame


def run_dir_of(ckpt_path: str) -> Path:
    """runs/<run>/ for runs/<run>/checkpoints/x.pt; else the checkpoint's own folder."""
    folder = Path(ckpt_path).resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def export_policy(agent, normalizer, ckpt_path: str) -> list[Path]:
    out_dir = run_dir_of(ckpt_path) / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    policy = DeployedPolicy(normalizer, agent.actor).cpu().eval()
    example = torch.zeros(1, Go1Env.num_obs)
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
                 "video_interval", "video_length", "eval_envs", "eval_episodes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("lin_vel_x_range", "lin_vel_y_range", "ang_vel_yaw_range"):
        lo, hi = getattr(args, name)
        if lo > hi:
            raise UserError(f"--{name.replace('_', '-')} {lo} {hi}: give the lower bound first")
    if args.solver is not None and min(args.solver) < 1:
        raise UserError(f"--solver {args.solver[0]} {args.solver[1]}: both iteration counts must be at least 1 "
                        "(go1.xml's are 4 and 8)")
    if (args.eval or args.export) and not args.checkpoint:
        raise UserError(f"--{'eval' if args.eval else 'export'} needs a policy: add --checkpoint "
                        "runs/<run>/checkpoints/latest.pt")
    if args.num_envs is not None and (args.num_envs * args.num_steps) % args.num_minibatches:
        raise UserError(f"the batch of num_envs * num_steps = {args.num_envs * args.num_steps} does not split into "
                        f"{args.num_minibatches} minibatches: change --num-minibatches or --num-envs")


# GPU memory per environment at the default sizes (simulation, rollout storage, update activations): the slope of the
# memory in use against --num-envs in tests/benchmark_throughput.py on an H100 is 0.15 MB at 24 steps; --no-bf16 adds
# 0.13 MB (float32 activations, measured at 4096 environments). 0.29 MB, to cover both.
BYTES_PER_ENV_STEP = 12 * 1024


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
    if device.type == "cpu" and (args.num_envs is None or args.num_iterations is None):
        print(f"note: no GPU in use, so running small on the CPU (--num-envs {args.num_envs or 32}, --num-iterations "
              f"{args.num_iterations or 5}); this shows the pipeline, learning to walk needs a GPU", flush=True)
    args.num_envs = args.num_envs or (4096 if device.type == "cuda" else 32)
    args.num_iterations = args.num_iterations or (500 if device.type == "cuda" else 5)
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

    agent = ActorCritic(Go1Env.num_obs, Go1Env.num_actions, args.init_noise_std).to(device)
    agent.bf16 = args.bf16 and device.type == "cuda"
    normalizer = ObservationNormalizer(Go1Env.num_obs, clip=args.obs_clip).to(device)
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
        print(f"evaluating {args.checkpoint} on {args.num_envs} environments x {args.eval_episodes} episode(s)...")
        metrics = evaluate(agent, normalizer, device, args, args.num_envs)
        print(json.dumps(metrics, indent=2))
        out = run_dir_of(args.checkpoint) / "eval.json"
        out.write_text(json.dumps({"checkpoint": args.checkpoint, **metrics}, indent=2))
        if args.capture_video:
            video = out.with_name("eval_video.mp4")  # its frame log, eval_video.json, leaves eval.json alone
            record_video(agent, normalizer, device, args, video)
            print(f"wrote {video}")
        return

    # Everything that may fail on bad input or memory comes before anything is written.
    env = Go1Env(args.num_envs, device, args)
    T, N = args.num_steps, args.num_envs
    # Rollout storage, preallocated on the device, and the rollout step (one CUDA graph on a GPU, --cudagraphs).
    storage = RolloutStorage.allocate(T, N, Go1Env.num_obs, Go1Env.num_actions, device)
    if ckpt is not None and "env" in ckpt and ckpt["args"]["num_envs"] == N:
        storage.next_obs.copy_(env.load_state_dict(ckpt["env"]))  # exactly where the checkpoint stopped
        ec.set_rng_state(ckpt["rng"])
    else:
        if ckpt is not None:
            print(f"note: {args.checkpoint} was saved with {ckpt['args']['num_envs']} environments: the "
                  "environments start afresh", flush=True)
        storage.next_obs.copy_(env.reset())
        env.desynchronize()
    rollout_step = make_rollout_step(env, agent, normalizer, storage, args)
    run_rollout_step = ec.cuda_graphed(rollout_step, device) if args.cudagraphs else rollout_step
    finish_rollout = make_finish_rollout(agent, normalizer, storage, args)
    run_finish_rollout = ec.cuda_graphed(finish_rollout, device) if args.cudagraphs else finish_rollout
    ppo_update = make_ppo_update(agent, optimizer, storage, args)

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
    print(f"{run_name}: {args.num_envs} environments on {device}, {args.num_iterations} iterations of "
          f"{args.num_steps} steps", flush=True)

    # Ctrl-C or SIGTERM (a pre-empted job): finish the iteration, write a checkpoint, close the logs, exit.
    stop = {"signal": None}

    def request_stop(signum, _frame):
        stop["signal"] = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one stops at once
        print(f"\n{signal.Signals(signum).name}: finishing this iteration, then saving a checkpoint "
              "(send it again to stop at once)", flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)

    start_time = PROCESS_START
    print(f"start-up took {time.time() - start_time:.1f} s", flush=True)
    if args.compile:
        print("torch.compile: the first iteration compiles the rollout step and the update (about 30 s the first "
              "time, seconds once torch's cache holds them; --no-compile skips this)", flush=True)
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
        scalars = {
            "charts/SPS": sps, "charts/learning_rate": losses["learning_rate"], "charts/action_std": losses["action_std"],
            **{f"losses/{k}": losses[k] for k in ("value_loss", "policy_loss", "entropy", "old_approx_kl", "approx_kl",
                                                   "clipfrac", "explained_variance")},
            "perf/rollout_time": t_rollout, "perf/update_time": t_update,
            "perf/wall_time": time.time() - start_time,
            "metrics/lin_vel_error": stats["lin_vel_error"], "metrics/yaw_rate_error": stats["yaw_rate_error"],
            "charts/nonfinite_resets": stats["nonfinite_resets"], "charts/overflows": stats["overflows"],
        }
        if "episodes" in stats:
            scalars.update({"charts/episodic_return": stats["episodic_return"],
                            "charts/episodic_length": stats["episodic_length_s"] / env.dt,
                            "metrics/fall_rate": stats["fall_rate"]})
            scalars.update({f"rewards/{n}": stats[f"reward_{n}"] for n in env.reward_names})
        for k, v in scalars.items():
            writer.add_scalar(k, v, global_step)
        print(f"iter {iteration:5d}/{args.num_iterations} | steps {global_step:>11,} | SPS {sps:>9,} | "
              f"return {stats.get('episodic_return', float('nan')):7.2f} | v err {stats['lin_vel_error']:.3f} m/s | "
              f"yaw err {stats['yaw_rate_error']:.3f} rad/s | falls {stats.get('fall_rate', float('nan')):.3f} | "
              f"{time.time() - start_time:6.1f} s" + fault_note(stats), flush=True)

        last = iteration == args.num_iterations
        if stop["signal"] is None and args.eval_interval and (iteration % args.eval_interval == 0 or last):
            ev = evaluate(agent, normalizer, device, args, min(args.eval_envs, args.num_envs))
            for k, v in ev.items():
                writer.add_scalar(f"eval/{k}", v, global_step)
            writer.add_scalar("eval/wall_time", time.time() - start_time, global_step)
            print(f"  eval: v err {ev['lin_vel_error']:.3f} m/s | yaw err {ev['yaw_rate_error']:.3f} rad/s | "
                  f"falls {ev['fall_rate']:.3f} | training wall time {time.time() - start_time:.1f} s", flush=True)
        if iteration % args.save_interval == 0 or last or stop["signal"] is not None:
            # Everything needed to go on exactly as if never stopped: the environments and every generator included.
            payload = {"script": SCRIPT, "iteration": iteration, "global_step": global_step,
                       "model": agent.state_dict(), "optimizer": optimizer.state_dict(),
                       "normalizer": normalizer.state_dict(), "args": dataclasses.asdict(args),
                       "obs_dim": Go1Env.num_obs, "act_dim": Go1Env.num_actions,
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
            record_video(agent, normalizer, device, args, video)
            if args.track:
                wandb.log({"videos/policy": wandb.Video(str(video), format="mp4"), "global_step": global_step})

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
