"""Rough terrain (envs_common's Terrain section) against references: hand-computed heights of each tile type, MuJoCo's
C engine's ray casting (mujoco.mj_ray) for the device-side height lookup, and MuJoCo's C engine (mujoco.mj_step) for
MuJoCo Warp's heightfield collisions. Real physics on the CPU, small maps."""

import os

import mujoco
import numpy as np
import pytest
import torch

import envs_common as ec

DEVICE = os.environ.get("TEST_DEVICE", "cpu")
H = 0.1  # m between samples
HOME_HEIGHT = 0.331  # go1.xml's home trunk height over flat ground (m)


def _tile_fn(name, difficulty, shape, hscale, rng):
    """A task-like choice of terrain types and difficulties (the scripts hold their own)."""
    if name == "slope":
        return ec.pyramid_slope(shape, hscale, 0.1 + 0.3 * difficulty, platform=1.0)
    if name == "valley":
        return ec.pyramid_slope(shape, hscale, -(0.1 + 0.3 * difficulty), platform=1.0)
    if name == "stairs_down":
        return ec.pyramid_stairs(shape, hscale, 0.3, 0.05 + 0.1 * difficulty, platform=1.0)
    if name == "stairs_up":
        return ec.pyramid_stairs(shape, hscale, 0.3, -(0.05 + 0.1 * difficulty), platform=1.0)
    if name == "random":
        return ec.random_uniform(shape, hscale, -0.05, 0.05, 0.005, 0.2, rng, platform=1.0)
    if name == "obstacles":
        return ec.discrete_obstacles(shape, hscale, 0.05 + 0.1 * difficulty, 0.2, 0.6, 8, 1.0, rng)
    raise AssertionError(name)


TYPES = ("slope", "valley", "stairs_down", "stairs_up", "random", "obstacles")


@pytest.fixture(scope="module")
def small_map():
    """3 levels x 6 columns of 2 m tiles, 0.5 m border: every type at difficulty 0, 0.5 and 1."""
    return ec.generate_terrain(_tile_fn, TYPES, 3, tile_size=(2.0, 2.0), horizontal_scale=H, border=0.5, seed=3)


# ---------------------------------------------------------------------------------------------------------------
# Tiles: heights at hand-computed points
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("slope", [0.05, 0.4, -0.4])
def test_pyramid_slope(slope):
    t = ec.pyramid_slope((40, 40), H, slope, platform=1.0)  # a 4 m tile, centre sample [20, 20]
    assert t.dtype == np.float32 and t.shape == (40, 40)
    for i in range(15):  # along the middle row, i samples (i * H m) from the edge at x = 0
        np.testing.assert_allclose(t[i, 20], slope * i * H, atol=1e-6)
    np.testing.assert_allclose(t[0], 0.0, atol=1e-7)
    np.testing.assert_allclose(t[:, 0], 0.0, atol=1e-7)
    np.testing.assert_allclose(t[7, 3], slope * 3 * H, atol=1e-6)  # the nearer edge (y) counts
    np.testing.assert_allclose(t[15:26, 15:26], slope * 1.5, atol=1e-6)  # the 1 m platform, 1.5 m from the edge


@pytest.mark.parametrize("step_height", [0.05, 0.23, -0.15])
def test_pyramid_stairs(step_height):
    t = ec.pyramid_stairs((40, 40), H, 0.3, step_height, platform=1.0)  # 5 rings of 3 samples fit in 1.5 m
    for i in range(21):
        np.testing.assert_allclose(t[i, 20], step_height * min(i // 3, 5), atol=1e-6, err_msg=f"sample {i}")
    np.testing.assert_allclose(t[15:26, 15:26], 5 * step_height, atol=1e-6)  # the top: the platform
    np.testing.assert_allclose(t, t[::-1, ::-1][np.r_[39, :39]][:, np.r_[39, :39]], atol=1e-7)  # symmetric about 20


def test_random_uniform_is_quantized_within_bounds_and_interpolated():
    rng = np.random.default_rng(0)
    t = ec.random_uniform((40, 40), H, -0.05, 0.07, 0.01, 0.2, rng)  # nodes every 2 samples
    assert t.min() >= -0.05 - 1e-7 and t.max() <= 0.07 + 1e-7
    nodes = t[::2, ::2]
    np.testing.assert_allclose(nodes / 0.01, np.round(nodes / 0.01), atol=1e-4)  # drawn on the 0.01 m grid
    assert len(np.unique(np.round(nodes, 4))) >= 10  # ... and spread over it
    np.testing.assert_allclose(t[1:-1:2, ::2], (t[:-2:2, ::2] + t[2::2, ::2]) / 2, atol=1e-6)  # linear between
    np.testing.assert_allclose(t[::2, 1:-1:2], (t[::2, :-2:2] + t[::2, 2::2]) / 2, atol=1e-6)
    flat = ec.random_uniform((40, 40), H, -0.05, 0.05, 0.005, 0.2, rng, platform=1.0)
    np.testing.assert_array_equal(flat[15:26, 15:26], 0.0)


def test_discrete_obstacles_heights_and_platform():
    t = ec.discrete_obstacles((40, 40), H, 0.12, 0.2, 0.6, 20, 1.0, np.random.default_rng(1))
    values = set(np.round(np.unique(t).astype(float), 6).tolist())
    assert values <= {0.0, -0.12, -0.06, 0.06, 0.12} and len(values) >= 3
    np.testing.assert_array_equal(t[15:26, 15:26], 0.0)
    none = ec.discrete_obstacles((40, 40), H, 0.12, 0.2, 0.6, 0, 1.0, np.random.default_rng(1))
    np.testing.assert_array_equal(none, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# The map: layout, tile origins, determinism, columns
# ---------------------------------------------------------------------------------------------------------------
def test_map_layout_and_tile_origins(small_map):
    t = small_map
    assert t.heights.shape == (3 * 20 + 2 * 5 + 1, 6 * 20 + 2 * 5 + 1) and t.heights.dtype == np.float32
    assert t.num_levels == 3 and t.num_cols == 6 and t.column_types == TYPES
    assert t.origin == pytest.approx((-0.5, -0.5)) and t.tile_size == pytest.approx((2.0, 2.0))
    border = np.ones(t.heights.shape, bool)
    border[5:-6, 5:-6] = False
    np.testing.assert_array_equal(t.heights[border], 0.0)
    for level, difficulty in enumerate((0.0, 0.5, 1.0)):
        for col, name in enumerate(TYPES):
            rng = np.random.default_rng([3, level, col])
            tile = _tile_fn(name, difficulty, (20, 20), H, rng)
            i0, j0 = 5 + 20 * level, 5 + 20 * col
            np.testing.assert_array_equal(t.heights[i0 : i0 + 20, j0 : j0 + 20], tile, err_msg=f"{name} {level}")
            x, y, z = t.tile_origins[level, col]
            assert (x, y) == pytest.approx((2.0 * level + 1.0, 2.0 * col + 1.0))
            assert z == t.heights[i0 + 10, j0 + 10]
    # Top of the hardest slope (0.4 over 0.5 m) and bottom of the hardest stairs pit (one 0.3 m ring fits in the
    # 0.5 m between the edge and the 1 m platform: one step down, 0.15 m).
    assert t.tile_origins[2, 0, 2] == pytest.approx(0.2, abs=1e-6)
    assert t.tile_origins[2, 3, 2] == pytest.approx(-0.15, abs=1e-6)


def test_map_is_deterministic_and_tiles_independent(small_map):
    again = ec.generate_terrain(_tile_fn, TYPES, 3, tile_size=(2.0, 2.0), horizontal_scale=H, border=0.5, seed=3)
    np.testing.assert_array_equal(again.heights, small_map.heights)
    other = ec.generate_terrain(_tile_fn, TYPES, 3, tile_size=(2.0, 2.0), horizontal_scale=H, border=0.5, seed=4)
    random_cols = np.s_[:, 5 + 4 * 20 : 5 + 6 * 20]
    assert not np.array_equal(other.heights[random_cols], small_map.heights[random_cols])
    np.testing.assert_array_equal(other.heights[:, : 5 + 4 * 20], small_map.heights[:, : 5 + 4 * 20])
    # A tile depends on (seed, level, column) only, not on what the other tiles are.
    swapped = ec.generate_terrain(
        _tile_fn, ("slope", "valley", "stairs_down", "stairs_up", "slope", "obstacles"), 3, (2.0, 2.0), H, 0.5, 3
    )
    np.testing.assert_array_equal(swapped.heights[:, 5 + 5 * 20 :], small_map.heights[:, 5 + 5 * 20 :])


def test_columns_by_proportion():
    assert ec.columns_by_proportion({"a": 0.5, "b": 0.3, "c": 0.2}, 10) == ("a",) * 5 + ("b",) * 3 + ("c",) * 2
    assert ec.columns_by_proportion({"a": 1, "b": 1, "c": 1}, 4) == ("a", "a", "b", "c")
    assert ec.columns_by_proportion({"a": 0.98, "b": 0.01, "z": 0.0, "c": 0.01}, 5) == ("a",) * 3 + ("b", "c")
    for bad, n in (({"a": -0.1, "b": 1}, 4), ({"a": 0, "b": 0}, 4), ({"a": 1, "b": 1, "c": 1}, 2)):
        with pytest.raises(ec.UserError):
            ec.columns_by_proportion(bad, n)


# ---------------------------------------------------------------------------------------------------------------
# MuJoCo model and device-side heights against MuJoCo's ray casting
# ---------------------------------------------------------------------------------------------------------------
def test_height_map_matches_mujoco_ray_casting(small_map):
    t = small_map
    floor_only = mujoco.MjSpec.from_string(
        '<mujoco><worldbody><geom name="floor" type="plane" size="0 0 1"/></worldbody></mujoco>'
    )
    m = ec.add_terrain(floor_only, t)
    d = mujoco.MjData(m)
    mujoco.mj_forward(m, d)
    rng = np.random.default_rng(0)
    lo, hi = np.array(t.origin), np.array(t.origin) + (np.array(t.heights.shape) - 1) * H
    xy = rng.uniform(lo, hi, size=(400, 2))
    xy[100:200, 0] = np.round(xy[100:200, 0] / H) * H  # on sample lines (cell edges) along x ...
    xy[200:250, 1] = np.round(xy[200:250, 1] / H) * H  # ... along y
    xy[250:300] = np.round(xy[250:300] / H) * H  # on samples
    xy[300:330, 0] = 2.0 * rng.integers(0, 4, 30)  # on tile seams along x ...
    xy[330:360, 1] = 2.0 * rng.integers(0, 7, 30)  # ... and along y
    cell = (xy[360:400] - lo) / H  # on cell diagonals, where MuJoCo's two triangles meet
    xy[360:400] = lo + (np.floor(cell) + (cell - np.floor(cell)).mean(axis=1, keepdims=True)) * H
    # MuJoCo's ray-triangle test is strict: a vertical ray exactly on a triangle's edge misses both triangles and
    # reports the heightfield's base below. The reference rays are cast 1e-9 m off the lines (the surface is
    # continuous, and float32 xy cannot tell the difference); HeightMap gets the exact points.
    top, geomid = float(t.heights.max()) + 1.0, np.zeros(1, np.int32)
    off = xy + np.where(xy > (lo + hi) / 2, -1e-9, 1e-9)  # inward: the map's far edges are sample lines too
    ray = np.array([top - mujoco.mj_ray(m, d, [x, y, top], [0.0, 0.0, -1.0], None, 1, -1, geomid) for x, y in off])
    exact = np.array([top - mujoco.mj_ray(m, d, [x, y, top], [0.0, 0.0, -1.0], None, 1, -1, geomid) for x, y in xy])
    print(f"mj_ray missed {(np.abs(exact - ray) > 1e-6).sum()} of {len(xy)} rays cast exactly on triangle edges")
    mine = ec.HeightMap(t, DEVICE)(torch.tensor(xy, device=DEVICE)).cpu().numpy()
    assert mine.shape == (400,) and mine.dtype == np.float32
    err = np.abs(mine - ray)
    print(f"HeightMap against mj_ray: max |error| {err.max():.1e} m over {len(xy)} points")
    assert err.max() < 1e-4, f"worst at {xy[err.argmax()]}: {mine[err.argmax()]} against mj_ray's {ray[err.argmax()]}"
    samples = ec.HeightMap(t, DEVICE)(torch.tensor([[t.origin[0] + 13 * H, t.origin[1] + 27 * H]], device=DEVICE))
    assert samples.item() == pytest.approx(float(t.heights[13, 27]), abs=1e-6)
    # Outside the map: the edge's height (the border, 0); batched shapes are kept.
    outside = ec.HeightMap(t, DEVICE)(torch.tensor([[[-3.0, 1.0], [100.0, 100.0]]], device=DEVICE))
    assert outside.shape == (1, 2) and outside.abs().max().item() == 0.0


def test_add_terrain_keeps_the_floor_s_attributes(small_map):
    flat = ec.load_model("go1.xml")
    rough = ec.add_terrain(flat, small_map)  # from the compiled model (mj_saveLastXML)
    f, r = (mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "floor") for m in (flat, rough))
    assert rough.geom_type[r] == mujoco.mjtGeom.mjGEOM_HFIELD and rough.nhfield == 1
    for field in (
        "geom_friction",
        "geom_matid",
        "geom_contype",
        "geom_conaffinity",
        "geom_condim",
        "geom_priority",
        "geom_solref",
        "geom_solimp",
        "geom_margin",
    ):
        np.testing.assert_array_equal(getattr(rough, field)[r], getattr(flat, field)[f], err_msg=field)
    assert (rough.hfield_nrow[0], rough.hfield_ncol[0]) == (small_map.heights.shape[1], small_map.heights.shape[0])
    assert rough.hfield_size[0, 3] > 0
    # 13 robot geoms touch the floor; each heightfield pair makes at most 4 contacts in MuJoCo Warp.
    assert ec.contact_capacity(rough)[0] == 13 * 4


# ---------------------------------------------------------------------------------------------------------------
# Physics on the terrain: MuJoCo Warp against MuJoCo's C engine, spawn heights, contact buffers
# ---------------------------------------------------------------------------------------------------------------
def _physics_map():
    def tile(name, difficulty, shape, hscale, rng):
        if name == "slope":
            return ec.pyramid_slope(shape, hscale, 0.15, platform=1.0)
        return ec.pyramid_stairs(shape, hscale, 0.3, 0.05 + 0.1 * difficulty, platform=1.0)

    return ec.generate_terrain(tile, ("slope", "stairs"), 2, tile_size=(4.0, 4.0), horizontal_scale=H, border=0.5)


@pytest.fixture(scope="module")
def go1_on_terrain():
    t = _physics_map()
    return t, ec.add_terrain("go1.xml", t)


# Stated tolerance: after 300 physics steps (1.5 s) of a Go1 dropped 2 cm onto the slope part of a slope tile and
# across two steps of a stairs tile, joints held at the home pose (it slides and tips), every world's generalized
# positions agree with mj_step's within 2e-2 (m or rad), or twice mj_step's own spread from a 1e-6 rad perturbation
# where that is larger (chaos: a tipping robot). Twice test_envs_common's flat-floor tolerance: besides float32
# against float64, MuJoCo Warp keeps at most 4 contacts per heightfield pair and merges contacts closer than 1 mm
# (two prisms touched at their shared edge), which MuJoCo's C engine keeps as two (measured on this CPU: 2.8e-3 and
# 3.8e-3 after 300 steps; up to 1.5e-2 midway in similar drops).
QPOS_TOL, PERTURBATION, CHAOS_FACTOR = 2e-2, 1e-6, 2.0


def test_batched_sim_on_terrain_matches_mujoco_c(go1_on_terrain):
    t, m = go1_on_terrain
    n, steps = 2, 300
    heights = ec.HeightMap(t, "cpu")
    sim = ec.BatchedSim(m, n, DEVICE, decimation=1)
    qpos = sim.default_qpos.expand(n, -1).clone().cpu()
    for k, dx in enumerate((-0.9, -0.75)):  # off the platform: on the slope, and across a step's edge
        x, y = t.tile_origins[0, k, 0] + dx, t.tile_origins[0, k, 1] + 0.1
        under = torch.tensor([[x + a, y + b] for a in (-0.25, 0.0, 0.25) for b in (-0.15, 0.0, 0.15)])
        qpos[k, :3] = torch.tensor([x, y, heights(under).max().item() + HOME_HEIGHT + 0.02])
    sim.reset(torch.ones(n, dtype=torch.bool, device=DEVICE), qpos.to(DEVICE), ctrl=sim.default_ctrl.expand(n, -1))
    refs, perturbed = [], []
    for i in range(n):
        for datas, shift in ((refs, 0.0), (perturbed, PERTURBATION)):
            data = mujoco.MjData(m)
            data.qpos[:] = sim.qpos[i].double().cpu().numpy()
            data.qpos[7:] += shift
            data.ctrl[:] = sim.ctrl[i].double().cpu().numpy()
            datas.append(data)
    for _ in range(steps):
        sim.step()
        for data in refs + perturbed:
            mujoco.mj_step(m, data)
    for i, (data, other) in enumerate(zip(refs, perturbed)):
        err = np.abs(sim.qpos[i].double().cpu().numpy() - data.qpos).max()
        spread = np.abs(other.qpos - data.qpos).max()
        tol = max(QPOS_TOL, CHAOS_FACTOR * spread)
        print(f"world {i}: max |qpos error| {err:.2e}, mj_step's own spread {spread:.2e}, tolerance {tol:.1e}")
        assert err < tol, f"world {i}: |qpos - mj_step qpos| = {err:.2e} after {steps} steps"
        assert np.abs(data.qpos[:2] - qpos[i, :2].numpy()).max() > 0.05, "the robot should move on the terrain"
    assert not sim.overflowed().any()


def test_spawn_height_and_no_overflow_on_stairs(go1_on_terrain):
    t, m = go1_on_terrain
    # Spawn at each tile's origin + the home height: the feet on (not in) the ground.
    data = mujoco.MjData(m)
    data.qpos[:] = m.key_qpos[0]
    for level in range(t.num_levels):
        for col in range(t.num_cols):
            data.qpos[:3] = t.tile_origins[level, col] + [0.0, 0.0, HOME_HEIGHT]
            mujoco.mj_forward(m, data)
            assert data.ncon == 0 or data.contact.dist[: data.ncon].min() > -1e-3, (level, col)
            feet = [
                data.geom_xpos[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, f"{leg}_foot")]
                for leg in ("FR", "FL", "RR", "RL")
            ]
            assert all(abs(p[2] - 0.02 - t.tile_origins[level, col, 2]) < 2e-3 for p in feet)
    # Robots thrown tumbling onto the hardest stairs (trunk, thighs and calves on step edges): no contact lost.
    n = 4
    gen = torch.Generator().manual_seed(0)
    sim = ec.BatchedSim(m, n, DEVICE, decimation=4)
    qpos = sim.default_qpos.expand(n, -1).clone().cpu()
    qpos[:, :2] = torch.tensor(t.tile_origins[1, 1, :2]) + 1.8 * (torch.rand(n, 2, generator=gen) - 0.5)
    qpos[:, 2] = float(t.tile_origins[1, 1, 2]) + 0.5
    quat = torch.randn(n, 4, generator=gen)
    qpos[:, 3:7] = quat / quat.norm(dim=1, keepdim=True)
    qvel = torch.zeros(n, m.nv)
    qvel[:, :3] = torch.randn(n, 3, generator=gen)
    sim.reset(
        torch.ones(n, dtype=torch.bool, device=DEVICE), qpos.to(DEVICE), qvel.to(DEVICE), sim.default_ctrl.expand(n, -1)
    )
    contacts = 0
    for _ in range(50):
        sim.step()
        assert not sim.overflowed().any(), f"overflow bits {sim.overflow.tolist()}"
        contacts = max(contacts, int(sim.d.nacon.numpy()[0]))
    print(f"most contacts at once in {n} worlds: {contacts} (capacity {sim.nconmax} per world)")
    assert contacts >= 2 * n, "the robots should lie on the stairs"


def test_bad_terrain_input():
    with pytest.raises(ec.UserError):
        ec.generate_terrain(_tile_fn, TYPES, 0)
    with pytest.raises(ec.UserError):
        ec.generate_terrain(_tile_fn, TYPES, 2, tile_size=(2.05, 2.0))  # not whole samples
    with pytest.raises(ec.UserError):
        ec.add_terrain("go1.xml", _physics_map(), floor="ground")
