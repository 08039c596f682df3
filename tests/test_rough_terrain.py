"""--terrain rough in ppo_isaac_locomotion.py: the height scan against MuJoCo's C ray casting, MuJoCo Warp's physics
on terrain boxes against MuJoCo's C engine, the curriculum's rule on hand-made distances, where robots spawn, and the
script end to end (training and --eval) as a user runs it.

The tile functions, TerrainSlots and the rays themselves are tested in test_terrain.py."""

import json
import math
import subprocess
import sys
from pathlib import Path

import mujoco
import numpy as np
import pytest
import torch

import envs_common as ec
from test_locomotion import loco, run
from tiny import TINY

LEVELS = 3
CAPTURE = {"capture_output": True, "text": True, "timeout": 600}


def rough_env(num_envs: int, curriculum: bool = True, sim=None, **overrides):
    args = loco.Args(terrain="rough", terrain_levels=LEVELS, domain_rand=False, obs_noise=False, **overrides)
    return loco.Go1Env(num_envs, torch.device("cpu"), loco.Go1Config.from_args(args), sim=sim, curriculum=curriculum)


def test_observation_grows_by_the_height_scan():
    flat = ec.observation_size(loco.observation_table("flat"), 12)
    rough = ec.observation_size(loco.observation_table("rough"), 12)
    assert (flat, rough) == (48, 48 + 17 * 11)


TERRAIN_ONLY = np.eye(6, dtype=np.uint8)[ec.TERRAIN_GROUP]  # mj_ray's geom groups: the terrain's boxes, no robot


def test_measured_heights_agree_with_mujoco_ray_casting():
    """measured_heights() with Go1Env.terrain_height, for worlds on tiles of every type and at every level, at random
    trunk positions (a quarter of them right on a tile's border, some beyond it, over the ground), heights and yaws
    (some exactly 0: scan points along the boxes' sides), against mujoco.mj_ray cast straight down on the tile's own
    model (place_tile): MuJoCo Warp's worlds (TerrainSlots.heights) and MuJoCo C's (CEngineSim.rays). On a step's
    edge (the surface 0.2 mm around the point spans more than 1 mm), either step's height is right."""
    envs = {"warp": rough_env(4), "c": rough_env(4, sim=ec.CEngineSim)}
    terrain, spec = envs["warp"].terrain, envs["warp"].terrain_spec
    columns = terrain.column_types
    rng = np.random.default_rng(0)
    env_scan = envs["warp"].scan
    half = loco.TILE_SIZE / 2
    checked, on_edges, relief = 0, 0, 0.0
    for round_types in (
        ("smooth_slope", "rough_slope", "stairs_up", "stairs_down"),
        ("obstacles", "stairs_up", "rough_slope", "stairs_down"),
        ("stairs_up", "obstacles", "smooth_slope", "stairs_down"),
    ):
        level = torch.tensor(rng.integers(0, LEVELS, 4))
        col = torch.tensor([rng.choice([c for c, k in enumerate(columns) if k == t]) for t in round_types])
        for env in envs.values():
            env.terrain_level.copy_(level)
            env.terrain_col.copy_(col)
            env.reset()  # each world gets its tile (MuJoCo C: its model, whose poses the reset computes)
        centre = terrain.tile_origins[level.numpy(), col.numpy()].astype(float)
        xy = centre[:, :2] + rng.uniform(-half - 1.0, half + 1.0, (4, 2))
        xy[0, 0] = centre[0, 0] + half  # on the tile's border (x), ...
        xy[1, 1] = centre[1, 1] - half  # ... (y)
        xy[2] = centre[2, :2] + [half + 0.5, -half - 0.3]  # beyond its corner: on the ground and the tile's edge
        z = centre[:, 2] + rng.uniform(-1.5, 2.0, 4)  # above and below the clip
        yaw = rng.uniform(-math.pi, math.pi, 4)
        yaw[:2] = 0.0
        pos = torch.tensor(np.c_[xy, z], dtype=torch.float32)
        quat = ec.quat_from_yaw(torch.tensor(yaw, dtype=torch.float32))
        seen = []

        def recorded(points, env=envs["warp"], seen=seen):  # the very points (float32) the scan asks about
            seen.append(points.clone())
            return env.terrain_height(points)

        got = {"warp": loco.measured_heights(pos, quat, env_scan, recorded).clone()}
        got["c"] = loco.measured_heights(pos, quat, env_scan, envs["c"].terrain_height)
        points = seen[0].double().numpy()
        assert got["warp"].shape == (4, 17 * 11)
        for i in range(4):
            boxes = terrain.tile(int(level[i]), int(col[i]))
            m = ec.place_tile(spec, boxes)
            d = mujoco.MjData(m)
            mujoco.mj_kinematics(m, d)
            top, geomid = loco.SCAN_RAY_TOP, np.zeros(1, np.int32)
            dist = np.array(
                [mujoco.mj_ray(m, d, [x, y, top], [0.0, 0.0, -1.0], TERRAIN_ONLY, 1, -1, geomid) for x, y in points[i]]
            )
            assert (dist >= 0).all(), "the scan is over the tile or its ground"
            expected = np.clip(z[i] - (top - dist), -loco.HEIGHT_SCAN_CLIP, loco.HEIGHT_SCAN_CLIP)
            near = np.stack(
                [
                    ec.surface_height(boxes, points[i] + o)
                    for o in 2e-4 * np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]])
                ]
            )
            clip = np.clip(z[i] - near, -loco.HEIGHT_SCAN_CLIP, loco.HEIGHT_SCAN_CLIP)
            edge = near.max(axis=0) - near.min(axis=0) > 1e-3
            for name, heights in got.items():
                h = heights[i].double().numpy()
                assert np.abs(h - expected)[~edge].max() < 2e-4, f"{name}, world {i} on {columns[int(col[i])]}"
                assert ((h >= clip.min(axis=0) - 2e-4) & (h <= clip.max(axis=0) + 2e-4)).all(), (name, i)
            checked, on_edges = checked + len(points[i]), on_edges + int(edge.sum())
            relief = max(relief, np.abs(np.diff(expected)).max())
    print(f"{checked} scan points against mj_ray, {on_edges} of them on a step's edge")
    assert relief > 0.05, "the scans should see steps and slopes"


# MuJoCo Warp against MuJoCo's C engine on terrain boxes. Stated tolerance: a Go1 dropped 2 cm onto the side of a pit
# (slope 0.3) and across a stair's edge (0.1 m steps), joints held at the home pose (it slides down the pit and
# tips onto its back; it steps down the stairs), each world on its own tile through TerrainSlots, against mj_step on
# that tile's model (place_tile): at every one of 300 physics steps (1.5 s), every generalized position within
# QPOS_TOL (m or rad) of mj_step's, and within FINAL_TOL after the last; or within CHAOS_FACTOR times mj_step's own
# spread from a 1e-6 rad perturbation where that is larger (a tipping robot). Measured on the CPU (mujoco-warp 4.0.0):
# at most 2.8e-3 (pit) and 6.5e-3 (stairs) along the way (contact onsets a step apart, float32 against float64),
# 5.0e-4 and 6.5e-4 after 300 steps; mj_step's spread stays near 2e-6. The flat floor's tolerance (test_envs_common)
# is 1e-2; on a heightfield this test needed 2e-2 (1.5e-2 midway, 2.8e-3 and 3.8e-3 at the end).
QPOS_TOL, FINAL_TOL, PERTURBATION, CHAOS_FACTOR = 1e-2, 2e-3, 1e-6, 2.0
HOME_HEIGHT = 0.331  # go1.xml's home trunk height over flat ground (m)


def _drop_tile(name, difficulty, tile, ground, rng):
    if name == "pit":
        return ec.pit_boxes(tile, 0.3, 1.0, ground)
    return ec.stairs_boxes(tile, 0.31, 0.1, 1.0, ground)


def test_batched_sim_on_boxes_matches_mujoco_c():
    tiles = ec.generate_tiles(_drop_tile, ("pit", "stairs"), 1, tile_size=4.0, ground=1.0)
    spec = ec.terrain_spec(loco.ASSET, tiles.num_slots)
    mjm = spec.compile()
    n, steps = 2, 300
    ncon, njmax = ec.contact_capacity(mjm, static_touch=loco.CONTACT_BOXES)
    sim = ec.BatchedSim(mjm, n, "cpu", nconmax=ncon, njmax=njmax, per_world=ec.TerrainSlots.PER_WORLD, poses=False)
    ec.TerrainSlots(sim, tiles).place(
        torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long), torch.arange(n)
    )
    qpos = sim.default_qpos.expand(n, -1).clone()
    models = [ec.place_tile(spec, tiles.tile(0, k)) for k in range(n)]
    for k, dx in enumerate((-0.9, -0.75)):  # off the platform: on the pit's side, and across a step's edge
        x, y = tiles.tile_origins[0, k, 0] + dx, tiles.tile_origins[0, k, 1] + 0.1
        under = [[x + a, y + b] for a in (-0.25, 0.0, 0.25) for b in (-0.15, 0.0, 0.15)]  # the trunk's footprint
        qpos[k, :3] = torch.tensor([x, y, ec.surface_height(tiles.tile(0, k), under).max() + HOME_HEIGHT + 0.02])
    sim.reset(torch.ones(n, dtype=torch.bool), qpos, ctrl=sim.default_ctrl.expand(n, -1))
    refs, perturbed = [], []
    for i in range(n):
        for datas, shift in ((refs, 0.0), (perturbed, PERTURBATION)):
            data = mujoco.MjData(models[i])
            data.qpos[:] = sim.qpos[i].double().numpy()
            data.qpos[7:] += shift
            data.ctrl[:] = sim.ctrl[i].double().numpy()
            datas.append(data)
    worst, contacts = np.zeros(n), 0
    for step in range(steps):
        sim.step()
        for i in range(n):
            mujoco.mj_step(models[i], refs[i])
            mujoco.mj_step(models[i], perturbed[i])
        err = np.abs(sim.qpos.double().numpy() - np.stack([d.qpos for d in refs])).max(axis=1)
        spread = np.abs(np.stack([d.qpos for d in perturbed]) - np.stack([d.qpos for d in refs])).max(axis=1)
        tol = np.maximum(QPOS_TOL if step < steps - 1 else FINAL_TOL, CHAOS_FACTOR * spread)
        assert (err < tol).all(), f"step {step + 1}: |qpos - mj_step qpos| = {err} (tolerance {tol})"
        worst, contacts = np.maximum(worst, err), max(contacts, min(d.ncon for d in refs))
    print(f"max |qpos error| over {steps} steps: {worst}, after the last: {err} (mj_step's own spread {spread})")
    for i, data in enumerate(refs):
        assert np.abs(data.qpos[:2] - qpos[i, :2].numpy()).max() > 0.05, "the robot should move on the terrain"
    assert contacts > 0 and not sim.overflowed().any()


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
    # The terrain under the robot's whole footprint is the platform, at the tile origin's height (the scan's rays and
    # the exact NumPy lookup on the tile's boxes).
    corners = pos[:, None, :2] + torch.tensor([[0.3, 0.2], [0.3, -0.2], [-0.3, 0.2], [-0.3, -0.2]])
    torch.testing.assert_close(env.terrain_height(corners), origin[:, None, 2].expand(-1, 4), atol=1e-5, rtol=0)
    tiles = [env.terrain.tile(int(level), int(col)) for level, col in zip(env.terrain_level, env.terrain_col)]
    for boxes, xy, z in zip(tiles, corners.double().numpy(), origin[:, 2].tolist()):
        np.testing.assert_allclose(ec.surface_height(boxes, xy), z, atol=1e-6)
    # Every foot above the surface under it.
    mjm = env.sim.mjm
    data = mujoco.MjData(mjm)
    feet = [mjm.body(f).id for f in loco.FEET]
    for i in range(40):
        data.qpos[:] = env.sim.qpos[i].numpy()
        mujoco.mj_kinematics(mjm, data)
        assert (data.xpos[feet, 2] - 0.02 >= ec.surface_height(tiles[i], data.xpos[feet, :2]) - 1e-6).all(), i
    # The curriculum's start: levels 0 to MAX_INIT_LEVEL (here the top), the columns shared out evenly.
    assert env.terrain_level.min() >= 0 and env.terrain_level.max() <= min(loco.MAX_INIT_LEVEL, LEVELS - 1)
    assert torch.bincount(env.terrain_col, minlength=loco.TERRAIN_COLUMNS).tolist() == [2] * loco.TERRAIN_COLUMNS
    # The first step from there: no world overflowed or blew up.
    env.step(torch.zeros(40, 12))
    assert not env.broken.any()


def test_feet_swing_height_takes_the_swing_peak_above_the_terrain_under_the_foot():
    """_reward_feet_swing_height by hand: a front foot swings from the platform of a stairs-up tile at the top level
    (23 cm steps) over two steps and lands; the cost on touchdown is (peak / FOOT_SWING_HEIGHT - 1)^2, the peak taken
    above the surface under the foot (NumPy's exact lookup on the tile's boxes), not above z = 0. The swing's first
    airborne step is the flicker filter's, and a one-step loss of contact costs nothing. Zero when not asked to move.
    Then the feet positions it reads, after a real step, agree between MuJoCo Warp and MuJoCo's C engine."""
    envs = {"warp": rough_env(2), "c": rough_env(2, sim=ec.CEngineSim)}
    env = envs["warp"]
    col = env.terrain.column_types.index("stairs_up")
    for e in envs.values():
        e.terrain_level.fill_(LEVELS - 1)
        e.terrain_col.fill_(col)
        e.env_origin.copy_(e.tile_origins[e.terrain_level, e.terrain_col])
        e.reset()
    boxes, origin = env.terrain.tile(LEVELS - 1, col), env.env_origin[0].double().numpy()
    env.commands[:] = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    env.last_contacts[:] = True
    env.swing_peak.zero_()
    r = env.foot_radius
    # (x from the tile's centre, height of the foot's bottom above the surface, in contact?)
    swing = [(1.3, 0.0, True), (1.35, 0.01, False), (1.65, 0.07, False), (1.95, 0.04, False), (2.0, 0.0, True)]
    costs, surfaces = [], []
    for dx, above, down in swing:
        xy = origin[:2] + (dx, 0.1)
        surface = float(ec.surface_height(boxes, xy))
        surfaces.append(surface)
        env.sim.xpos[:, env.feet[0]] = torch.tensor([*xy, surface + r + above], dtype=torch.float32)
        env._refresh_base_state()  # as step() does: the height scan, and the terrain under the feet with it
        env.foot_contact[:] = True
        env.foot_contact[:, 0] = down
        env._filter_contacts()
        costs.append(env._reward_feet_swing_height())
    assert surfaces[2] - surfaces[0] > 0.2 and surfaces[3] > surfaces[2], surfaces  # two steps up from the platform
    assert all(c.abs().max() == 0 for c in costs[:-1])
    assert costs[-1][0].item() == pytest.approx((0.07 / loco.FOOT_SWING_HEIGHT - 1.0) ** 2, abs=1e-3)
    assert costs[-1][1].item() == 0.0, "no cost when told to stand still"
    assert env.swing_peak.abs().max() == 0, "a foot down has no swing"
    for down in (False, True):  # a flicker: one step without contact force, then contact again
        env.foot_contact[:, 0] = down
        env._filter_contacts()
        assert env._reward_feet_swing_height().abs().max() == 0
    # The feet's positions after a physics step, as both simulators leave them (one sub-step behind qpos).
    c = envs["c"]
    c.sim.reset(torch.ones(2, dtype=torch.bool), env.sim.qpos, env.sim.qvel, ctrl=env.sim.ctrl)
    for e in envs.values():
        e.sim.step()
    torch.testing.assert_close(env.sim.xpos[:, env.feet], c.sim.xpos[:, c.feet], atol=2e-3, rtol=0)
    assert (env.sim.xpos[:, env.feet, 2] - env.env_origin[:, None, 2]).abs().max() < 0.5, "feet near the platform"


def test_a_state_saved_before_the_swing_height_term_loads():
    """A rough-terrain checkpoint written before feet_swing_height and swing_peak existed resumes: the missing
    state starts at zero, the rest is restored."""
    env = rough_env(4)
    env.reset()
    env.step(torch.zeros(4, 12))
    env.episode_sums["feet_swing_height"].fill_(3.0)
    env.swing_peak.fill_(0.05)
    state = env.state_dict()
    del state["episode_sums"]["feet_swing_height"], state["swing_peak"]
    restored = rough_env(4)
    restored.load_state_dict(state)
    assert restored.episode_sums["feet_swing_height"].abs().max() == 0 and restored.swing_peak.abs().max() == 0
    torch.testing.assert_close(restored.sim.qpos, env.sim.qpos)
    torch.testing.assert_close(restored.episode_sums["tracking_lin_vel"], env.episode_sums["tracking_lin_vel"])


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
    assert ckpt["args"]["ent_coef"] == loco.ENT_COEF["rough"], "the default by terrain goes into the run"


def test_rough_eval_prints_the_per_level_table(rough_run, rendering_problem):
    cwd, run_dir, _ = rough_run
    video = ["--capture-video", "--video-length", "3", "--video-command", "0", "0.5", "--video-level", "0"]
    video = [] if rendering_problem else video
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
        frames = json.loads((run_dir / "eval_video.json").read_text())
        assert len(frames) == 3 and all(f["command"][:2] == [0.0, 0.5] for f in frames), "--video-command is held"
        assert "video: stairs up at level 0 of 1, (0.0, 0.5) m/s held" in out.stdout


def test_a_resume_on_another_terrain_is_refused(rough_run):
    cwd, run_dir, _ = rough_run
    ckpt = str(run_dir / "checkpoints" / "latest.pt")
    before = sorted(p.name for p in run_dir.rglob("*"))
    out = run(["--checkpoint", ckpt, "--num-iterations", "3", "--terrain-levels", "3"], cwd)
    assert out.returncode == 2 and "error: --terrain-levels 3: " in out.stderr, out.stdout + out.stderr
    assert "resume with that, or start a new run" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_mujoco_warp_on_the_terrain_kicks_no_harder_than_mujoco_c():
    """What stopped the heightfield (README: Rough terrain): the same 16 Go1s spawned over the script's terrain
    (every type, levels 0 to 9) and driven by the same random joint targets for 20 policy steps (no resets), in
    MuJoCo Warp and in MuJoCo's C engine, each world on its own tile's boxes: the fastest joint or trunk velocity
    within 10% of MuJoCo C's (measured on the CPU, mujoco-warp 4.0.0: 33.43303 against 33.43303 rad/s; on the
    heightfield, 108.6 against 35.5)."""
    fastest = {}
    for name, sim in (("warp", None), ("c", ec.CEngineSim)):
        torch.manual_seed(0)
        args = loco.Args(terrain="rough", terrain_levels=10, domain_rand=False, obs_noise=False, push_interval_s=0)
        env = loco.Go1Env(16, torch.device("cpu"), loco.Go1Config.from_args(args), sim=sim)
        env.reset()
        generator = torch.Generator().manual_seed(1)
        top = 0.0
        for _ in range(20):
            env.sim.ctrl.copy_(env.default_dof_pos + 0.25 * torch.randn(16, 12, generator=generator))
            env.sim.step()
            top = max(top, float(env.sim.qvel.abs().max()))
        assert not env.sim.overflowed().any() and not env.sim.nonfinite().any()
        fastest[name] = top
    print(f"fastest joint or trunk velocity: {fastest}")
    assert abs(fastest["warp"] - fastest["c"]) <= 0.1 * fastest["c"], fastest


def test_stairs_probe_reads_a_rough_checkpoint(rough_run):
    """tests/stairs_probe.py (a measurement script: README, "How the policy climbs") on the tiny run's checkpoint: a
    held command and the task's own, its lines with an interval, and its refusal of a level the terrain lacks."""
    _, run_dir, _ = rough_run
    probe = [sys.executable, str(Path(__file__).parent / "stairs_probe.py"), str(run_dir / "checkpoints" / "latest.pt")]
    for extra in (["--command", "0.5", "0"], []):
        out = subprocess.run([*probe, "--level", "1", "--num-envs", "2", "--seconds", "1", *extra], **CAPTURE)
        assert out.returncode == 0, out.stdout + out.stderr
        held = "held at [0.5, 0.0] m/s" if extra else "the task's random commands"
        assert f"2 robots, stairs up at level 1 of 1, {held}" in out.stdout
        assert "   1 s: out of the pit 0.00 (95% CI 0.00-" in out.stdout, out.stdout
    for bad, words in (
        (["--level", "2"], "levels 0 to 1"),
        (["--level", "1", "--seconds", "5"], "episode length, 1.0 s"),
    ):
        out = subprocess.run([*probe, *bad], **CAPTURE)
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, out.stderr
