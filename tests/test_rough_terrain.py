"""--terrain rough in ppo_isaac_locomotion.py: the height scan against MuJoCo's C ray casting, the curriculum's rule
on hand-made distances, where robots spawn, and the script end to end (training and --eval) as a user runs it.

The terrain generator, the heightfield model and HeightMap themselves are tested in test_terrain.py."""

import json
import math

import mujoco
import numpy as np
import pytest
import torch

import envs_common as ec
from test_locomotion import loco, run
from tiny import TINY

LEVELS = 3


def rough_env(num_envs: int, curriculum: bool = True, **overrides):
    args = loco.Args(terrain="rough", terrain_levels=LEVELS, domain_rand=False, obs_noise=False, **overrides)
    return loco.Go1Env(num_envs, torch.device("cpu"), loco.Go1Config.from_args(args), curriculum=curriculum)


def test_observation_grows_by_the_height_scan():
    flat = ec.observation_size(loco.observation_table("flat"), 12)
    rough = ec.observation_size(loco.observation_table("rough"), 12)
    assert (flat, rough) == (48, 48 + 17 * 11)


def test_measured_heights_agree_with_mujoco_ray_casting():
    """measured_heights() at random trunk positions, heights and yaws, a quarter of them right on tile seams (where
    neighbouring tiles' heights meet) and at the map's edge, against mujoco.mj_ray cast straight down on the model
    that MuJoCo Warp steps (the robot moved out of the way)."""
    terrain = loco.build_terrain(LEVELS, 1)
    mjm = ec.add_terrain(loco.ASSET, terrain)
    data = mujoco.MjData(mjm)
    data.qpos[0:3] = (-1000.0, -1000.0, -50.0)  # the robot's own geoms must not catch the rays
    mujoco.mj_forward(mjm, data)
    rng = np.random.default_rng(0)
    n = 48
    x = rng.uniform(0, LEVELS * loco.TILE_SIZE, n)
    y = rng.uniform(0, loco.TERRAIN_COLUMNS * loco.TILE_SIZE, n)
    x[: n // 4] = loco.TILE_SIZE * rng.integers(0, LEVELS + 1, n // 4)  # on seams between levels
    y[n // 4 : n // 2] = loco.TILE_SIZE * rng.integers(0, loco.TERRAIN_COLUMNS + 1, n // 4)  # between types
    x[-2:] = (-loco.TERRAIN_BORDER + 1, LEVELS * loco.TILE_SIZE + loco.TERRAIN_BORDER - 1)  # the scan reaches 0.95 m
    z = rng.uniform(-1.5, 2.0, n)  # above and below the clip
    yaw = rng.uniform(-math.pi, math.pi, n)
    pos = torch.tensor(np.stack([x, y, z], 1), dtype=torch.float32)
    quat = ec.quat_from_yaw(torch.tensor(yaw, dtype=torch.float32))
    env_scan = torch.tensor([(a, b) for a in loco.HEIGHT_SCAN_X for b in loco.HEIGHT_SCAN_Y])
    got = loco.measured_heights(pos, quat, env_scan, ec.HeightMap(terrain, "cpu"))
    assert got.shape == (n, 17 * 11)

    geom = np.zeros(1, np.int32)
    expected = np.zeros((n, len(env_scan)))
    top = float(terrain.heights.max()) + 1.0
    for i in range(n):
        c, s = math.cos(yaw[i]), math.sin(yaw[i])
        for k, (a, b) in enumerate(env_scan.tolist()):
            px, py = x[i] + c * a - s * b, y[i] + s * a + c * b
            dist = mujoco.mj_ray(mjm, data, np.array([px, py, top]), np.array([0.0, 0.0, -1.0]), None, 1, -1, geom)
            assert dist >= 0 and mjm.geom(geom[0]).name == "floor"
            expected[i, k] = np.clip(z[i] - (top - dist), -loco.HEIGHT_SCAN_CLIP, loco.HEIGHT_SCAN_CLIP)
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-4)
    assert (expected != 0).any() and np.abs(np.diff(expected, axis=1)).max() > 0.05  # the scan saw relief


def test_curriculum_moves_robots_by_how_far_they_walked():
    """legged_gym's rule on hand-made distances: beyond half a tile, up; under half the commanded distance, down
    (never below 0); off the top level, a random level; an episode that did not end, unchanged."""
    env = rough_env(7)
    top = LEVELS - 1
    env.terrain_level.copy_(torch.tensor([1, 1, 1, 0, top, 1, 1]))
    env.terrain_col.copy_(torch.arange(7))
    env.env_origin.copy_(env.tile_origins[env.terrain_level, env.terrain_col])
    half_tile = loco.TILE_SIZE / 2
    episode = env.cfg.episode_length_s
    walked = torch.tensor([half_tile + 0.1, 1.0, 1.0, 0.0, half_tile + 0.1, 0.2 * episode, half_tile + 0.1])
    speed = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.5, 1.0])  # commanded m/s
    env.commands.zero_()
    env.commands[:, 0] = speed
    env.sim.qpos[:, 0:2] = env.env_origin[:, :2]
    env.sim.qpos[:, 0] += walked
    ended = torch.tensor([True, True, True, True, True, True, False])
    env._update_terrain_curriculum(ended)
    level = env.terrain_level.tolist()
    # up; down (1 m < half of 20 m); stays (no command: nothing asked); stays at 0; off the top: anywhere;
    # down (0.2 of the episode at 0.5 m/s covers 4 m < 5 m, half the commanded 10 m); not ended: unchanged.
    assert level[:4] == [2, 0, 1, 0] and 0 <= level[4] <= top and level[5:] == [0, 1]
    torch.testing.assert_close(env.env_origin, env.tile_origins[env.terrain_level, env.terrain_col])


def test_robots_that_start_afresh_keep_the_saved_curriculum_levels_of_their_type():
    """A resume with another number of robots: each robot takes a level of a saved robot of its type (of any type
    where its type had none), clamped to the terrain's top level."""
    env = rough_env(40)
    columns = ec.columns_by_proportion(loco.TERRAIN_TYPES, loco.TERRAIN_COLUMNS)
    up, down = columns.index("stairs_up"), columns.index("stairs_down")
    env.adopt_levels(torch.tensor([2, 2, 0, 7]), torch.tensor([up, up + 1, down, down]))
    kind = [columns[c] for c in env.terrain_col.tolist()]
    level = env.terrain_level.tolist()
    assert {lv for k, lv in zip(kind, level) if k == "stairs_up"} == {2}
    assert {lv for k, lv in zip(kind, level) if k == "stairs_down"} <= {0, LEVELS - 1}
    assert set(level) <= {0, 2}  # the other types draw from every saved robot
    torch.testing.assert_close(env.env_origin, env.tile_origins[env.terrain_level, env.terrain_col])


def test_robots_spawn_on_their_tiles_platform_above_the_surface():
    """After a reset each trunk is SPAWN_HEIGHT above its tile's centre, within the flat platform, its feet above the
    surface whatever the joint angles drawn (checked with MuJoCo's forward kinematics)."""
    env = rough_env(40)
    env.reset()
    pos, origin = env.root_pos, env.env_origin
    assert (pos[:, :2] - origin[:, :2]).abs().max() <= loco.SPAWN_SPREAD + 1e-5
    torch.testing.assert_close(pos[:, 2] - origin[:, 2], torch.full((40,), loco.SPAWN_HEIGHT), atol=1e-5, rtol=0)
    # The terrain under the robot's whole footprint is the platform, at the tile origin's height.
    corners = pos[:, None, :2] + torch.tensor([[0.3, 0.2], [0.3, -0.2], [-0.3, 0.2], [-0.3, -0.2]])
    torch.testing.assert_close(env.height_map(corners), origin[:, None, 2].expand(-1, 4), atol=1e-5, rtol=0)
    # Every foot above the surface under it.
    mjm = env.sim.mjm
    data = mujoco.MjData(mjm)
    feet = [mjm.body(f).id for f in loco.FEET]
    for i in range(40):
        data.qpos[:] = env.sim.qpos[i].numpy()
        mujoco.mj_kinematics(mjm, data)
        xy = torch.tensor(data.xpos[feet, :2], dtype=torch.float32)
        assert (torch.tensor(data.xpos[feet, 2]) - 0.02 >= env.height_map(xy).double() - 1e-6).all()
    # The curriculum's start: levels 0 to MAX_INIT_LEVEL (here the top), the columns shared out evenly.
    assert env.terrain_level.min() >= 0 and env.terrain_level.max() <= min(loco.MAX_INIT_LEVEL, LEVELS - 1)
    assert torch.bincount(env.terrain_col, minlength=loco.TERRAIN_COLUMNS).tolist() == [2] * loco.TERRAIN_COLUMNS
    # The first step from there: no world overflowed or blew up.
    env.step(torch.zeros(40, 12))
    assert not env.broken.any()


def test_evaluation_spreads_robots_over_every_level():
    env = rough_env(2 * LEVELS * 4, curriculum=False)
    assert torch.bincount(env.terrain_level).tolist() == [8] * LEVELS
    kinds = {env.terrain.column_types[c] for c in env.terrain_col.tolist()}
    assert {"smooth_slope", "stairs_up", "stairs_down", "obstacles"} <= kinds


@pytest.fixture(scope="module")
def rough_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("rough")
    args = [*TINY, "--terrain", "rough", "--terrain-levels", "2", "--num-iterations", "2", "--eval-interval", "2"]
    out = run([*args, "--num-envs", "8", "--eval-envs", "8"], cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    (run_dir,) = (cwd / "runs").iterdir()
    return cwd, run_dir, out.stdout


def test_rough_training_logs_the_curriculum_and_the_terrain_types(rough_run):
    cwd, run_dir, stdout = rough_run
    assert "level 0." in stdout or "level 1." in stdout, stdout
    assert "eval    stairs_up, levels 0-1" in stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set(EventAccumulator(str(run_dir)).Reload().Tags()["scalars"])
    for tag in (
        "curriculum/mean_level",
        "curriculum/mean_level/stairs_up",
        "curriculum/level_fraction/1",
        "terrain/obstacles/fall_rate",
        "eval/tile/stairs_down/1/fall_rate_randomized",
    ):
        assert tag in tags, tag
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)
    assert ckpt["obs_dim"] == 48 + 187 and ckpt["args"]["terrain"] == "rough"


def test_rough_eval_prints_the_per_level_table(rough_run, rendering_problem):
    cwd, run_dir, _ = rough_run
    video = [] if rendering_problem else ["--capture-video", "--video-length", "3"]
    ckpt = str(run_dir / "checkpoints" / "latest.pt")
    out = run(
        ["--device", "cpu", "--num-envs", "10", "--episode-length-s", "0.5", "--eval", *video, "--checkpoint", ckpt],
        cwd,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for kind in ("smooth_slope", "stairs_up", "stairs_down", "obstacles"):
        for level in (0, 1):
            assert f"{kind:>12} level {level:2d}: v err" in out.stdout
    # 10 robots on 2 x 20 tiles: 5 columns a level, none of them rough_slope's (2 and 3): said, not a line of NaN.
    assert " rough_slope level  0: no robot was here (fewer robots than the 2 x 20 tiles)" in out.stdout
    assert "nan" not in out.stdout
    assert "curriculum level reached in training (0 to 1): all " in out.stdout
    metrics = json.loads((run_dir / "eval.json").read_text())
    assert metrics["tile/stairs_up/1/episodes_randomized"] >= 1
    assert 0 <= metrics["curriculum_level_reached"]["all"] <= 1
    if video:
        assert (run_dir / "eval_video.mp4").stat().st_size > 1000


def test_a_resume_on_another_terrain_is_refused(rough_run):
    cwd, run_dir, _ = rough_run
    ckpt = str(run_dir / "checkpoints" / "latest.pt")
    before = sorted(p.name for p in run_dir.rglob("*"))
    out = run(["--checkpoint", ckpt, "--num-iterations", "3", "--terrain-levels", "3"], cwd)
    assert out.returncode == 2 and "error: --terrain-levels 3: " in out.stderr, out.stdout + out.stderr
    assert "resume with that, or start a new run" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == before


@pytest.mark.xfail(
    strict=True,
    reason="MuJoCo Warp 4.0's heightfield collisions make contacts metres deep with sideways normals where MuJoCo's C "
    "engine finds none (mujoco_warp #831, #1083; README: Rough terrain). When this passes, the fix has landed: drop "
    "the xfail and the start-up note of --terrain rough.",
)
def test_mujoco_warp_heightfield_contacts_kick_no_harder_than_mujoco_c():
    """The same 64 Go1s dropped on the rough terrain (every type, levels 0 to 9) and driven by the same random joint
    targets for 20 policy steps (no resets), in MuJoCo Warp and in MuJoCo's C engine: the fastest joint or trunk
    velocity stays within twice MuJoCo C's (measured on the CPU, mujoco-warp 4.0.0: 108.6 against 35.5 rad/s)."""
    fastest = {}
    for name, sim in (("warp", None), ("c", ec.CEngineSim)):
        torch.manual_seed(0)
        args = loco.Args(terrain="rough", terrain_levels=10, domain_rand=False, obs_noise=False, push_interval_s=0)
        env = loco.Go1Env(64, torch.device("cpu"), loco.Go1Config.from_args(args), sim=sim)
        env.reset()
        generator = torch.Generator().manual_seed(1)
        top = 0.0
        for _ in range(20):
            env.sim.ctrl.copy_(env.default_dof_pos + 0.25 * torch.randn(64, 12, generator=generator))
            env.sim.step()
            top = max(top, float(env.sim.qvel.abs().max()))
        fastest[name] = top
    assert fastest["warp"] <= 2 * fastest["c"], fastest
