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
import functools
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import envs_common as ec
from envs_common import UserError

SCRIPT = Path(__file__).stem
MAX_TIME_S = 86_400.0  # s: the longest episode, command or push interval accepted
POLICY_DT = 0.02  # s: a 50 Hz policy over go1.xml's 200 Hz physics, as legged_gym (sim dt 0.005 s, decimation 4)
TERRAINS = ("flat", "rough")  # --terrain
# The entropy bonus by terrain (--ent-coef's default): rsl_rl's 0.01 for legged_gym on flat ground; on rough terrain
# Isaac Lab's ANYmal-C rough configuration's 0.005, because with 0.01 the action noise grew all through training there
# and the curriculum stalled (README: Rough terrain).
ENT_COEF = {"flat": 0.01, "rough": 0.005}


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
    video_command: tuple[float, float] = (0.8, 0.0)
    """on rough terrain, the velocity (forward, lateral; m/s) held for the filmed robot, facing a flight of stairs"""
    video_level: float = 0.5
    """on rough terrain, the level of the filmed robot's stairs as a share of the levels (0.3 of 10 levels: level 3)"""
    save_interval: int = 100
    """iterations between two checkpoints (one is always written at the end)"""
    checkpoint: str | None = None
    """a checkpoint to resume training from (its arguments are adopted), or the policy for --eval or --export"""
    eval: bool = False
    """play the deterministic policy of --checkpoint on fresh commands and print its metrics; no training"""
    export: bool = False
    """write the policy of --checkpoint (normalizer folded in) as TorchScript and ONNX, with its contract"""
    sim2sim: bool = False
    """with --eval: also play the exported ONNX policy in MuJoCo's C engine (CPU) and print both simulators' metrics"""
    viewer: bool = False
    """with --eval: play the policy in MuJoCo's interactive viewer instead (needs a display; arrow keys steer)"""
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
    """number of PPO iterations of num_envs * num_steps steps each (default: on a GPU 500, 1500 on rough terrain;
    5 on the CPU)"""
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
    ent_coef: float | None = None
    """coefficient of the entropy bonus (default: 0.01 on flat ground, 0.005 with --terrain rough)"""
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
    """range of yaw rate commands (rad/s); with heading commands, the limits of the yaw rate they ask for"""
    heading_command: bool | None = None
    """command a heading, the yaw rate command following the heading error (legged_gym's heading_command), instead
    of a random yaw rate; default: on with --terrain rough, off on flat ground"""
    command_resample_s: float = 10.0
    """seconds between two velocity commands (and headings) of an environment"""
    only_positive_rewards: bool = False
    """clip each step's reward (termination aside) at zero, as legged_gym can"""
    action_scale: float = 0.25
    """joint target = home pose + action_scale * action (rad)"""
    solver: tuple[int, int] | None = None
    """Newton and line-search iterations per physics step instead of go1.xml's 4 and 8 (faster, less accurate)"""
    terrain: str = "flat"
    """'flat' (a plane) or 'rough': slopes, stairs and obstacles on a grid of levels, a terrain curriculum and a
    height scan"""
    terrain_levels: int = 10
    """with --terrain rough: rows of growing difficulty, 0 (nearly flat) to terrain_levels - 1 (the hardest)"""

    # Robustness: the differences between this simulator and a robot (legged_gym's domain_rand and noise)
    domain_rand: bool = True
    """draw each environment's friction, masses, centre of mass, PD gains and joint friction and armature from
    DOMAIN_RAND at each of its resets"""
    push_interval_s: float = 15.0
    """seconds of an episode between two pushes of a robot (0: no pushes)"""
    push_vel: float = 1.0
    """a push sets the trunk's velocity along x and along y to a uniform draw in [-push_vel, push_vel] m/s"""
    obs_noise: bool = True
    """add uniform noise of OBS_NOISE's scales to the policy's observations"""
    action_delay: bool = False
    """apply each action one policy step (20 ms) late, for a robot whose servos get their targets that late"""
    eval_interval: int = 100
    """iterations between two deterministic evaluations logged under eval/ (0: never)"""
    eval_envs: int = 1024
    """environments of an evaluation during training (at most num_envs)"""
    eval_episodes: int = 1
    """episodes per environment in an evaluation"""

    def __post_init__(self):
        if self.ent_coef is None:  # the default by terrain (an unknown --terrain is refused by check_args)
            self.ent_coef = ENT_COEF.get(self.terrain, ENT_COEF["flat"])


def check_args(args: Args) -> None:
    """Reject bad input before anything is created or written: UserError naming the flag and the fix."""
    ec.check_common_args(args)
    ec.check_range(args, "eval_episodes", 1, integer=True)
    ec.check_pair(args, "video_command", ordered=False)
    ec.check_range(args, "video_level", 0, 1)
    for name in ("episode_length_s", "command_resample_s"):  # at most a day: step counts stay machine integers
        ec.check_range(args, name, POLICY_DT, MAX_TIME_S, hint=f"from one policy step ({POLICY_DT} s) to a day")
    for name in ("lin_vel_x_range", "lin_vel_y_range", "ang_vel_yaw_range"):
        ec.check_pair(args, name)
    ec.check_range(args, "action_scale", 0, lo_open=True)
    ec.check_pair(args, "solver", lo=1, integer=True, ordered=False)
    if args.terrain not in TERRAINS:
        raise UserError(f"--terrain {args.terrain!r}: give one of {', '.join(TERRAINS)}")
    ec.check_range(args, "terrain_levels", 1, 100, integer=True, hint="legged_gym uses 10")
    ec.check_range(args, "push_interval_s", 0, MAX_TIME_S, hint="0 turns pushes off; at most a day")
    if 0 < args.push_interval_s < POLICY_DT:
        raise UserError(
            f"--push-interval-s {args.push_interval_s}: give at least one policy step ({POLICY_DT} s), or 0 for no "
            "pushes"
        )
    ec.check_range(args, "push_vel", 0, 10.0, hint="legged_gym pushes at up to 1 m/s; at most 10 m/s")
    for name in ("sim2sim", "viewer"):
        if getattr(args, name) and not args.eval:
            raise UserError(f"--{name} is a way to evaluate: add --eval (and --checkpoint)")
    if args.sim2sim and args.viewer:
        raise UserError("--sim2sim and --viewer together: give one of them (run the command twice)")
    if (args.sim2sim or args.viewer) and args.capture_video:
        flag = "--sim2sim" if args.sim2sim else "--viewer"
        raise UserError(f"--capture-video records --eval's video, not {flag}'s: drop one of them")
    if args.viewer:
        ec.check_display("--viewer")


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
    "termination": -1000.0,  # falling (not time-outs); legged_gym's A1: 0, its Cassie: -200; rough terrain: below
}
# On rough terrain (--terrain rough), one term more: a swing must lift the foot above what is under it, or the feet
# shuffle, which walks on slopes and obstacles but trips on every step (README: Rough terrain). MuJoCo Playground's
# Go1 joystick task has this term (its feet_height) at this scale; flat ground keeps legged_gym's table unchanged.
# And a lighter fall penalty: with gamma 0.99 per 20 ms step the critic looks about 2 s ahead, where the tracking
# that a climb wins back is worth about 2; at -1000 a fall costs 20, so no climb with a few percent of risk pays and
# the policy stands at the riser (README: Rough terrain). -200 is legged_gym's Cassie (its A1 and Isaac Lab's
# velocity task have none): a fall still costs more than the 2 s of reward it ends.
ROUGH_REWARD_SCALES = {
    **REWARD_SCALES,
    "feet_swing_height": -0.2,  # on touchdown, (the swing's peak above the terrain / FOOT_SWING_HEIGHT - 1)^2
    "termination": -200.0,
}
FOOT_SWING_HEIGHT = 0.1  # m: the peak a swing is asked for (MuJoCo Playground's Go1: max_foot_height)
TRACKING_SIGMA = 0.25
# Heading commands (--heading-command, the default on rough terrain): the yaw rate command is HEADING_GAIN times the
# heading error (rad/s per rad), clipped to the yaw rate range: legged_gym's heading_command. A random yaw rate walks
# the robot in a circle of radius v / yaw rate (1 m at 1 m/s and 1 rad/s), so it rarely leaves its tile and the
# terrain curriculum, which promotes by distance from the tile's centre, cannot tell walking from circling.
HEADING_GAIN = 0.5
STEADY_AFTER_S = 1.0  # tracking counts as steady-state from this long after a command change

# Domain randomization (--domain-rand): every environment draws its own model at each of its resets, uniformly in
# [low, high] (Isaac Gym and legged_gym draw once, when the environments are created). "x" multiplies go1.xml's
# value, "+" adds to it, "=" sets it. The ranges of MuJoCo Playground's Go1 (locomotion/go1/randomize.py), of
# legged_gym's LeggedRobotCfg.domain_rand and of Isaac Lab's velocity task (velocity_env_cfg.py), as cited.
DOMAIN_RAND = {
    # = the feet's sliding friction, one draw for the four; the feet's priority makes theirs the contacts' friction
    # (go1.xml). legged_gym's friction_range (Playground draws its floor's in [0.4, 1.0]).
    "foot_friction": (0.5, 1.25),
    # x every body's mass and its inertia, as a uniform change of density would. Playground's Go1 (mass only).
    "link_mass_scale": (0.9, 1.1),
    # + kg on the trunk, a payload at its centre of mass. legged_gym's added_mass_range, Playground's Go1.
    "trunk_added_mass": (-1.0, 1.0),
    # + m to the trunk's centre of mass along x and y, and along z. Isaac Lab's base_com.
    "trunk_com_xy": (-0.05, 0.05),
    "trunk_com_z": (-0.01, 0.01),
    # x each servo's stiffness kp. MuJoCo Playground's K1 (locomotion/k1/randomize.py, "joint stiffness").
    "kp_scale": (0.9, 1.1),
    # x each servo's damping kd: the joints' damping here (go1.xml sets joint damping 0: the servo's kv damps, as in
    # Playground's Go1). The kp range: no peer publishes a kd range for the Go1.
    "kd_scale": (0.9, 1.1),
    # x each joint's friction loss (static friction). Playground's Go1.
    "joint_friction_scale": (0.9, 1.1),
    # x each joint's armature (the reflected inertia of its rotor). Playground's Go1.
    "armature_scale": (1.0, 1.05),
}
# The MuJoCo model fields those draws write, one copy per world (MuJoCo Warp's batched model fields).
RANDOMIZED_FIELDS = (
    "geom_friction",
    "body_mass",
    "body_inertia",
    "body_ipos",
    "actuator_gainprm",
    "actuator_biasprm",
    "dof_frictionloss",
    "dof_armature",
)

# Observation noise (--obs-noise): each observation gets a uniform draw in [-s, s] at every step, s per group in
# the observation's own units. legged_gym's noise_scales at its noise_level 1.0 (it multiplies them by the same
# obs_scales as its observations, so in raw units they are these). Commands and the last actions are the policy's
# own: noiseless. The critic sees the same noisy observations as the actor, as in legged_gym: a critic with clean
# ones (Isaac Lab, mjlab: an asymmetric actor-critic) would need a second observation through the rollout storage,
# the time-out bootstrap and the recorded step, and legged_gym trains its quadrupeds with noise without it.
OBS_NOISE = {  # by the OBSERVATION table's names
    "base_lin_vel": 0.1,  # m/s
    "base_ang_vel": 0.2,  # rad/s
    "projected_gravity": 0.05,  # a unit vector
    "command": 0.0,
    "joint_pos": 0.01,  # rad
    "joint_vel": 1.5,  # rad/s
    "last_action": 0.0,
    "measured_heights": 0.1,  # m
}

# The observation, term by term in this order: name, size ("nu": one per actuator, in action order), units, meaning.
# observation() concatenates the terms by this table, Go1Env's docstring shows it, and --export writes it into the
# policy's contract. legged_gym's observation without its scales (the normalizer scales).
OBSERVATION = (
    ("base_lin_vel", 3, "m/s", "linear velocity of the trunk in the trunk frame (x forward, y left, z up)"),
    ("base_ang_vel", 3, "rad/s", "angular velocity of the trunk in the trunk frame"),
    ("projected_gravity", 3, "1", "unit vector of gravity in the trunk frame, (0, 0, -1) when upright"),
    ("command", 3, "m/s, m/s, rad/s", "commanded forward and lateral velocity (trunk frame) and yaw rate"),
    ("joint_pos", "nu", "rad", "joint positions minus the home pose"),
    ("joint_vel", "nu", "rad/s", "joint velocities"),
    ("last_action", "nu", "1", "the previous policy step's actions, clipped as the environment clips them"),
)
ACTION_CLIP = 100.0  # actions are clipped to +-100 (legged_gym's clip_actions)

# Rough terrain (--terrain rough). legged_gym's LeggedRobotCfg.terrain, which its A1 (a Go1-class robot) trains on
# as it is: 8 m x 8 m tiles, rows of growing difficulty (the curriculum's levels), 20 columns of terrain types in
# these proportions, the robots spawned on a 3 m flat platform at each tile's centre. Each tile is made of boxes
# (envs_common's Terrain section), each world holds its robot's tile.
TERRAIN_TYPES = {  # type: the share of the columns
    "smooth_slope": 0.1,  # a pit with sides of slope 0.4 * difficulty (legged_gym also has the pyramid)
    "rough_slope": 0.1,  # the same with 20 blocks 2 to 5 cm proud on its sides (legged_gym: +-5 cm noise)
    "stairs_up": 0.35,  # 31 cm deep steps of 5 to 23 cm: the robot starts in a pit and climbs out
    "stairs_down": 0.25,  # the same, the robot starts on top and climbs down
    "obstacles": 0.2,  # 20 blocks 1 to 2 m wide, 2.5 to 25 cm high, around the platform (legged_gym: also holes)
}
TERRAIN_COLUMNS = 20
TILE_SIZE = 8.0  # m
TERRAIN_PLATFORM = 3.0  # m: the flat square at each tile's centre
TERRAIN_GROUND = 25.0  # m of flat ground around each tile, for robots that walk off it (legged_gym's border)
CONTACT_BOXES = 6  # a robot geom touches at most this many boxes at once (sizes MuJoCo Warp's contact buffers)
MAX_INIT_LEVEL = 5  # robots start at a level drawn in 0..5 (legged_gym's max_init_terrain_level)
SPAWN_SPREAD = 1.0  # m: robots start within +-1 m of their tile's centre along x and y (on the platform)
# The trunk starts this high above its tile's platform: no foot inside the terrain whatever joint angles a reset
# draws (thigh 0.213 + calf 0.213 + foot radius 0.02 m; legged_gym's A1 starts at 0.42 m).
SPAWN_HEIGHT = 0.45  # m
# A world whose joint or trunk speed exceeds this is reset as blown up (counted, no reward, no bootstrap): no Go1
# motion comes near it (its joints top out near 30 rad/s); a robot wedged between box edges could be kicked.
BLOWN_UP_SPEED = 100.0  # m/s and rad/s
TILE_STATS = ("steps", "lin_err", "ss_steps", "lin_err_ss", "episodes", "falls", "walked_off")  # sums per tile


def terrain_tile(kind: str, difficulty: float, tile: float, ground: float, rng) -> ec.Boxes:
    """The boxes of one tile of type `kind` at `difficulty` in [0, 1] (the level over the top level), `tile` m wide,
    with `ground` m of ground around it: legged_gym's difficulty mapping (terrain.py's make_terrain), whose top row
    is difficulty 0.9; here the top level is 1.0, a little harder (steps 23 cm instead of 21)."""
    slope = 0.4 * difficulty  # rise over run
    step = 0.05 + 0.18 * difficulty  # m
    obstacle = 0.05 + 0.2 * difficulty  # m
    if kind in ("smooth_slope", "rough_slope"):
        pit = ec.pit_boxes(tile, slope, TERRAIN_PLATFORM, ground)
        if kind == "smooth_slope":
            return pit
        return ec.Boxes.join(pit, ec.pit_bumps(tile, slope, TERRAIN_PLATFORM, 20, (0.2, 0.5), (0.02, 0.05), rng))
    if kind in ("stairs_up", "stairs_down"):
        return ec.stairs_boxes(tile, 0.31, step if kind == "stairs_down" else -step, TERRAIN_PLATFORM, ground)
    if kind == "obstacles":
        return ec.block_boxes(tile, (obstacle / 2, obstacle), 1.0, 2.0, 20, TERRAIN_PLATFORM, ground, rng)
    raise ValueError(f"unknown terrain type {kind!r}")


@functools.lru_cache(maxsize=2)
def build_terrain(levels: int, seed: int) -> ec.TerrainTiles:
    """The rough terrain of `levels` rows and TERRAIN_COLUMNS columns, the same for a given (levels, seed): built once
    per process, shared by training, evaluations and videos."""
    columns = ec.columns_by_proportion(TERRAIN_TYPES, TERRAIN_COLUMNS)
    return ec.generate_tiles(terrain_tile, columns, levels, TILE_SIZE, TERRAIN_GROUND, seed=seed)


# The height scan (legged_gym's measured_heights): the terrain under 17 x 11 points 0.1 m apart around the trunk,
# x forward in [-0.8, 0.8] m and y left in [-0.5, 0.5] m, turning with the trunk's yaw (not its roll and pitch).
HEIGHT_SCAN_X = tuple(round(-0.8 + 0.1 * i, 1) for i in range(17))
HEIGHT_SCAN_Y = tuple(round(-0.5 + 0.1 * i, 1) for i in range(11))
HEIGHT_SCAN_CLIP = 1.0  # m (legged_gym clips at +-1 m)
SCAN_RAY_TOP = 10.0  # m: the scan's rays start this high, above any terrain, straight down
MEASURED_HEIGHTS = (
    "measured_heights",
    len(HEIGHT_SCAN_X) * len(HEIGHT_SCAN_Y),
    "m",
    "trunk height above the terrain at 17 x 11 points around it (x forward -0.8 to 0.8 m, y left -0.5 to 0.5 m, "
    "0.1 m apart, x-major, turning with the trunk's yaw), clipped to +-1 m; --terrain rough only",
)


@dataclass
class Go1Config:
    """The task's settings (the Args fields of the same names): what defines a trained policy's task."""

    episode_length_s: float
    lin_vel_x_range: tuple[float, float]
    lin_vel_y_range: tuple[float, float]
    ang_vel_yaw_range: tuple[float, float]
    heading_command: bool  # None in Args: resolved by from_args
    command_resample_s: float
    only_positive_rewards: bool
    action_scale: float
    solver: tuple[int, int] | None
    domain_rand: bool
    push_interval_s: float
    push_vel: float
    obs_noise: bool
    action_delay: bool
    terrain: str
    terrain_levels: int
    seed: int  # the terrain's (the same terrain for a given seed, whatever the process)

    @classmethod
    def from_args(cls, args: Args) -> Go1Config:
        cfg = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
        if cfg.heading_command is None:  # the default: headings on rough terrain (see HEADING_GAIN)
            cfg.heading_command = cfg.terrain == "rough"
        return cfg


# What a policy's observations and actions mean, and its task: --eval and --export take these from the checkpoint.
TASK_ARGS = tuple(f.name for f in dataclasses.fields(Go1Config) if f.name != "seed") + ("obs_clip",)


def observation_table(terrain: str) -> tuple:
    """The OBSERVATION table of a terrain: with --terrain rough, the height scan follows the flat task's terms."""
    return OBSERVATION + ((MEASURED_HEIGHTS,) if terrain == "rough" else ())


def base_frame(qpos: torch.Tensor, qvel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The trunk's linear velocity in its own frame (m/s) and the projected gravity (unit), each (N, 3), from the
    free joint's qpos (N, nq) and qvel (N, nv) (legged_gym's base_lin_vel and projected_gravity)."""
    quat = qpos[:, 3:7]
    return ec.quat_rotate_inverse(quat, qvel[:, 0:3]), ec.projected_gravity(quat)


def measured_heights(base_pos: torch.Tensor, base_quat: torch.Tensor, scan: torch.Tensor, height_map) -> torch.Tensor:
    """legged_gym's measured_heights: the trunk's height above the terrain (m) at the scan points, (N, P), clipped to
    +-HEIGHT_SCAN_CLIP. base_pos (N, 3) and base_quat (N, 4, w first) are the trunk's world pose, scan (P, 2) the
    points' (x, y) in the trunk's yaw frame (m), height_map a function of world points (N, P, 2) (m) giving the
    terrain's height under each (N, P) (m): Go1Env.terrain_height. On the device, no host sync: it runs inside the
    recorded step."""
    yaw = ec.yaw_from_quat(base_quat)[:, None]
    cos, sin = torch.cos(yaw), torch.sin(yaw)
    x = base_pos[:, 0:1] + cos * scan[:, 0] - sin * scan[:, 1]
    y = base_pos[:, 1:2] + sin * scan[:, 0] + cos * scan[:, 1]
    terrain = height_map(torch.stack([x, y], dim=-1))
    return (base_pos[:, 2:3] - terrain).clamp(-HEIGHT_SCAN_CLIP, HEIGHT_SCAN_CLIP)


def observation(qpos, qvel, commands, last_actions, default_dof_pos, heights=None) -> torch.Tensor:
    """The policy's observation (N, num_obs), laid out as observation_table() says, from the state: qpos (N, nq)
    and qvel (N, nv) (the free joint first, then one hinge per actuator), commands (N, 3), the last actions
    (N, nu), the home pose of the joints (nu,) and, on rough terrain, the height scan (N, P) (measured_heights).
    The one observation function: Go1Env calls it on MuJoCo Warp's state, and --sim2sim on MuJoCo C's, through the
    same Go1Env."""
    base_lin_vel, projected_gravity = base_frame(qpos, qvel)
    terms = {
        "base_lin_vel": base_lin_vel,
        "base_ang_vel": qvel[:, 3:6],  # MuJoCo's free joint: angular velocity already in the body frame
        "projected_gravity": projected_gravity,
        "command": commands,
        "joint_pos": qpos[:, 7:] - default_dof_pos,
        "joint_vel": qvel[:, 6:],
        "last_action": last_actions,
        "measured_heights": heights,
    }
    table = observation_table("flat" if heights is None else "rough")
    return torch.cat([terms[name] for name, *_ in table], dim=-1)


class Go1Env:
    """Batched velocity tracking. All state lives in (num_envs, ...) tensors on the device, written in place.

    Observation layout (the OBSERVATION table; num_obs = 12 + 3 * nu = 48 for the Go1; raw, the normalizer scales):
      [0:3]   base_lin_vel: trunk velocity, trunk frame (m/s)   [3:6]   base_ang_vel: trunk frame (rad/s)
      [6:9]   projected_gravity (unit, trunk frame)             [9:12]  command (vx m/s, vy m/s, yaw rate rad/s)
      [12:24] joint_pos: minus the home pose (rad)              [24:36] joint_vel (rad/s)
      [36:48] last_action
      [48:235] measured_heights, with --terrain rough only (num_obs 235): trunk height above 17 x 11 terrain points (m)
    Actions: one per actuator (the model's nu), joint target = home pose + action_scale * action.
    Commands: drawn from the configured ranges at each reset and every command_resample_s; with heading_command (the
    default on rough terrain), a heading (N,) is drawn instead of the yaw rate, and at every step the yaw rate command
    steers towards it (_steer_to_heading), so that the robots walk straight lines (Isaac Gym's legged_gym does so).

    Rough terrain (terrain "rough"): go1.xml's floor becomes terrain slots (static boxes), and each world holds the
    boxes of its environment's tile of build_terrain() (placed at each reset: ec.TerrainSlots on MuJoCo Warp, a
    model per tile on MuJoCo C). Each environment has a tile, terrain_level (N,) and terrain_col (N,), and starts
    each episode near its centre, env_origin (N, 3); at
    each reset the curriculum moves it a level up or down by how far it walked (_update_terrain_curriculum). With
    `curriculum=False` (evaluations) the environments are spread evenly over every tile and stay there.

    Robustness (each a Go1Config switch): with domain_rand, the simulator's per-world model fields (BatchedSim.model)
    are drawn from DOMAIN_RAND for each environment at each of its resets; pushes set the trunk's horizontal
    velocity every push_interval_s of an episode; obs_noise adds OBS_NOISE to the observations the policy gets
    (obs_noise holds the last draw); action_delay applies each action one step late.

    `sim` is the simulator class: MuJoCo Warp's BatchedSim, or MuJoCo's C engine (ec.CEngineSim) for --sim2sim and
    --viewer, behind the same interface, so that the observations, commands, terminations and metrics are this code.
    """

    def __init__(
        self, num_envs: int, device: torch.device, cfg: Go1Config | None = None, sim=None, curriculum: bool = True
    ):
        self.cfg = cfg = cfg or Go1Config.from_args(Args())
        self.device, self.num_envs = device, num_envs
        self.terrain = build_terrain(cfg.terrain_levels, cfg.seed) if cfg.terrain == "rough" else None
        if self.terrain is None:
            mjm = ec.load_model(ASSET)
        else:  # the floor becomes the terrain's box slots
            self.terrain_spec = ec.terrain_spec(ASSET, self.terrain.num_slots)
            mjm = self.terrain_spec.compile()
        if cfg.solver is not None:  # read when the model goes to MuJoCo Warp
            mjm.opt.iterations, mjm.opt.ls_iterations = cfg.solver
        # Contact forces: for feet air time, collisions and falls. No pose refresh: the one pose read (the feet's, for
        # a reward term) may lag a physics sub-step.
        decimation = max(1, round(POLICY_DT / mjm.opt.timestep))
        kwargs = dict(decimation=decimation, contact_forces=True, poses=False)
        if cfg.domain_rand:
            if sim is not None:  # MuJoCo C (--sim2sim, --viewer) steps the nominal model: it has no per-world fields
                raise ValueError("domain randomization needs MuJoCo Warp's per-world model fields (sim=None)")
            kwargs["per_world"] = RANDOMIZED_FIELDS
        if self.terrain is not None:
            kwargs["nconmax"], kwargs["njmax"] = ec.contact_capacity(mjm, static_touch=CONTACT_BOXES)
            if sim is None:
                kwargs["per_world"] = kwargs.get("per_world", ()) + ec.TerrainSlots.PER_WORLD
        self.sim = s = (sim or ec.BatchedSim)(mjm, num_envs, device, **kwargs)
        self.num_actions = nu = mjm.nu
        self.observation_table = observation_table(cfg.terrain)
        self.num_obs = ec.observation_size(self.observation_table, nu)
        self.dt = mjm.opt.timestep * decimation
        self.max_episode_length = int(round(cfg.episode_length_s / self.dt))
        self.resample_steps = max(1, int(round(cfg.command_resample_s / self.dt)))
        self.push_steps = max(1, int(round(cfg.push_interval_s / self.dt))) if cfg.push_interval_s > 0 else 0
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
        self.foot_radius = float(mjm.geom_size[s.geom_id(FEET[0]), 0])  # the feet are spheres (go1.xml)
        self.leg_links = torch.tensor([s.body_id(b) for b in LEG_LINKS], device=device)
        ranges = (cfg.lin_vel_x_range, cfg.lin_vel_y_range, cfg.ang_vel_yaw_range)
        self.command_lo = torch.tensor([r[0] for r in ranges], device=device)
        self.command_hi = torch.tensor([r[1] for r in ranges], device=device)
        # Domain randomization's constants, on the device (a recorded step copies nothing from the host).
        self.foot_geoms = torch.tensor([s.geom_id(f) for f in FEET], device=device)
        com_xy, com_z = DOMAIN_RAND["trunk_com_xy"], DOMAIN_RAND["trunk_com_z"]
        self.com_lo = torch.tensor([com_xy[0], com_xy[0], com_z[0]], device=device)
        self.com_hi = torch.tensor([com_xy[1], com_xy[1], com_z[1]], device=device)
        # The noise scale of each observation, term by term in the OBSERVATION table's order.
        self.noise_scale = torch.cat(
            [
                torch.full((nu if n == "nu" else n,), OBS_NOISE[name], device=device)
                for name, n, *_ in self.observation_table
            ]
        )
        assert self.noise_scale.numel() == self.num_obs

        def z(*shape, dtype=torch.float32):
            return torch.zeros(num_envs, *shape, dtype=dtype, device=device)

        # Carried from one step to the next (saved in checkpoints, for an exact resume).
        self.actions, self.last_actions, self.last_dof_vel = z(nu), z(nu), z(nu)
        self.commands, self.command_age = z(3), z(dtype=torch.long)
        self.heading = z()  # with heading commands: the commanded heading (yaw, rad, world frame)
        self.feet_air_time, self.last_contacts = z(len(FEET)), z(len(FEET), dtype=torch.bool)
        self.swing_peak = z(len(FEET))  # each foot's highest point above the terrain in its swing so far (m; 0: down)
        self.feet_ground = z(len(FEET))  # rough terrain: the terrain's height under each foot (m), with the scan
        self.episode_length, self.episode_return = z(dtype=torch.long), z()
        self.obs_noise = z(self.num_obs)  # the noise of the last observations returned (zero without obs_noise)
        # Computed once per step, read by several reward terms (legged_gym's post_physics_step).
        self.base_lin_vel, self.projected_gravity = z(3), z(3)
        self.foot_contact, self.leg_contact = z(len(FEET), dtype=torch.bool), z(len(LEG_LINKS), dtype=torch.bool)
        self.contact_filt = z(len(FEET), dtype=torch.bool)  # foot_contact at this step or the last (_filter_contacts)
        self.terminated, self.broken = z(dtype=torch.bool), z(dtype=torch.bool)
        self.reward_scales = ROUGH_REWARD_SCALES if self.terrain is not None else REWARD_SCALES
        self.reward_names = list(self.reward_scales)
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

        # Rough terrain: the tiles (Isaac Gym: env_origins), the height scan and the curriculum's state.
        self.terrain_level, self.terrain_col = z(dtype=torch.long), z(dtype=torch.long)
        self.env_origin, self.heights = z(3), z(0)
        self._tile_count = None  # rough terrain: robots per tile, counted by stat_tensors()
        if self.terrain is not None:
            t = self.terrain
            self.slots = ec.TerrainSlots(s, t) if isinstance(s, ec.BatchedSim) else None
            self._tile_models: dict = {}  # MuJoCo C: (level, col) -> its compiled model
            self.scan = torch.tensor(
                [(x, y) for x in HEIGHT_SCAN_X for y in HEIGHT_SCAN_Y], dtype=torch.float32, device=device
            )
            self.heights = z(len(self.scan))
            self._down = torch.tensor([0.0, 0.0, -1.0], device=device)  # the scan's rays point straight down
            self.num_levels, self.type_names = t.num_levels, list(TERRAIN_TYPES)
            self.tile_origins = torch.tensor(t.tile_origins, dtype=torch.float32, device=device)
            self.col_type = torch.tensor([self.type_names.index(c) for c in t.column_types], device=device)
            self.curriculum = curriculum
            ids = torch.arange(num_envs, device=device)
            if curriculum:  # legged_gym: columns in equal shares, levels drawn up to MAX_INIT_LEVEL
                self.terrain_col.copy_(ids * t.num_cols // num_envs)
                top = min(MAX_INIT_LEVEL, t.num_levels - 1)
                self.terrain_level.copy_((self._rand(num_envs) * (top + 1)).long().clamp_(max=top))
            else:  # evaluations: as many robots on every level, spread evenly over its columns
                per_level = -(-num_envs // t.num_levels)
                self.terrain_level.copy_(ids % t.num_levels)
                self.terrain_col.copy_((ids // t.num_levels) * t.num_cols // per_level)
            self.env_origin.copy_(self.tile_origins[self.terrain_level, self.terrain_col])
            self._place_tiles(torch.ones(num_envs, dtype=torch.bool, device=device))
            # Per (level, type) sums, reduced once per iteration: steps, lin_err, steady steps, steady lin_err,
            # episodes, falls, episodes that walked off their tile (the curriculum's promotions).
            self.tile_stats = torch.zeros(len(TILE_STATS), t.num_levels * len(self.type_names), device=device)

    STATE = (
        "actions",
        "last_actions",
        "last_dof_vel",
        "commands",
        "command_age",
        "heading",
        "feet_air_time",
        "last_contacts",
        "swing_peak",
        "episode_length",
        "episode_return",
        "obs_noise",
        "terrain_level",
        "terrain_col",
        "env_origin",
    )

    def state_dict(self) -> dict:
        return {
            "sim": self.sim.get_state(),
            "episode_sums": {k: v.clone() for k, v in self.episode_sums.items()},
            **{k: getattr(self, k).clone() for k in self.STATE},
        }

    def load_state_dict(self, state: dict) -> torch.Tensor:
        """Restore a state_dict() and return the observations it gives (their noise included: the same as the
        policy got when the state was saved)."""
        self.sim.set_state(state["sim"])
        for k, v in self.episode_sums.items():
            if k in state["episode_sums"]:
                v.copy_(state["episode_sums"][k])
            else:  # a term that the saved run did not have (a checkpoint from before it) starts at zero
                v.zero_()
        for k in self.STATE:
            if k in state:
                getattr(self, k).copy_(state[k])
        if self.terrain is not None:  # each world's boxes follow from its tile
            self._place_tiles(torch.ones(self.num_envs, dtype=torch.bool, device=self.device))
        self._refresh_base_state()
        return self._observe() + self.obs_noise if self.cfg.obs_noise else self._observe()

    # ------------------------------------------------------------------------------------------------------------
    def _rand(self, *shape, lo=0.0, hi=1.0):
        # torch's global generator (seeded, saved in checkpoints); a private one would stop torch.compile's tracing
        return lo + (hi - lo) * torch.rand(*shape, device=self.device)

    def _sample_commands(self, mask: torch.Tensor):
        cmd = self.command_lo + (self.command_hi - self.command_lo) * self._rand(self.num_envs, 3)
        cmd[:, :2] *= cmd[:, :2].norm(dim=1, keepdim=True) > 0.2  # tiny commands mean "stand still"
        self.commands.copy_(torch.where(mask[:, None], cmd, self.commands))
        self.command_age.masked_fill_(mask, 0)
        if self.cfg.heading_command:  # a Python bool: flat ground's default draws exactly what it drew before
            heading = self._rand(self.num_envs, lo=-math.pi, hi=math.pi)
            self.heading.copy_(torch.where(mask, heading, self.heading))
            self._steer_to_heading()

    def _steer_to_heading(self) -> None:
        """With heading commands, the yaw rate command (commands[:, 2]) becomes HEADING_GAIN times the heading error
        (wrapped to [-pi, pi)), clipped to ang_vel_yaw_range: legged_gym's heading_command, at every step."""
        if not self.cfg.heading_command:
            return
        error = torch.remainder(self.heading - ec.yaw_from_quat(self.root_quat) + math.pi, 2 * math.pi) - math.pi
        self.commands[:, 2].copy_(torch.clamp(HEADING_GAIN * error, self.command_lo[2], self.command_hi[2]))

    def reset(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reset the environments in `mask` (all if None) on the device and return all observations."""
        if mask is None:
            mask = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        n, s = self.num_envs, self.sim
        # The optional parts (models, noise, pushes) draw their random numbers whether on or off, so that every
        # configuration consumes the random stream alike: the nominal and randomized evaluations (and sim-to-sim)
        # then see the same starts and commands, and differ only by what is switched on.
        draws = self._draw_model()
        if self.cfg.domain_rand:
            self._randomize_model(mask, draws)  # s.reset() below refreshes the constants MuJoCo derives from it
        qpos = s.default_qpos.expand(n, -1).clone()
        if self.terrain is not None:  # on the tile's platform, the feet above it
            self._place_tiles(mask)
            qpos[:, 0:3] += self.env_origin
            qpos[:, 2] += SPAWN_HEIGHT - s.default_qpos[2]
            qpos[:, 0:2] += self._rand(n, 2, lo=-SPAWN_SPREAD, hi=SPAWN_SPREAD)
        qpos[:, 3:7] = ec.quat_from_yaw(self._rand(n, lo=-math.pi, hi=math.pi))  # any heading
        qpos[:, 7:] = self._rand(
            n, self.num_actions, lo=self.reset_dof_lo, hi=self.reset_dof_hi
        )  # home * U(0.5, 1.5), in range
        qpos[:, 7:].clamp_(self.dof_lower, self.dof_upper)  # float rounding must not step past a limit
        qvel = torch.zeros(n, s.mjm.nv, device=self.device)
        qvel[:, 0:6] = self._rand(n, 6, lo=-0.5, hi=0.5)  # legged_gym: base velocities U(-0.5, 0.5)
        s.reset(mask, qpos, qvel, ctrl=qpos[:, 7:])
        m = mask[:, None]
        for t in (self.actions, self.last_actions, self.last_dof_vel, self.feet_air_time, self.swing_peak):
            t.masked_fill_(m, 0.0)
        self.last_contacts.masked_fill_(m, False)
        self.episode_length.masked_fill_(mask, 0)
        self._sample_commands(mask)
        self._refresh_base_state()
        return self._add_obs_noise(self._observe())

    def _place_tiles(self, mask: torch.Tensor) -> None:
        """The worlds in `mask` get the boxes of their environment's tile (terrain_level, terrain_col). Isaac Gym
        needs nothing of the kind: its environments share one terrain mesh."""
        if self.slots is not None:  # MuJoCo Warp: in place on the device
            self.slots.place(mask, self.terrain_level, self.terrain_col)
            return
        for i in mask.nonzero()[:, 0].tolist():  # MuJoCo C: a compiled model per tile (a CPU simulator anyway)
            tile = (int(self.terrain_level[i]), int(self.terrain_col[i]))
            if self.sim.models[i] is not self._tile_models.get(tile):
                if tile not in self._tile_models:
                    self._tile_models[tile] = ec.place_tile(self.terrain_spec, self.terrain.tile(*tile))
                self.sim.set_model(i, self._tile_models[tile])

    def terrain_height(self, xy: torch.Tensor) -> torch.Tensor:
        """The height (m) of each world's terrain under its points xy (N, P, 2) (world x, y, m), (N, P): rays cast
        straight down from SCAN_RAY_TOP against the terrain's boxes (MuJoCo's ray casting: the height scan sees
        exactly what the robot stands on; legged_gym reads its height samples)."""
        if self.slots is not None:  # MuJoCo Warp: against the world's own boxes, a Warp kernel
            return self.slots.heights(xy, SCAN_RAY_TOP)
        origin = torch.cat([xy, torch.full_like(xy[..., :1], SCAN_RAY_TOP)], dim=-1)
        dist = self.sim.rays(origin, self._down.expand_as(origin), ec.TERRAIN_GROUP)  # MuJoCo C: mj_ray
        return torch.where(dist >= 0, SCAN_RAY_TOP - dist, ec.TERRAIN_BOTTOM - 1.0)

    def _draw_model(self) -> dict[str, torch.Tensor]:
        """One model per environment, drawn from DOMAIN_RAND: {key: (num_envs, ...) uniform draws}."""
        n, nbody, nv, nu = self.num_envs, self.sim.mjm.nbody, self.sim.mjm.nv, self.num_actions

        def draw(key, *shape):  # (n, *shape) uniform draws in DOMAIN_RAND[key]
            return self._rand(n, *shape, lo=DOMAIN_RAND[key][0], hi=DOMAIN_RAND[key][1])

        return {
            "foot_friction": draw("foot_friction", 1),
            "link_mass_scale": draw("link_mass_scale", nbody),
            "trunk_added_mass": draw("trunk_added_mass"),
            "trunk_com": self._rand(n, 3, lo=self.com_lo, hi=self.com_hi),
            "kp_scale": draw("kp_scale", nu),
            "kd_scale": draw("kd_scale", nu),
            "joint_friction_scale": draw("joint_friction_scale", nv),
            "armature_scale": draw("armature_scale", nv),
        }

    def _randomize_model(self, mask: torch.Tensor, draw: dict[str, torch.Tensor]) -> None:
        """Write the models of `draw` (from _draw_model) into the simulator's per-world fields for the environments
        in `mask` (in place; the others keep theirs bit for bit). legged_gym's _process_rigid_shape_props and
        _process_rigid_body_props, there once at creation."""
        n, nom, field = self.num_envs, self.sim.nominal, self.sim.model

        def write(name, value):
            t = field[name]
            t.copy_(torch.where(mask.view(-1, *[1] * (t.dim() - 1)), value, t))

        friction = nom["geom_friction"].repeat(n, 1, 1)  # (n, ngeom, 3): sliding, torsional, rolling
        friction[:, self.foot_geoms, 0] = draw["foot_friction"]
        write("geom_friction", friction)
        scale = draw["link_mass_scale"]
        mass = nom["body_mass"] * scale
        mass[:, self.trunk] += draw["trunk_added_mass"]
        write("body_mass", mass)
        write("body_inertia", nom["body_inertia"] * scale[..., None])
        ipos = nom["body_ipos"].repeat(n, 1, 1)
        ipos[:, self.trunk] += draw["trunk_com"]
        write("body_ipos", ipos)
        # A position servo: force = kp * (target - q) - kd * qdot, as gainprm[0] = kp, biasprm[1] = -kp, biasprm[2]
        # = -kd (MuJoCo's <position>).
        kp, kd = draw["kp_scale"], draw["kd_scale"]
        gain, bias = nom["actuator_gainprm"].repeat(n, 1, 1), nom["actuator_biasprm"].repeat(n, 1, 1)
        gain[..., 0] *= kp
        bias[..., 1] *= kp
        bias[..., 2] *= kd
        write("actuator_gainprm", gain)
        write("actuator_biasprm", bias)
        write("dof_frictionloss", nom["dof_frictionloss"] * draw["joint_friction_scale"])
        write("dof_armature", nom["dof_armature"] * draw["armature_scale"])

    def desynchronize(self) -> None:
        """Start every environment at a random point of its episode (legged_gym's init_at_random_ep_len), so that
        they do not all time out on the same step."""
        self.episode_length.copy_((self._rand(self.num_envs) * self.max_episode_length).long())

    def _observe(self) -> torch.Tensor:
        heights = self.heights if self.terrain is not None else None
        return observation(self.sim.qpos, self.sim.qvel, self.commands, self.actions, self.default_dof_pos, heights)

    def _add_obs_noise(self, obs: torch.Tensor) -> torch.Tensor:
        """`obs` (num_envs, num_obs) plus uniform noise of OBS_NOISE's scales with --obs-noise (legged_gym's
        add_noise), else `obs` itself. The draw is kept in obs_noise, so that a resumed run gets back the very
        observations the policy acted on."""
        noise = self._rand(self.num_envs, self.num_obs, lo=-1.0, hi=1.0) * self.noise_scale  # drawn even when off
        if not self.cfg.obs_noise:
            return obs
        self.obs_noise.copy_(noise)
        return obs + self.obs_noise

    def _push_robots(self) -> None:
        """legged_gym's push_robots: the trunk's world-frame velocity along x and along y set to a uniform draw in
        [-push_vel, push_vel], for the environments whose episode has run a whole number of push intervals.
        legged_gym pushes all environments at once on a global step counter; here each environment's own episode
        clock decides (a Python counter would be frozen into a recorded CUDA graph), so that, with episodes
        desynchronized, pushes are spread over the rollout instead of all robots staggering at once."""
        kick = self._rand(self.num_envs, 2, lo=-self.cfg.push_vel, hi=self.cfg.push_vel)  # drawn even when off
        if not self.push_steps:  # a Python int of the config: no device sync
            return
        due = (self.episode_length > 0) & (self.episode_length % self.push_steps == 0)
        velocity = self.root_lin_vel_w[:, :2]  # a view of the simulator's qvel
        velocity.copy_(torch.where(due[:, None], kick, velocity))

    def _filter_contacts(self) -> None:
        """contact_filt (N, 4): a foot touches if its contact force was above 1 N at this step or the last, because a
        foot's contact force flickers (legged_gym's contact_filt, read by the feet's reward terms)."""
        self.contact_filt.copy_(self.foot_contact | self.last_contacts)
        self.last_contacts.copy_(self.foot_contact)

    def _refresh_base_state(self) -> None:
        base_lin_vel, projected_gravity = base_frame(self.sim.qpos, self.sim.qvel)
        self.base_lin_vel.copy_(base_lin_vel)
        self.projected_gravity.copy_(projected_gravity)
        if self.terrain is not None:
            self.heights.copy_(measured_heights(self.root_pos, self.root_quat, self.scan, self._scan_and_feet))

    def _scan_and_feet(self, xy: torch.Tensor) -> torch.Tensor:
        """terrain_height of the scan's points xy (N, P, 2), and of the feet (into feet_ground) in the same cast:
        one ray launch per step instead of two (the launch costs more than the four rays)."""
        feet = self.sim.xpos[:, self.feet, :2]  # one physics sub-step behind qpos: fine for a reward
        ground = self.terrain_height(torch.cat([xy, feet], dim=1))
        self.feet_ground.copy_(ground[:, -len(FEET) :])
        return ground[:, : -len(FEET)]

    def _update_terrain_curriculum(self, mask: torch.Tensor) -> None:
        """legged_gym's terrain curriculum, for the environments in `mask` whose episode ended. The distance is the
        trunk's from its tile's centre (env_origin; it started within SPAWN_SPREAD of it along x and y): beyond half a
        tile, a level up; under half of what the current command asks for over a whole episode_length_s, a level
        down (never below 0), so that a fall or a short first (desynchronized) episode counts as a failure, as in
        legged_gym; up from the top level, a random level, so that the top does not fill up and the lower levels stay
        practised. A level change moves the robot to the tile of the new level in its column; the next reset starts
        it there. The distance measures walking only when robots walk straight lines: heading commands (the rough
        terrain's default; HEADING_GAIN says why)."""
        if self.terrain is None or not self.curriculum:  # Python values of the configuration: no device sync
            return
        walked = (self.root_pos[:, :2] - self.env_origin[:, :2]).norm(dim=1)
        up = walked > TILE_SIZE / 2
        down = (walked < self.commands[:, :2].norm(dim=1) * self.cfg.episode_length_s * 0.5) & ~up
        level = self.terrain_level + up.long() - down.long()
        top = self.num_levels - 1
        anywhere = (self._rand(self.num_envs) * (top + 1)).long().clamp_(max=top)
        level = torch.where(level > top, anywhere, level.clamp(min=0))
        self.terrain_level.copy_(torch.where(mask, level, self.terrain_level))
        self.env_origin.copy_(self.tile_origins[self.terrain_level, self.terrain_col])

    def adopt_levels(self, level: torch.Tensor, col: torch.Tensor) -> None:
        """Carry a checkpoint's curriculum over to robots that start afresh (a resume with another number of robots
        or processes): each robot takes the level of a saved robot of its terrain type (of any type where its type
        had none), drawn at random. `level`, `col` (M,): the saved robots' terrain_level and terrain_col. At
        start-up, before reset(); host-side."""
        level, col = level.to(self.device), col.to(self.device)
        saved_type, own_type = self.col_type[col], self.col_type[self.terrain_col]
        for ty in range(len(self.type_names)):
            pool = level[saved_type == ty] if (saved_type == ty).any() else level
            on = (own_type == ty).nonzero().squeeze(1)
            pick = (self._rand(len(on)) * len(pool)).long().clamp_(max=len(pool) - 1)
            self.terrain_level[on] = pool[pick].clamp(max=self.num_levels - 1)
        self.env_origin.copy_(self.tile_origins[self.terrain_level, self.terrain_col])

    # ------------------------------------------------------------------------------------------------------------
    def step(self, actions: torch.Tensor):
        """Apply actions (num_envs, num_actions) for one policy step. Returns (obs, reward, terminated, truncated,
        final_obs): environments that ended are already reset, so obs is their next episode's first observation
        and final_obs their last one (to bootstrap the value on time-outs).

        State is written in place only and nothing branches on tensor values, so that a CUDA graph can replay it."""
        self.actions.copy_(actions.clamp(-ACTION_CLIP, ACTION_CLIP))
        # --action-delay: the servos get the previous step's action (last_actions: zero at an episode's start).
        applied = self.last_actions if self.cfg.action_delay else self.actions
        self.sim.ctrl.copy_(self.default_dof_pos + self.cfg.action_scale * applied)  # PD targets
        self._push_robots()
        self.sim.step()
        self._refresh_base_state()
        self._steer_to_heading()
        self.episode_length += 1
        self.command_age += 1
        # A world that blew up (NaN or infinity) or overflowed its contact buffers is reset below; its last step
        # counts for nothing: reward 0, no bootstrap, no statistics.
        nonfinite, overflowed = self.sim.nonfinite(), self.sim.overflowed()
        if self.terrain is not None:  # a blown-up world (BLOWN_UP_SPEED)
            nonfinite = nonfinite | (self.sim.qvel.abs() > BLOWN_UP_SPEED).any(dim=1)
        self.broken.copy_(nonfinite | overflowed)

        # Contacts (Isaac Gym: the net contact force tensor) and terminations.
        forces = self.sim.contact_force
        self.foot_contact.copy_(forces[:, self.feet, 2] > 1.0)
        self._filter_contacts()
        self.leg_contact.copy_(forces[:, self.leg_links].norm(dim=-1) > 0.1)
        fell = (forces[:, self.trunk].norm(dim=-1) > 1.0) | (self.projected_gravity[:, 2] > -0.5)  # > 60 deg tilt
        self.terminated.copy_(fell & ~self.broken)
        truncated = (self.episode_length >= self.max_episode_length) & ~self.terminated & ~self.broken

        reward = self._compute_reward()
        self._accumulate_stats(reward, self.terminated, truncated, nonfinite, overflowed)
        self._sample_commands(self.episode_length % self.resample_steps == 0)  # new commands mid-episode
        self.last_actions.copy_(self.actions)
        self.last_dof_vel.copy_(self.dof_vel)

        # NaN * 0 is NaN: select, never multiply.
        final_obs = torch.where(self.broken[:, None], 0.0, self._add_obs_noise(self._observe()))
        done = self.terminated | self.broken
        self._update_terrain_curriculum((done | truncated) & ~self.broken)
        obs = self.reset(done | truncated)
        return obs, reward, done, truncated, final_obs

    def _compute_reward(self) -> torch.Tensor:
        """Sum of every term times its scale and dt, by name (legged_gym's compute_reward)."""
        total = torch.zeros(self.num_envs, device=self.device)
        for name in self.reward_names:
            if name == "termination":
                continue
            term = torch.where(
                self.broken, 0.0, getattr(self, f"_reward_{name}")() * self.reward_scales[name] * self.dt
            )
            self.episode_sums[name] += term
            total += term
        if self.cfg.only_positive_rewards:  # a Python bool: no device sync
            total.clamp_(min=0.0)
        term = self._reward_termination() * self.reward_scales["termination"] * self.dt
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
        if self.terrain is not None:  # the same by tile: level and type
            walked_off = (self.root_pos[:, :2] - self.env_origin[:, :2]).norm(dim=1) > TILE_SIZE / 2
            tile = self._tile()
            rows = (ok, lin_err, steady, lin_err * steady, done, fell, done & walked_off)
            self.tile_stats.index_add_(1, tile, torch.stack([r.float() for r in rows]))
        for name in self.reward_names:
            st[f"rew_{name}"] += self.episode_sums[name] * done
            self.episode_sums[name].masked_fill_(done | self.broken, 0.0)
        self.episode_return.masked_fill_(done | self.broken, 0.0)

    def _tile(self) -> torch.Tensor:
        """Each robot's tile statistics column, (N,) long: level * number of types + its column's type."""
        return self.terrain_level * len(self.type_names) + self.col_type[self.terrain_col]

    def stat_tensors(self) -> list[torch.Tensor]:
        """The statistics' sums, which torch.distributed adds up over processes before pop_stats(); on rough terrain
        with the count of robots per tile, counted now."""
        tensors = list(self.stats.values())
        if self.terrain is not None:
            tile = self._tile()
            self._tile_count = torch.zeros(self.tile_stats.shape[1], device=self.device).index_add_(
                0, tile, torch.ones(self.num_envs, device=self.device)
            )
            tensors += [self.tile_stats, self._tile_count]
        return tensors

    def pop_stats(self) -> dict[str, float]:
        """Means since the last call (one host sync). Tracking errors: overall, and steady-state (from
        STEADY_AFTER_S after each command change on); episode means over the episodes that ended. On rough terrain
        also, by terrain type and by tile ("tile/<type>/<level>/..."), and the curriculum's levels now
        ("curriculum/..."); see terrain_figures()."""
        tensors = self.stat_tensors() if self._tile_count is None else list(self.stats.values())
        v = dict(zip(self.stats, torch.stack(tensors[: len(self.stats)]).sum(dim=1).tolist()))
        terrain = self.terrain_figures() if self.terrain is not None else {}
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
        return {**out, **terrain}

    def terrain_figures(self) -> dict[str, float]:
        """The rough terrain's sums since the last pop_stats() as figures, and zeroes them: for each terrain type and
        level, "tile/<type>/<level>/" + lin_vel_error, lin_vel_error_steady, fall_rate, its 95% interval, episodes
        and walked_off (the share of episodes that left their tile: the curriculum's promotions); for each type
        "terrain/<type>/" + lin_vel_error and fall_rate; and the curriculum's state: "curriculum/mean_level" (levels
        from 0), by type, and "curriculum/level_fraction/<level>" (the share of robots on each level)."""
        sums = self.tile_stats.view(len(TILE_STATS), self.num_levels, len(self.type_names))
        count = self._tile_count.view(self.num_levels, len(self.type_names))
        sums, count = sums.tolist(), count.tolist()
        self.tile_stats.zero_()
        self._tile_count = None
        k = {name: i for i, name in enumerate(TILE_STATS)}

        def figures(sel) -> dict[str, float]:  # sel: [(level, type)] pooled
            total = {name: sum(sums[i][lv][ty] for lv, ty in sel) for name, i in k.items()}
            low, high = ec.wilson_interval(total["falls"], total["episodes"])
            nan = float("nan")
            return {
                "lin_vel_error": total["lin_err"] / total["steps"] if total["steps"] else nan,
                "lin_vel_error_steady": total["lin_err_ss"] / total["ss_steps"] if total["ss_steps"] else nan,
                "fall_rate": total["falls"] / total["episodes"] if total["episodes"] else nan,
                "fall_rate_ci95_low": low,
                "fall_rate_ci95_high": high,
                "episodes": total["episodes"],
                "walked_off": total["walked_off"] / total["episodes"] if total["episodes"] else nan,
                "steps": total["steps"],
                "steady_steps": total["ss_steps"],
            }

        out = {}
        levels = range(self.num_levels)
        robots = sum(map(sum, count))
        for ty, name in enumerate(self.type_names):
            for lv in levels:
                out.update({f"tile/{name}/{lv}/{m}": x for m, x in figures([(lv, ty)]).items()})
            whole = figures([(lv, ty) for lv in levels])
            out[f"terrain/{name}/lin_vel_error"], out[f"terrain/{name}/fall_rate"] = (
                whole["lin_vel_error"],
                whole["fall_rate"],
            )
            on_type = sum(count[lv][ty] for lv in levels)
            out[f"curriculum/mean_level/{name}"] = (
                sum(lv * count[lv][ty] for lv in levels) / on_type if on_type else float("nan")
            )
        out["curriculum/mean_level"] = sum(lv * sum(count[lv]) for lv in levels) / max(robots, 1)
        out.update({f"curriculum/level_fraction/{lv}": sum(count[lv]) / max(robots, 1) for lv in levels})
        return out

    # ---- Reward terms: one small function each, scaled by reward_scales (REWARD_SCALES or ROUGH_REWARD_SCALES) --
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
        # On rough terrain, above the mean of the height scan's points (legged_gym).
        height = self.heights.mean(dim=1) if self.terrain is not None else self.root_pos[:, 2]
        return (height - self.base_height_target).square()

    def _reward_torques(self):
        return self.sim.act_force.square().sum(dim=1)

    def _reward_energy(self):
        return (self.sim.act_force * self.dof_vel).abs().sum(dim=1)

    def _reward_dof_acc(self):
        return ((self.dof_vel - self.last_dof_vel) / self.dt).square().sum(dim=1)

    def _reward_action_rate(self):
        return (self.actions - self.last_actions).square().sum(dim=1)

    def _reward_feet_air_time(self):
        # legged_gym: on touchdown, reward (air time - 0.5 s).
        first_contact = (self.feet_air_time > 0.0) & self.contact_filt
        self.feet_air_time += self.dt
        reward = ((self.feet_air_time - 0.5) * first_contact).sum(dim=1)
        reward *= self.commands[:, :2].norm(dim=1) > 0.1
        self.feet_air_time *= ~self.contact_filt
        return reward

    def _reward_feet_swing_height(self):
        # MuJoCo Playground's Go1 feet_height, the height taken above the terrain under the foot (there: above z = 0),
        # so that a swing clears a step: on touchdown, (peak / FOOT_SWING_HEIGHT - 1)^2, only while asked to move.
        feet_z = self.sim.xpos[:, self.feet, 2]  # (N, 4), one physics sub-step behind qpos: fine for a reward
        ground = self.feet_ground if self.terrain is not None else 0.0  # computed with the height scan
        height = (feet_z - self.foot_radius - ground).clamp(max=HEIGHT_SCAN_CLIP)  # a ray that missed: no 4 m peak
        touchdown = self.contact_filt & (self.swing_peak > 0.0)  # the peak is > 0 from a swing's first step on
        cost = ((self.swing_peak / FOOT_SWING_HEIGHT - 1.0).square() * touchdown).sum(dim=1)
        cost *= self.commands[:, :2].norm(dim=1) > 0.1
        self.swing_peak.copy_(
            torch.where(self.contact_filt, 0.0, torch.maximum(self.swing_peak, height.clamp(min=1e-3)))
        )
        return cost

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
    # --sim2sim: 64 worlds for the bar's 64 episodes (MuJoCo C steps them one by one on the CPU); --viewer shows one.
    args.num_envs = args.num_envs or (
        64 if args.sim2sim else 1 if args.viewer else 4096 if device.type == "cuda" else 32
    )
    args.num_iterations = args.num_iterations or (
        5 if device.type == "cpu" else 500 if args.terrain == "flat" else 1500
    )
    args.heading_command = Go1Config.from_args(args).heading_command  # its default, resolved, goes into the run
    check_args(args)
    ec.note_gpu_only_flags(args, device)
    for name in ("terrain_levels", "video_command", "video_level"):  # rough terrain's own: said, not ignored silently
        if args.terrain == "flat" and getattr(args, name) != getattr(Args, name) and dist.is_main:
            print(f"note: {ec.flag(name)} is for --terrain rough only; this run is on flat ground", flush=True)
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
        for name in ("terrain_levels", "seed") if args.terrain == "rough" and not (args.eval or args.export) else ():
            if ckpt["args"][name] != getattr(args, name):  # they build the terrain its robots stand on
                raise UserError(
                    f"{ec.flag(name)} {getattr(args, name)}: {args.checkpoint}'s robots are on the terrain of "
                    f"{ec.flag(name)} {ckpt['args'][name]}; resume with that, or start a new run"
                )
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
            levels = saved_levels(ckpt) if env.terrain is not None else None
            if levels is not None:  # the curriculum goes on where it was
                env.adopt_levels(*levels)
            carried = ", on the curriculum's levels by terrain type" if levels is not None else ""
            print(f"note: {args.checkpoint} was saved by {saved}: the environments start afresh{carried}", flush=True)
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
        dist.sum_(env.stat_tensors())  # every process's environments (sums per environment) in the figures
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
        scalars.update({k: v for k, v in stats.items() if k.startswith(("curriculum/", "terrain/"))})  # rough only
        logger.scalars(scalars, global_step)
        steady = iteration_times[2:][-20:]  # the first two iterations compile and record graphs
        left = float(np.median(steady)) * (args.num_iterations - iteration) if steady else float("nan")
        print(
            f"iter {iteration:5d}/{args.num_iterations} | steps {global_step:>11,} | SPS {sps:>9,} | "
            f"return {stats.get('episodic_return', float('nan')):7.2f} | v err {stats['lin_vel_error']:.3f} m/s | "
            f"yaw err {stats['yaw_rate_error']:.3f} rad/s | falls {stats.get('fall_rate', float('nan')):.3f} | "
            + (f"level {stats['curriculum/mean_level']:.2f}/{env.num_levels - 1} | " if env.terrain else "")
            + f"{ec.duration(wall)}, {ec.duration(left)} left"
            + ec.fault_note(stats),
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
            for model, x in (("nominal", ""), ("randomized", "_randomized")):  # x: the metrics' suffix
                print(
                    f"  eval {model:>10}: v err {last_eval['lin_vel_error' + x]:.3f} m/s (steady "
                    f"{last_eval['lin_vel_error_steady' + x]:.3f}) | yaw err {last_eval['yaw_rate_error' + x]:.3f} "
                    f"rad/s | falls {last_eval['fall_rate' + x]:.3f} (95% CI {last_eval['fall_rate_ci95_low' + x]:.3f}"
                    f"-{last_eval['fall_rate_ci95_high' + x]:.3f}, {last_eval['episodes' + x]} episodes)"
                    + (
                        f" | at {ec.duration(t0 - PROCESS_START)} ({ec.duration(t0 - PROCESS_START - eval_time)} "
                        "without evaluations)"
                        if x
                        else ""
                    ),
                    flush=True,
                )
            if env.terrain is not None:
                print_terrain_summary(last_eval, "_randomized", top_levels=3)
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
# Evaluation, sim-to-sim, the viewer, video and export (called by main)
# ==================================================================================================================
EVAL_UNITS = {
    "lin_vel_error": "m/s",
    "lin_vel_error_steady": "m/s",
    "yaw_rate_error": "rad/s",
    "yaw_rate_error_steady": "rad/s",
    "episode_length_s": "s",
}


def evaluate_or_export(agent, normalizer, env, device, args: Args) -> None:
    """--export: the policy as TorchScript and ONNX with its contract in <run>/export; --eval: its metrics as a table
    and in <run>/eval.json (and a video with --capture-video); --eval --sim2sim: the exported policy in MuJoCo's C
    engine beside the training simulator, in <run>/sim2sim.json; --eval --viewer: the policy in MuJoCo's viewer."""
    if args.export:
        for path in export(agent, normalizer, env, args, ec.run_dir_of(args.checkpoint) / "export"):
            print(f"wrote {path}")
        return
    if args.sim2sim:
        return sim_to_sim(agent, normalizer, env, device, args)
    if args.viewer:
        return play_in_viewer(agent, normalizer, device, args)
    print(
        f"evaluating {args.checkpoint} on {args.num_envs} environments x {args.eval_episodes} episode(s)...",
        flush=True,
    )
    metrics = evaluate(agent, normalizer, device, args, args.num_envs)
    nominal = {
        k: v for k, v in metrics.items() if not k.endswith("_randomized") and not k.startswith(("tile/", "terrain/"))
    }
    extras = [name for name, on in (("pushes", args.push_interval_s > 0), ("noise", args.obs_noise)) if on]
    ec.print_metrics_side_by_side(
        "evaluation (deterministic policy, the same starts and commands): go1.xml as compiled, and randomized models"
        + (" with " + " and ".join(extras) if extras else ""),
        {"nominal": nominal, "randomized": {k: metrics[k + "_randomized"] for k in nominal}},
        EVAL_UNITS,
    )
    reached = {}
    if args.terrain == "rough":
        print(
            f"by terrain type and level (randomized models; {args.num_envs} robots spread evenly over the "
            f"{args.terrain_levels} x {TERRAIN_COLUMNS} tiles, each kept on its tile; nominal figures in eval.json):"
        )
        print_terrain_summary(metrics, "_randomized")
        reached = trained_levels(ec.load_checkpoint(args.checkpoint, torch.device("cpu"), SCRIPT))
        if reached:
            print(
                f"curriculum level reached in training (0 to {args.terrain_levels - 1}): "
                + ", ".join(f"{k} {v:.2f}" for k, v in reached.items())
            )
    out = ec.run_dir_of(args.checkpoint) / "eval.json"
    record = {"checkpoint": args.checkpoint, "num_envs": args.num_envs, **metrics}
    ec.write_json(out, {**record, **({"curriculum_level_reached": reached} if reached else {})})
    print(f"wrote {out}")
    if args.capture_video:
        video = out.with_name("eval_video.mp4")
        record_video(agent, normalizer, device, args, video)
        print(f"wrote {video}")


@torch.no_grad()
def evaluate(
    agent, normalizer, device, args: Args, num_envs: int, sim=None, policy=None, randomized: bool = True
) -> dict[str, float]:
    """The deterministic policy on fresh environments and commands for eval_episodes episode lengths (a robot that
    falls starts a new episode), on the nominal model (go1.xml as compiled, no pushes, noiseless observations), under
    the metrics' plain names, and, with `randomized`, again on the randomized one (DOMAIN_RAND drawn at every reset,
    the task's pushes and observation noise), under the same names ending in "_randomized". Action delay, if the task
    has it, in both. Tracking errors overall and steady-state; falls with a 95% Wilson interval.
    `sim` and `policy` replace the training simulator (MuJoCo Warp) and the agent's deterministic policy (raw
    observations (N, num_obs) -> actions (N, nu)): --sim2sim passes MuJoCo's C engine and the exported ONNX policy,
    nominal model only. The initial states and commands depend only on the seed, the device and num_envs, not on the
    simulator."""
    policy = policy or (lambda obs: agent.act_deterministic(normalizer(obs)))
    task = Go1Config.from_args(args)
    conditions = {"": dataclasses.replace(task, domain_rand=False, push_interval_s=0.0, obs_noise=False)}
    if randomized and sim is None:
        conditions["_randomized"] = dataclasses.replace(task, domain_rand=True)
    metrics = {}
    for suffix, cfg in conditions.items():
        with ec.separate_rng(args.seed + 10_000, device):  # the same environments every time; training's untouched
            env = Go1Env(num_envs, device, cfg, sim=sim, curriculum=False)  # rough terrain: every tile alike
            obs = env.reset()

            def eval_step(env=env, obs=obs):
                obs.copy_(env.step(policy(obs))[0])

            graphed = args.cudagraphs and sim is None  # MuJoCo C steps on the host: nothing to record
            run_eval_step = ec.cuda_graphed(eval_step, device) if graphed else eval_step
            for _ in range(env.max_episode_length * args.eval_episodes):
                run_eval_step()
            s = env.pop_stats()
        low, high = ec.wilson_interval(s["falls"], s["episodes"])
        one = {
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
        one.update({k: v for k, v in s.items() if k.startswith(("tile/", "terrain/"))})  # rough terrain's
        metrics.update({k + suffix: v for k, v in one.items()})
    return metrics


def print_terrain_summary(metrics: dict[str, float], suffix: str, top_levels: int | None = None) -> None:
    """An evaluation's figures on rough terrain by type and level (evaluate()'s "tile/" keys ending in `suffix`): a
    line per type and level, or, with `top_levels`, one line per type pooling its top levels."""
    types = sorted({k.split("/")[1] for k in metrics if k.startswith("tile/")}, key=list(TERRAIN_TYPES).index)
    levels = sorted({int(k.split("/")[2]) for k in metrics if k.startswith("tile/")})

    def pooled(ty, lvs):  # the levels' figures pooled: each mean weighted by what it averages over
        def mean(name, weight):
            pairs = [
                (metrics[f"tile/{ty}/{lv}/{name}{suffix}"], metrics[f"tile/{ty}/{lv}/{weight}{suffix}"]) for lv in lvs
            ]
            total = sum(w for _, w in pairs)
            return sum(x * w for x, w in pairs if w) / total if total else float("nan")

        episodes = sum(metrics[f"tile/{ty}/{lv}/episodes{suffix}"] for lv in lvs)
        if not episodes and not sum(metrics[f"tile/{ty}/{lv}/steps{suffix}"] for lv in lvs):
            return f"no robot was here (fewer robots than the {len(levels)} x {TERRAIN_COLUMNS} tiles)"
        falls = mean("fall_rate", "episodes")
        low, high = ec.wilson_interval(falls * episodes if episodes else 0.0, episodes)
        steady = mean("lin_vel_error_steady", "steady_steps")  # NaN when no step here counted as steady
        steady = (
            f"{steady:.3f}" if not math.isnan(steady) else f"none: no robot got {STEADY_AFTER_S:g} s into a command"
        )
        return (
            f"v err {mean('lin_vel_error', 'steps'):.3f} m/s (steady {steady})"
            f" | falls {falls:.3f} (95% CI {low:.3f}-{high:.3f}, {int(episodes)} episodes) | walked off the tile "
            f"{mean('walked_off', 'episodes'):.2f}"
        )

    if top_levels:
        top = levels[-top_levels:]
        for ty in types:
            print(f"  eval {ty:>12}, levels {top[0]}-{top[-1]}: {pooled(ty, top)}", flush=True)
        return
    for ty in types:
        for lv in levels:
            print(f"  {ty:>12} level {lv:2d}: {pooled(ty, [lv])}", flush=True)


def saved_levels(ckpt: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A rough-terrain checkpoint's training robots, all its processes': their terrain_level and terrain_col (M,),
    on the CPU; None for a flat-terrain checkpoint."""
    parts = [ckpt, *ckpt.get("other_processes", [])]
    if any("terrain_level" not in p.get("env", {}) for p in parts) or ckpt["args"].get("terrain") != "rough":
        return None
    return tuple(torch.cat([p["env"][k].cpu() for p in parts]) for k in ("terrain_level", "terrain_col"))


def trained_levels(ckpt: dict) -> dict[str, float]:
    """The mean curriculum level that a rough-terrain checkpoint's training robots had reached, over all its
    processes' robots and by terrain type ("all" and each type); empty for a flat-terrain checkpoint."""
    saved = saved_levels(ckpt)
    if saved is None:
        return {}
    level, col = saved[0].float(), saved[1]
    columns = ec.columns_by_proportion(TERRAIN_TYPES, TERRAIN_COLUMNS)
    kind = [columns[c] for c in col.tolist()]
    out = {"all": level.mean().item()}
    for ty in TERRAIN_TYPES:
        on = torch.tensor([k == ty for k in kind])
        if on.any():
            out[ty] = level[on].mean().item()
    return out


def sim_to_sim(agent, normalizer, env, device, args: Args) -> None:
    """--eval --sim2sim: the exported ONNX policy, run by onnxruntime from its file alone, in MuJoCo's C engine
    (ec.CEngineSim: float64, go1.xml's own solver settings, on the CPU), beside the same policy's figures in the
    training simulator (MuJoCo Warp), over the same environments, initial states and commands. Prints both columns
    and writes <run>/sim2sim.json."""
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = exported_onnx(agent, normalizer, env, args, Path(tmp))
        policy = ec.OnnxPolicy(onnx_path)
        check_contract(policy.contract, env, args, onnx_path)
        episodes = args.num_envs * args.eval_episodes
        print(
            f"evaluating {args.checkpoint} on {args.num_envs} environments x {args.eval_episodes} episode(s) in the "
            "training simulator (MuJoCo Warp), then its ONNX export in MuJoCo's C engine...",
            flush=True,
        )
        if episodes < 64:
            print(f"note: {episodes} episodes; the sim-to-sim bar asks for at least 64 (--num-envs 64)", flush=True)
        t0 = time.perf_counter()
        warp = evaluate(agent, normalizer, device, args, args.num_envs, randomized=False)
        t1 = time.perf_counter()
        # MuJoCo C with go1.xml's own solver settings, whatever --solver the policy was trained with.
        c_args = dataclasses.replace(args, solver=None)
        c = evaluate(None, None, device, c_args, args.num_envs, sim=ec.CEngineSim, policy=policy)
        t2 = time.perf_counter()
    # On rough terrain the table shows each type's figures (of the types that had robots); every tile's are in the JSON.
    shown = [
        k
        for k in warp
        if not k.startswith("tile/") and not (k.startswith("terrain/") and math.isnan(warp[k]) and math.isnan(c[k]))
    ]
    columns = {"MuJoCo Warp": {k: warp[k] for k in shown}, "MuJoCo C (ONNX)": {k: c[k] for k in shown}}
    ec.print_metrics_side_by_side("sim-to-sim (deterministic policy, same commands)", columns, EVAL_UNITS)
    print(f"wall time: MuJoCo Warp {t1 - t0:.1f} s, MuJoCo C {t2 - t1:.1f} s")
    out, opt = ec.run_dir_of(args.checkpoint) / "sim2sim.json", ec.load_model(ASSET).opt  # MuJoCo C's solver
    record = {"checkpoint": args.checkpoint, "num_envs": args.num_envs, "eval_episodes": args.eval_episodes}
    record.update(
        onnx=str(onnx_path) if onnx_path.parent.name == "export" else "a temporary export of the checkpoint",
        mujoco_warp=warp,
        mujoco_c=c,
        wall_time_s={"mujoco_warp": t1 - t0, "mujoco_c": t2 - t1},
        mujoco_c_solver={
            "iterations": int(opt.iterations),
            "ls_iterations": int(opt.ls_iterations),
        },
    )
    ec.write_json(out, record)
    print(f"wrote {out}")


def exported_onnx(agent, normalizer, env, args: Args, tmp_dir: Path) -> Path:
    """<run>/export/policy.onnx when it was exported from this very checkpoint (its SHA-256 in the contract), else a
    fresh export of the checkpoint in tmp_dir."""
    path = ec.run_dir_of(args.checkpoint) / "export" / "policy.onnx"
    if path.exists():
        try:
            same = ec.OnnxPolicy(path).contract["source"]["sha256"] == ec.file_sha256(args.checkpoint)
        except (UserError, KeyError, TypeError):
            same = False
        if same:
            print(f"using {path} (exported from this checkpoint)", flush=True)
            return path
    export(agent, normalizer, env, args, tmp_dir)
    print(f"exported {args.checkpoint} to a temporary ONNX file; the policy below is loaded from it alone", flush=True)
    return tmp_dir / "policy.onnx"


def check_contract(contract: dict, env: Go1Env, args: Args, path: Path) -> None:
    """UserError unless an exported policy's contract states this task's observation, joints, action scale, home
    pose and control period: the sim-to-sim run reads the ONNX file, and a stale file must not pass unnoticed."""
    expected = policy_contract(env, args, with_source=False)
    wrong = [
        key
        for key in ("observation", "actions", "timing")
        if json.loads(json.dumps(contract.get(key))) != json.loads(json.dumps(expected[key]))
    ]
    if wrong:
        raise UserError(f"{path}'s contract differs from this task's in {', '.join(wrong)}: export it again")


def export(agent, normalizer, env, args: Args, out_dir: Path) -> list[Path]:
    """The deployed policy (normalizer folded in, actions clipped) as TorchScript and ONNX in out_dir; the ONNX file
    carries policy_contract() in its metadata, also written beside it as policy.json."""
    policy = ec.deployed_policy(normalizer, agent.actor, clip=ACTION_CLIP)
    return ec.export_policy(policy, env.num_obs, out_dir, policy_contract(env, args))


def policy_contract(env: Go1Env, args: Args, with_source: bool = True) -> dict:
    """What a robot's code needs to run the exported policy, each section read from where the task reads it (the
    OBSERVATION table, the MuJoCo model, the task's settings): observation layout, joints in action order, home pose,
    action scale and clipping, timing, PD gains, the folded-in normalizer; then where it came from (the checkpoint
    and its arguments) and the versions. The README shows how to run the policy from it."""
    mjm, nu = env.sim.mjm, env.num_actions
    actuators = ec.actuator_contract(mjm)
    contract = {
        "format": ec.CONTRACT_FORMAT,
        "script": SCRIPT,
        "task": "follow a commanded trunk velocity (vx, vy in the trunk frame) and yaw rate "
        + (
            "on rough terrain (slopes, stairs, obstacles), seen through a height scan"
            if env.terrain
            else "on flat ground"
        ),
        "robot": {"model": f"assets/{ASSET}", "sha256": ec.file_sha256(ec.ASSETS / ASSET)},
        **ec.contract_io(env.observation_table, env.num_obs, nu, args.obs_clip),
        "actions": {
            "joints": actuators["joints"],
            "actuators": actuators["actuators"],
            "clip": [-ACTION_CLIP, ACTION_CLIP],
            "scale": env.cfg.action_scale,
            "home_pose": env.default_dof_pos.tolist(),
            "to_ctrl": "joint target (rad) = home_pose + scale * action (clipped), the ctrl of the position servo of "
            "the same index, held for the control period",
        },
        "timing": {
            "policy_dt": env.dt,
            "physics_dt": float(mjm.opt.timestep),
            "decimation": env.sim.decimation,
        },
        "actuators": actuators,
        "conventions": {
            "quaternion": "MuJoCo's (w, x, y, z)",
            "frames": "world: z up; trunk: x forward, y left, z up",
            "free_joint": "qpos[0:3] position and qpos[3:7] orientation of the trunk (world); qvel[0:3] its linear "
            "velocity (world frame), qvel[3:6] its angular velocity (trunk frame)",
        },
        "task_args": {name: getattr(args, name) for name in TASK_ARGS},
    }
    if with_source:
        contract.update(ec.contract_provenance(args.checkpoint, SCRIPT))
    return contract


# The viewer's keys (GLFW key names): which command (0 vx, 1 vy, 2 yaw rate) each changes, and in which direction.
VIEWER_KEYS = {"UP": (0, 1), "DOWN": (0, -1), "PAGE_UP": (1, 1), "PAGE_DOWN": (1, -1), "LEFT": (2, 1), "RIGHT": (2, -1)}
VIEWER_KEY_STEP = 0.1  # m/s or rad/s per key press
VIEWER_TEXT_EVERY = 10  # policy steps between two updates of the viewer's command and velocity figures


@torch.no_grad()
def play_in_viewer(agent, normalizer, device, args: Args) -> None:
    """--eval --viewer: one robot under the deterministic policy in MuJoCo's interactive viewer, in real time, on
    MuJoCo's C engine (the viewer draws the MjData that ec.CEngineSim steps, so a mouse perturbation, a double-click
    on the trunk then Ctrl + right drag, pushes the robot). Commands are drawn as in --eval until a key is pressed;
    from then on Up/Down change vx, Page Up/Page Down vy, Left/Right the yaw rate (VIEWER_KEY_STEP each, within the
    training ranges), Home stops. A fall restarts the robot. Closing the window or Ctrl-C ends it; nothing is
    written."""
    import glfw

    keys = {getattr(glfw, f"KEY_{name}"): move for name, move in VIEWER_KEYS.items()}
    cfg = dataclasses.replace(  # the nominal model (perturb it with the mouse), no time-outs
        Go1Config.from_args(args),
        solver=None,
        episode_length_s=3600.0,
        domain_rand=False,
        push_interval_s=0.0,
        obs_noise=False,
    )
    ranges = (cfg.lin_vel_x_range, cfg.lin_vel_y_range, cfg.ang_vel_yaw_range)
    env = Go1Env(1, device, cfg, sim=ec.CEngineSim, curriculum=False)  # rough terrain: one tile, its model
    obs, keyboard = env.reset(), []  # keyboard: the command set by keys, once one was pressed

    def on_key(key: int) -> None:  # called by the viewer's thread
        if key == glfw.KEY_HOME or (key in keys and not keyboard):
            keyboard[:] = [0.0, 0.0, 0.0]
        if key in keys:
            i, sign = keys[key]
            keyboard[i] = min(max(keyboard[i] + sign * VIEWER_KEY_STEP, ranges[i][0]), ranges[i][1])

    steps = 0
    with ec.viewer_window(env.sim.models[0], env.sim.datas[0], on_key) as viewer:
        with viewer.lock():
            viewer.cam.type, viewer.cam.trackbodyid = ec.mujoco.mjtCamera.mjCAMERA_TRACKING, env.trunk
            viewer.cam.distance, viewer.cam.elevation = 1.5, -20.0
        print(
            f"viewer: playing {args.checkpoint} in MuJoCo's C engine; keys: Up/Down vx, Page Up/Page Down vy, "
            "Left/Right yaw rate, Home stop; close the window or press Ctrl-C to end",
            flush=True,
        )
        try:
            while viewer.is_running():
                start = time.perf_counter()
                with viewer.lock():
                    obs = env.step(agent.act_deterministic(normalizer(obs)))[0]
                    if keyboard:
                        env.commands[0] = torch.tensor(keyboard, device=device)
                        obs = env._observe()  # the policy sees the keyboard's command from this step on
                steps += 1
                if steps % VIEWER_TEXT_EVERY == 1:  # set_texts waits for the next frame: not at every step
                    command = env.commands[0].tolist()
                    actual = env.base_lin_vel[0, :2].tolist() + env.root_ang_vel_b[0, 2:].tolist()
                    rows = ["command  actual", *(f"{c:+.2f}  {a:+.2f}" for c, a in zip(command, actual))]
                    rows.append("keys" if keyboard else "random (until a key)")
                    labels = ["", "vx (m/s)", "vy (m/s)", "yaw rate (rad/s)", "commands from"]
                    viewer.set_texts((None, ec.mujoco.mjtGridPos.mjGRID_TOPLEFT, "\n".join(labels), "\n".join(rows)))
                viewer.sync()
                time.sleep(max(0.0, start + env.dt - time.perf_counter()))  # real time, or as fast as it goes
        except KeyboardInterrupt:
            pass
    print(f"viewer: played {steps} policy steps ({steps * env.dt:.1f} s of simulated time)", flush=True)


def start_on_stairs(env: Go1Env, level: int) -> torch.Tensor:
    """Put every robot of `env` (built with curriculum=False) on a stairs-up tile of `level` and reset it there, at a
    random heading. Returns the observation (N, num_obs)."""
    env.terrain_level.fill_(level)
    env.terrain_col.fill_(env.terrain.column_types.index("stairs_up"))
    env.env_origin.copy_(env.tile_origins[env.terrain_level, env.terrain_col])
    return env.reset()


def hold_command(env: Go1Env, obs: torch.Tensor, command: torch.Tensor, heading: torch.Tensor) -> None:
    """Hold the velocity `command` (3,) (vx, vy m/s; its yaw rate is replaced) and the `heading` (N,) (rad), like a
    joystick pushed one way: the yaw rate follows the heading error, and `obs` (N, num_obs) gets the command in place
    (obs[:, 9:12]) before the policy reads it."""
    env.commands.copy_(command.expand_as(env.commands))
    env.heading.copy_(heading)
    env._steer_to_heading()
    obs[:, 9:12] = env.commands


def turn_square(env: Go1Env) -> torch.Tensor:
    """Turn each robot of `env` (just reset) to its yaw rounded to a quarter turn, its velocities kept: square to the
    flights of a stairs tile, where a random heading may walk it into a corner of the pit (a step that is two risers
    at once). Returns the new observation (N, num_obs)."""
    qpos, quarter = env.sim.qpos.clone(), torch.round(ec.yaw_from_quat(env.root_quat) / (math.pi / 2))
    qpos[:, 3:7] = ec.quat_from_yaw(quarter * (math.pi / 2))
    env.sim.reset(torch.ones(env.num_envs, dtype=torch.bool, device=env.device), qpos, env.sim.qvel.clone())
    env._refresh_base_state()
    return env._add_obs_noise(env._observe())


@torch.no_grad()
def record_video(agent, normalizer, device, args: Args, path: Path) -> None:
    """One environment under the deterministic policy, rendered on the host, with gauges of commanded (green) and
    actual (red) velocity; the velocities frame by frame go to a JSON file beside the mp4."""
    with ec.separate_rng(args.seed + 20_000, device):
        env = Go1Env(1, device, Go1Config.from_args(args), curriculum=False)
        obs, frames, log = env.reset(), [], []
        if env.terrain is not None:  # up a flight of stairs: a stairs_up tile at video_level, at video_command
            level = min(int(args.video_level * env.num_levels), env.num_levels - 1)
            held_at = f"{args.video_command} m/s held"
            print(f"video: stairs up at level {level} of {env.num_levels - 1}, {held_at}", flush=True)
            start_on_stairs(env, level)
            obs, held = turn_square(env), torch.tensor([*args.video_command, 0.0], device=device)
        # On rough terrain from higher up: the walls of a stairs pit would hide the robot from go1.xml's camera.
        camera = "track" if env.terrain is None else ec.tracking_camera(env.trunk, 3.0, -40.0, 135.0)
        with ec.Renderer(env.sim, camera=camera) as renderer:
            ahead = None
            for _ in range(args.video_length):
                if env.terrain is not None:
                    if ahead is None or int(env.episode_length[0]) == 0:  # with heading commands: the way it faces
                        ahead = ec.yaw_from_quat(env.root_quat)  # at the episode's start (a host loop: syncs are fine)
                    hold_command(env, obs, held, ahead)
                obs, *_ = env.step(agent.act_deterministic(normalizer(obs)))
                command = env.commands[0].cpu().numpy()
                actual = torch.cat([env.base_lin_vel[0, :2], env.root_ang_vel_b[0, 2:]]).cpu().numpy()
                frames.append(ec.draw_gauges(renderer.render(0), command, actual, span=1.5))
                log.append({"t": len(log) * env.dt, "command": command.tolist(), "actual": actual.tolist()})
    ec.save_video(frames, path, fps=1.0 / env.dt)
    ec.write_json(path.with_suffix(".json"), log)


if __name__ == "__main__":
    ec.run_main(main, ARGS, Args, SCRIPT, TASK_ARGS)
