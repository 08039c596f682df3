"""Rough terrain from boxes (envs_common's Terrain section) against references: hand-computed heights of each tile
function, MuJoCo's C engine's ray casting (mujoco.mj_ray) on the compiled per-tile model (place_tile) for the NumPy
height lookup (surface_height), for MuJoCo Warp's rays (BatchedSim.rays) and for the scan's kernel
(TerrainSlots.heights) in worlds that each hold another tile, and hand counts of contact buffers. Small tiles, CPU.

MuJoCo Warp against mj_step on the boxes, the script's height scan and its spawns are in test_rough_terrain.py."""

import itertools
import math
import os

import mujoco
import numpy as np
import pytest
import torch

import envs_common as ec

DEVICE = os.environ.get("TEST_DEVICE", "cpu")
TILE, GROUND, PLATFORM, WIDTH = 4.0, 1.0, 1.0, 0.3  # m: small tiles, 5 rings of stairs around the platform
A = TILE / 2  # m from a tile's centre to its edge
MISS = ec.TERRAIN_BOTTOM - 1.0  # surface_height where no box is under a point
TERRAIN_ONLY = np.eye(6, dtype=np.uint8)[ec.TERRAIN_GROUP]  # mj_ray's geom groups: the terrain's boxes, no robot


def _tile_fn(name, difficulty, tile, ground, rng):
    """A choice of the tile functions at growing difficulty (the script holds its own)."""
    if name == "stairs_down":  # the centre on top
        return ec.stairs_boxes(tile, WIDTH, 0.05 + 0.1 * difficulty, PLATFORM, ground)
    if name == "stairs_up":  # a pit of stairs
        return ec.stairs_boxes(tile, WIDTH, -(0.05 + 0.1 * difficulty), PLATFORM, ground)
    if name == "pit":
        return ec.pit_boxes(tile, 0.1 + 0.3 * difficulty, PLATFORM, ground)
    if name == "bumps":
        slope = 0.3 * difficulty
        pit = ec.pit_boxes(tile, slope, PLATFORM, ground)
        return ec.Boxes.join(pit, ec.pit_bumps(tile, slope, PLATFORM, 8, (0.2, 0.5), (0.02, 0.05), rng))
    if name == "blocks":
        heights = (0.05 + 0.1 * difficulty, 0.1 + 0.1 * difficulty)
        return ec.block_boxes(tile, heights, 0.3, 0.8, 8, PLATFORM, ground, rng)
    raise AssertionError(name)


TYPES = ("stairs_down", "stairs_up", "pit", "bumps", "blocks")
LEVELS = 3  # difficulties 0, 0.5, 1


@pytest.fixture(scope="module")
def tiles():
    return ec.generate_tiles(_tile_fn, TYPES, LEVELS, TILE, GROUND, seed=3)


@pytest.fixture(scope="module")
def spec(tiles):
    return ec.terrain_spec("go1.xml", tiles.num_slots)


def _in_from_edge(xy, centre=(0.0, 0.0)):
    """How far (m) each point is inside its tile's edge, measured along the nearer of x and y (< 0: outside)."""
    return A - np.abs(np.asarray(xy) - centre).max(axis=-1)


def _uniform(rng, n, reach):
    """n points uniform in the square of half side `reach` (m) around (0, 0)."""
    return rng.uniform(-reach, reach, size=(n, 2))


def _mj_heights(m, d, xy, top=10.0):
    """mujoco.mj_ray's answer: the first terrain box hit by a ray cast straight down from `top` at each point (m),
    MISS where none."""
    geomid = np.zeros(1, np.int32)
    dist = np.array([mujoco.mj_ray(m, d, [x, y, top], [0.0, 0.0, -1.0], TERRAIN_ONLY, 1, -1, geomid) for x, y in xy])
    return np.where(dist >= 0, top - dist, MISS)


def _either_side(boxes, xy, eps=1e-7):
    """The lowest and highest surface_height within eps (m) of each point: at a step's edge a vertical ray hits the
    upper or the lower box depending on rounding, and both answers are right."""
    near = np.stack(
        [ec.surface_height(boxes, xy + d) for d in eps * np.array(list(itertools.product((-1, 0, 1), (-1, 0, 1))))]
    )
    return near.min(axis=0), near.max(axis=0)


# ---------------------------------------------------------------------------------------------------------------
# Tile functions: heights at hand-computed points
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "width, height, rings",
    [(0.3, 0.05, 5), (0.3, 0.23, 5), (0.3, -0.15, 5), (0.31, 0.1, 4), (0.31, -0.1, 4)],  # 1.5 m from edge to platform
)
def test_stairs_heights(width, height, rings):
    boxes = ec.stairs_boxes(TILE, width, height, PLATFORM, GROUND)
    assert len(boxes) == (rings + 1 if height > 0 else 4 * rings + 1)
    # Ring k (k steps in from the edge) is k * height high, the central square (rings steps in) the last step.
    for k in range(rings + 2):
        x = A - (k + 0.5) * width  # the middle of ring k along the row y = 0.07
        if x > 0:
            assert ec.surface_height(boxes, [x, 0.07]) == pytest.approx(min(k, rings) * height, abs=1e-12), k
    assert ec.surface_height(boxes, [0.0, 0.0]) == pytest.approx(rings * height, abs=1e-12)
    last = A - rings * width  # the platform: at least PLATFORM wide (0.31 m steps leave it 1.52 m)
    assert 2 * last >= PLATFORM
    assert ec.surface_height(boxes, [last - 1e-6, -(last - 1e-6)]) == pytest.approx(rings * height, abs=1e-12)
    # Everywhere in the tile (away from the rings' edges): the number of whole rings in from the edge.
    rng = np.random.default_rng(0)
    xy = _uniform(rng, 2000, A)
    d = _in_from_edge(xy)
    off_edges = np.abs(d / width - np.round(d / width)) > 1e-6
    expected = np.minimum(np.floor(d / width), rings) * height
    np.testing.assert_allclose(ec.surface_height(boxes, xy[off_edges]), expected[off_edges], atol=1e-12)
    # The ground around the tile, GROUND m wide, at 0; nothing beyond it.
    ring = _uniform(rng, 2000, A + GROUND)
    ring = ring[(_in_from_edge(ring) < -1e-9) & (_in_from_edge(ring) > -GROUND + 1e-9)]
    np.testing.assert_array_equal(ec.surface_height(boxes, ring), 0.0)
    assert ec.surface_height(boxes, [A + GROUND + 0.01, 0.0]) == MISS
    assert ec.surface_height(boxes, [-(A + GROUND + 0.01), A + GROUND + 0.01]) == MISS


@pytest.mark.parametrize("slope", [0.0, 0.15, 0.4])
def test_pit_heights(slope):
    boxes = ec.pit_boxes(TILE, slope, PLATFORM, GROUND)
    assert len(boxes) == 9  # 4 ground, the platform, 4 sides
    depth = slope * (TILE - PLATFORM) / 2  # 0.4 -> 0.6 m
    assert ec.surface_height(boxes, [0.0, 0.0]) == pytest.approx(-depth, abs=1e-12)
    # By hand, slope 0.4: 0.5 m in from the edge, 0.2 m down; on the diagonal, the same; at the rim, 0.
    hand = {(1.5, 0.2): -0.5 * slope, (-1.5, -1.5): -0.5 * slope, (0.3, A): 0.0, (A - 1.5, 0.5): -depth}
    for xy, z in hand.items():
        assert ec.surface_height(boxes, xy) == pytest.approx(z, abs=1e-9), xy
    # Everywhere in the tile: down at `slope` from the edge to the platform, then flat (one continuous surface).
    rng = np.random.default_rng(1)
    xy = _uniform(rng, 2000, A)
    expected = -slope * np.minimum(_in_from_edge(xy), (TILE - PLATFORM) / 2)
    np.testing.assert_allclose(ec.surface_height(boxes, xy), expected, atol=1e-9)
    ring = _uniform(rng, 1000, A + GROUND)
    ring = ring[(_in_from_edge(ring) < 0) & (_in_from_edge(ring) > -GROUND + 1e-9)]
    np.testing.assert_allclose(ec.surface_height(boxes, ring), 0.0, atol=1e-12)
    assert ec.surface_height(boxes, [0.0, -(A + GROUND + 0.01)]) == MISS


def test_pit_bumps_lie_on_the_sides_clear_of_the_platform():
    tile, slope, platform, lo, hi = 8.0, 0.4, 3.0, 0.02, 0.05  # the script's hardest rough slope
    a, p = tile / 2, platform / 2
    pit = ec.pit_boxes(tile, slope, platform, GROUND)
    grid = np.stack(np.meshgrid(*[np.linspace(-p, p, 61)] * 2), axis=-1).reshape(-1, 2)
    cos = 1 / math.sqrt(1 + slope * slope)
    top_corners = np.array(list(itertools.product((-1, 1), (-1, 1), (1,))), dtype=float)
    for seed in range(200):  # 4000 bumps: a top that leans over the platform's edge is a rare draw
        bumps = ec.pit_bumps(tile, slope, platform, 20, (0.2, 0.5), (lo, hi), np.random.default_rng(seed))
        assert len(bumps) == 20
        # Every corner of each top between the platform and the tile's edge, within the side the bump lies on (the
        # side's uphill direction is the box's first axis, turned with it).
        corners = bumps.pos[:, None] + np.einsum("kij,kcj->kci", bumps.rot, top_corners * bumps.half[:, None])
        uphill = np.round(bumps.rot[:, :2, 0] / np.linalg.norm(bumps.rot[:, :2, 0], axis=1, keepdims=True))
        along = np.einsum("kci,ki->kc", corners[..., :2], uphill)
        across = np.abs(np.einsum("kci,ki->kc", corners[..., :2], uphill[:, ::-1]))
        assert ((p <= along) & (along <= a) & (across <= along)).all(), seed
        if seed >= 3:
            continue
        np.testing.assert_allclose(ec.surface_height(ec.Boxes.join(pit, bumps), grid), -slope * (a - p), atol=1e-12)
        for k in range(20):  # each top `lo` to `hi` m above its side (across it: along its normal)
            one = ec.Boxes(bumps.pos[k : k + 1], bumps.half[k : k + 1], bumps.rot[k : k + 1])
            centre = one.pos[0] + one.rot[0][:, 2] * one.half[0, 2]
            side = -slope * (a - centre[:2] @ uphill[k])  # the side under it, rising at `slope` to 0 at the edge
            rise = (ec.surface_height(ec.Boxes.join(pit, one), centre[:2]) - side) * cos
            assert lo - 1e-12 <= rise <= hi + 1e-12, (seed, k, rise)
    assert len(ec.pit_bumps(tile, slope, platform, 0, (0.2, 0.5), (lo, hi), np.random.default_rng(0))) == 0


def test_blocks_around_the_platform():
    heights = (0.07, 0.2)
    boxes = ec.block_boxes(TILE, heights, 0.3, 0.8, 12, PLATFORM, GROUND, np.random.default_rng(2))
    assert len(boxes) == 13  # the ground first
    blocks = ec.Boxes(boxes.pos[1:], boxes.half[1:], boxes.rot[1:])
    lo, hi = blocks.pos - blocks.half, blocks.pos + blocks.half
    assert (lo[:, :2] >= -A - 1e-12).all() and (hi[:, :2] <= A + 1e-12).all()  # inside the tile
    assert ((blocks.half[:, :2] >= 0.15 - 1e-12) & (blocks.half[:, :2] <= 0.4 + 1e-12)).all()  # 0.3 to 0.8 m wide
    p = PLATFORM / 2  # none over the platform (touching it is allowed)
    assert (
        (lo[:, 0] >= p - 1e-12) | (hi[:, 0] <= -p + 1e-12) | (lo[:, 1] >= p - 1e-12) | (hi[:, 1] <= -p + 1e-12)
    ).all()
    assert set(np.round(hi[:, 2], 12)) <= set(heights)
    grid = np.stack(np.meshgrid(*[np.linspace(-A - GROUND + 0.01, A + GROUND - 0.01, 121)] * 2), -1).reshape(-1, 2)
    h = ec.surface_height(boxes, grid)
    assert set(np.round(h, 12)) == {0.0, *heights}  # the ground or a block's top, nothing in between
    np.testing.assert_array_equal(h[np.abs(grid).max(axis=1) <= p], 0.0)
    np.testing.assert_array_equal(h[np.abs(grid).max(axis=1) > A], 0.0)
    for centre, top in zip(blocks.pos, hi[:, 2]):
        assert ec.surface_height(boxes, centre[:2]) >= top - 1e-12


def test_boxes_join_and_turn():
    pit = ec.pit_boxes(TILE, 0.3, PLATFORM, GROUND)
    stairs = ec.stairs_boxes(TILE, WIDTH, -0.1, PLATFORM, GROUND)
    joined = ec.Boxes.join(pit, ec.Boxes.join(), stairs)
    assert len(joined) == len(pit) + len(stairs) and len(ec.Boxes.join()) == 0
    np.testing.assert_array_equal(joined.rot[len(pit) :], stairs.rot)
    rng = np.random.default_rng(3)
    xy = _uniform(rng, 500, A + GROUND - 0.01)
    for yaw in (math.pi / 2, 0.3, -2.0):  # the surface turns with the boxes
        c, s = math.cos(yaw), math.sin(yaw)
        turned_xy = xy @ np.array([[c, s], [-s, c]])  # each point turned by yaw
        np.testing.assert_allclose(ec.surface_height(pit.turned(yaw), turned_xy), ec.surface_height(pit, xy), atol=1e-9)
    square = ec.surface_height(stairs.turned(math.pi / 2), xy)  # square rings: a quarter turn is the same stairs
    np.testing.assert_allclose(square, ec.surface_height(stairs, xy), atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# surface_height against MuJoCo's ray casting on each tile's model
# ---------------------------------------------------------------------------------------------------------------
UNIFORM = 150  # _probe_points' first points: uniform over the tile, its ground and beyond


def _probe_points(boxes, centre, rng):
    """Points over a tile and its ground: UNIFORM uniform ones (some beyond the ground: misses), then points on the
    tile's border and on every box's vertical sides (the seams of stairs' rings, blocks' sides, the pit's rim and
    platform edges)."""
    cx, cy = centre
    xy = [np.array([cx, cy]) + _uniform(rng, UNIFORM, A + GROUND + 0.5)]
    t = rng.uniform(-A, A, 40)
    xy.append(np.stack([cx + np.where(np.arange(40) % 2, A, -A), cy + t], axis=1))  # the tile's border, x
    xy.append(np.stack([cx + t, cy + np.where(np.arange(40) % 2, A, -A)], axis=1))  # ... and y
    for pos, half, rot in zip(boxes.pos, boxes.half, boxes.rot):  # on each box's sides, at random along them
        u = rng.uniform(-1, 1, size=(4, 2))
        u[:2, 0], u[2:, 1] = (-1, 1), (-1, 1)
        corners = pos[:2] + (rot[:2, :2] @ (u * half[:2]).T).T
        xy.append(corners[np.abs(corners - centre).max(axis=1) < A + GROUND])
    return np.concatenate(xy)


@pytest.mark.parametrize("col", range(len(TYPES)), ids=TYPES)
def test_surface_height_matches_mujoco_ray_casting(tiles, spec, col):
    rng = np.random.default_rng(col)
    worst, on_edges = 0.0, 0
    for level in range(LEVELS):
        boxes = tiles.tile(level, col)  # world coordinates
        m = ec.place_tile(spec, boxes)
        d = mujoco.MjData(m)
        mujoco.mj_kinematics(m, d)
        xy = _probe_points(boxes, tiles.tile_origins[level, col, :2], rng)
        ours, theirs = ec.surface_height(boxes, xy), _mj_heights(m, d, xy)
        lo, hi = _either_side(boxes, xy)
        # Where the surface is continuous, the same height; on a step's edge (the lowest and highest heights 1e-7 m
        # around differ), the upper or the lower step for either of them.
        edge = hi - lo > 1e-6  # steps are centimetres high; the slopes rise by 1e-7 m within 1e-7 m
        assert np.all(np.abs(ours - theirs)[~edge] < 1e-9), f"level {level}: {np.abs(ours - theirs)[~edge].max()}"
        for name, z in (("surface_height", ours), ("mj_ray", theirs)):
            assert np.all((z >= lo - 1e-9) & (z <= hi + 1e-9)), f"{name}, level {level}: off the surface on an edge"
        assert (theirs == MISS).any() and (theirs > MISS).sum() > 100  # beyond the ground, and on it
        worst, on_edges = max(worst, np.abs(ours - theirs)[~edge].max()), on_edges + int(edge.sum())
    print(f"{TYPES[col]}: surface_height against mj_ray: max |error| {worst:.1e} m, {on_edges} points on step edges")
    assert on_edges > (20 if TYPES[col] != "pit" else -1)  # the stairs and blocks were probed on their edges


# ---------------------------------------------------------------------------------------------------------------
# The tiles: layout, origins, determinism, columns
# ---------------------------------------------------------------------------------------------------------------
def test_tiles_layout_and_origins(tiles):
    t = tiles
    k = max(
        len(_tile_fn(n, d, TILE, GROUND, np.random.default_rng([3, lv, c])))
        for lv, d in enumerate((0.0, 0.5, 1.0))
        for c, n in enumerate(TYPES)
    )
    assert (t.num_levels, t.num_cols, t.num_slots) == (LEVELS, len(TYPES), k) and t.column_types == TYPES
    assert t.pos.shape == (LEVELS, len(TYPES), k, 3) and t.rot.shape == (LEVELS, len(TYPES), k, 3, 3)
    assert (t.tile_size, t.ground) == (TILE, GROUND) and t.tile_origins.dtype == np.float32
    for level, difficulty in enumerate((0.0, 0.5, 1.0)):
        for col, name in enumerate(TYPES):
            own = _tile_fn(name, difficulty, TILE, GROUND, np.random.default_rng([3, level, col]))
            centre = np.array([(level + 0.5) * TILE, (col + 0.5) * TILE, 0.0])
            n = t.used[level, col]
            assert n == len(own)
            np.testing.assert_allclose(t.tile(level, col).pos, own.pos + centre, atol=1e-12)
            np.testing.assert_array_equal(t.tile(level, col).half, own.half)
            np.testing.assert_array_equal(t.tile(level, col).rot, own.rot)
            assert (t.pos[level, col, n:, 2] < -40).all()  # unused slots wait far below
            assert tuple(t.tile_origins[level, col, :2]) == pytest.approx(tuple(centre[:2]))
    # The spawn heights by hand: 5 steps up or down; the pit's depth slope * 1.5 m; the blocks' ground.
    z = t.tile_origins[..., 2]
    for level, difficulty in enumerate((0.0, 0.5, 1.0)):
        step = 0.05 + 0.1 * difficulty
        assert z[level, 0] == pytest.approx(5 * step) and z[level, 1] == pytest.approx(-5 * step)
        assert z[level, 2] == pytest.approx(-(0.1 + 0.3 * difficulty) * 1.5)
        assert z[level, 3] == pytest.approx(-0.3 * difficulty * 1.5) and z[level, 4] == 0.0
    # One level: difficulty 0.
    seen = []
    ec.generate_tiles(lambda n, d, *rest: seen.append(d) or ec.slab(-1, 1, -1, 1, 0.0), ("a", "b"), 1, 2.0, 0.0)
    assert seen == [0.0, 0.0]


def test_tiles_are_deterministic_and_independent(tiles):
    again = ec.generate_tiles(_tile_fn, TYPES, LEVELS, TILE, GROUND, seed=3)
    for field in ("pos", "half", "rot", "used", "tile_origins"):
        np.testing.assert_array_equal(getattr(again, field), getattr(tiles, field))
    other = ec.generate_tiles(_tile_fn, TYPES, LEVELS, TILE, GROUND, seed=4)
    for col, name in enumerate(TYPES):
        same = np.array_equal(other.pos[:, col], tiles.pos[:, col])
        assert same == (name not in ("bumps", "blocks")), name  # only the random types change with the seed
    # A tile depends on (seed, level, column) only, not on the other tiles.
    swapped = ec.generate_tiles(
        _tile_fn, ("blocks", "stairs_up", "pit", "stairs_down", "blocks"), LEVELS, TILE, GROUND, seed=3
    )
    for level in range(LEVELS):
        last = swapped.tile(level, 4)
        np.testing.assert_array_equal(last.pos, tiles.tile(level, 4).pos)


def test_columns_by_proportion():
    assert ec.columns_by_proportion({"a": 0.5, "b": 0.3, "c": 0.2}, 10) == ("a",) * 5 + ("b",) * 3 + ("c",) * 2
    assert ec.columns_by_proportion({"a": 1, "b": 1, "c": 1}, 4) == ("a", "a", "b", "c")
    assert ec.columns_by_proportion({"a": 0.98, "b": 0.01, "z": 0.0, "c": 0.01}, 5) == ("a",) * 3 + ("b", "c")
    for bad, n in (({"a": -0.1, "b": 1}, 4), ({"a": 0, "b": 0}, 4), ({"a": 1, "b": 1, "c": 1}, 2)):
        with pytest.raises(ec.UserError):
            ec.columns_by_proportion(bad, n)


# ---------------------------------------------------------------------------------------------------------------
# The model: the floor's slots, contact buffers
# ---------------------------------------------------------------------------------------------------------------
def test_terrain_spec_keeps_the_floor_s_attributes(tmp_path):
    flat = ec.load_model("go1.xml")
    m = ec.terrain_spec("go1.xml", 3).compile()
    floor = mujoco.mj_name2id(flat, mujoco.mjtObj.mjOBJ_GEOM, "floor")
    assert mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "floor") == -1
    assert mujoco.mjtGeom.mjGEOM_PLANE not in set(m.geom_type) and m.ngeom == flat.ngeom - 1 + 3
    for k in range(3):
        g = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, f"terrain_{k}")
        assert m.geom_type[g] == mujoco.mjtGeom.mjGEOM_BOX and m.geom_bodyid[g] == 0  # static
        assert m.geom_group[g] == ec.TERRAIN_GROUP and m.geom_pos[g][2] < -40  # waiting far below
        for field in (
            "friction",
            "matid",
            "contype",
            "conaffinity",
            "condim",
            "priority",
            "solref",
            "solimp",
            "solmix",
            "margin",
            "gap",
            "rgba",
        ):
            np.testing.assert_array_equal(getattr(m, "geom_" + field)[g], getattr(flat, "geom_" + field)[floor], field)
    robot = [i for i in range(m.ngeom) if m.geom_bodyid[i] != 0]
    assert ec.TERRAIN_GROUP not in set(m.geom_group[robot])  # the scan's rays see the terrain only
    # Bad input.
    with pytest.raises(ec.UserError, match="not found"):
        ec.terrain_spec(tmp_path / "missing.xml", 3)
    with pytest.raises(ec.UserError, match="no plane geom named 'ground'"):
        ec.terrain_spec("go1.xml", 3, floor="ground")
    box_floor = tmp_path / "box_floor.xml"
    box_floor.write_text('<mujoco><worldbody><geom name="floor" type="box" size="1 1 1"/></worldbody></mujoco>')
    with pytest.raises(ec.UserError, match="no plane geom"):
        ec.terrain_spec(box_floor, 3)
    with pytest.raises(ec.UserError, match="at least one box slot"):
        ec.terrain_spec("go1.xml", 0)


def test_contact_capacity_counts_the_boxes_a_geom_may_touch(spec, tiles):
    m = spec.compile()
    k = tiles.num_slots
    # By hand: go1.xml's 13 colliding geoms (a box trunk, 8 capsule legs, 4 sphere feet) meet only the terrain, and
    # MuJoCo Warp's box-box, capsule-box and sphere-box collisions make up to 8, 2 and 1 contacts: 28 per box.
    # Each contact takes 4 rows (condim 3, pyramidal cone); 12 joint limits and 12 joints with friction loss add
    # one row each.
    assert m.opt.cone == mujoco.mjtCone.mjCONE_PYRAMIDAL and set(m.geom_condim) == {3}
    assert int(m.jnt_limited.sum()) == 12 and int((m.dof_frictionloss > 0).sum()) == 12 and m.neq == 0
    for touch, boxes in ((None, k), (1, 1), (6, 6), (k + 5, k)):
        assert ec.contact_capacity(m, static_touch=touch) == (28 * boxes, 4 * 28 * boxes + 24), touch
    assert ec.contact_capacity(ec.load_model("go1.xml")) == (24, 4 * 24 + 24)  # on the plane: 4 + 8 * 2 + 4 * 1


def test_bad_terrain_input(spec):
    rng = np.random.default_rng(0)
    for bad in (
        lambda: ec.slab(1.0, 1.0, 0.0, 1.0, 0.1),  # empty
        lambda: ec.slab(0.0, 1.0, 0.0, 1.0, -3.5),  # top under the bottom
        lambda: ec.stairs_boxes(TILE, 0.0, 0.1, PLATFORM, GROUND),
        lambda: ec.stairs_boxes(TILE, WIDTH, 0.1, TILE + 0.1, GROUND),
        lambda: ec.pit_boxes(TILE, -0.1, PLATFORM, GROUND),
        lambda: ec.pit_boxes(TILE, 0.1, -1.0, GROUND),
        lambda: ec.pit_bumps(TILE, 0.1, PLATFORM, -1, (0.2, 0.5), (0.02, 0.05), rng),
        lambda: ec.pit_bumps(TILE, 0.1, PLATFORM, 3, (0.5, 0.2), (0.02, 0.05), rng),
        lambda: ec.pit_bumps(TILE, 0.1, PLATFORM, 3, (0.2, 0.5), (0.0, 0.05), rng),
        lambda: ec.block_boxes(TILE, (0.1,), 0.3, TILE + 1, 3, PLATFORM, GROUND, rng),
        lambda: ec.block_boxes(TILE, (0.1, -0.1), 0.3, 0.8, 3, PLATFORM, GROUND, rng),
        lambda: ec.block_boxes(TILE, (), 0.3, 0.8, 3, PLATFORM, GROUND, rng),
        lambda: ec.generate_tiles(_tile_fn, TYPES, 0),
        lambda: ec.generate_tiles(_tile_fn, (), 2),
        lambda: ec.generate_tiles(_tile_fn, TYPES, 2, tile_size=0.0),
        lambda: ec.generate_tiles(_tile_fn, TYPES, 2, ground=-1.0),
        lambda: ec.generate_tiles(_tile_fn, TYPES, 2, seed=-1),
        lambda: ec.place_tile(spec, ec.stairs_boxes(TILE, 0.1, -0.1, 0.0, GROUND)),  # 4 * 20 + 1 boxes
    ):
        with pytest.raises(ec.UserError):
            bad()
    nan = ec.Boxes(np.full((1, 3), np.nan), np.ones((1, 3)), np.eye(3)[None])
    for tile_fn in (lambda *a: ec.Boxes.join(), lambda *a: nan):
        with pytest.raises(ValueError, match="no boxes or non-finite"):
            ec.generate_tiles(tile_fn, ("a",), 1)


# ---------------------------------------------------------------------------------------------------------------
# Worlds on their own tiles: TerrainSlots, MuJoCo Warp's rays and the scan's kernel against mj_ray
# ---------------------------------------------------------------------------------------------------------------
# Five worlds, each on another type and level.
PLACES = [(0, 0), (1, 1), (2, 2), (2, 3), (1, 4)]
FLOAT32_TOL = 1e-4  # m: float32 positions up to 20 m (2e-6 m apart) and slab tests in float32


@pytest.fixture(scope="module")
def slots_sim(tiles, spec):
    mjm = spec.compile()
    ncon, njmax = ec.contact_capacity(mjm, static_touch=6)
    sim = ec.BatchedSim(
        mjm,
        len(PLACES),
        DEVICE,
        decimation=4,
        nconmax=ncon,
        njmax=njmax,
        per_world=ec.TerrainSlots.PER_WORLD,
        poses=False,
    )
    return sim, ec.TerrainSlots(sim, tiles)


def _place(slots, places, mask=None):
    level, col = (torch.tensor(v, device=DEVICE) for v in zip(*places))
    mask = torch.ones(len(places), dtype=torch.bool, device=DEVICE) if mask is None else mask
    slots.place(mask, level, col)


def _padded(arrays):
    """Ragged per-world arrays (P_i, ...) as one (N, max P_i, ...) array, each padded with copies of its last row."""
    p = max(len(a) for a in arrays)
    return np.stack([np.concatenate([a, np.repeat(a[-1:], p - len(a), 0)]) for a in arrays])


def _tensor(a):
    return torch.tensor(np.asarray(a), dtype=torch.float32, device=DEVICE)


def test_worlds_see_their_own_tiles_as_mujoco_c_does(tiles, spec, slots_sim):
    """Each world's slots against place_tile's model of its tile (poses, sizes, broadphase bounds), and what MuJoCo
    Warp's rays (vertical and slanted) and the scan's kernel see in it against mj_ray on that model."""
    sim, slots = slots_sim
    _place(slots, PLACES)
    rng = np.random.default_rng(5)
    top, probes = 10.0, []
    for i, place in enumerate(PLACES):
        boxes = tiles.tile(*place)
        m = ec.place_tile(spec, boxes)
        d = mujoco.MjData(m)
        mujoco.mj_kinematics(m, d)
        n, ids = len(boxes), slots.ids.cpu().numpy()[: len(boxes)]
        for name, ours, theirs in (
            ("geom_xpos", sim.geom_xpos[i, ids], d.geom_xpos[ids]),
            ("geom_xmat", sim.geom_xmat[i, ids].reshape(n, 9), d.geom_xmat[ids]),
            ("geom_size", sim.model["geom_size"][i, ids], m.geom_size[ids]),
            ("geom_aabb", sim.model["geom_aabb"][i, ids].reshape(n, 6), m.geom_aabb[ids]),
            ("geom_rbound", sim.model["geom_rbound"][i, ids], m.geom_rbound[ids]),
        ):
            np.testing.assert_allclose(ours.double().cpu().numpy(), theirs, atol=1e-5, err_msg=f"world {i} {name}")
        assert (sim.geom_xpos[i, slots.ids[n:], 2] < -40).all()  # the unused slots wait below
        # Rays straight down over the tile (its border, edges and seams too), and slanted ones, some of them up.
        xy = _probe_points(boxes, tiles.tile_origins[place][:2], rng)
        pnt = np.r_[np.c_[xy, np.full(len(xy), top)], np.c_[xy[:64], rng.uniform(-0.5, 2.0, 64)]]
        vec = np.r_[np.tile([0.0, 0.0, -1.0], (len(xy), 1)), rng.normal(size=(64, 3))]
        geomid = np.zeros(1, np.int32)
        dist = np.array([mujoco.mj_ray(m, d, p, v, TERRAIN_ONLY, 1, -1, geomid) for p, v in zip(pnt, vec)])
        probes.append((boxes, xy, pnt, vec, dist))
    rays = sim.rays(
        _tensor(_padded([p[2] for p in probes])), _tensor(_padded([p[3] for p in probes])), ec.TERRAIN_GROUP
    )
    rays = rays.cpu().numpy()
    heights = slots.heights(_tensor(_padded([p[1] for p in probes])), top).cpu().numpy()
    worst_ray, worst_height, through = 0.0, 0.0, 0
    for i, (boxes, xy, pnt, _, dist) in enumerate(probes):
        ours, v = rays[i, : len(pnt)], len(xy)  # the first v rays are vertical
        # float32 points move by up to 1e-6 m: near a step's edge either step is right (see _either_side).
        lo, hi = _either_side(boxes, xy, eps=10 * FLOAT32_TOL)
        edge = hi - lo > 1e-3
        # MuJoCo Warp's rays: the uniform and slanted ones as mj_ray's. On the probes of box sides (seams of
        # abutting boxes), a float32 ray may find itself a rounding outside both boxes and pass between them.
        exact = np.r_[np.arange(v) < UNIFORM, np.ones(len(pnt) - v, bool)] & ~np.r_[edge, np.zeros(len(pnt) - v, bool)]
        assert ((ours < 0) == (dist < 0))[exact].all(), f"world {i}: a hit against a miss"
        err = np.abs(ours - dist)[exact & (dist >= 0)]
        assert err.max() < FLOAT32_TOL, f"world {i}: MuJoCo Warp's rays off mj_ray's by {err.max():.1e} m"
        seams = ~exact[:v] & (ours[:v] >= 0)
        z = top - ours[:v][seams]
        assert ((z >= lo[seams] - FLOAT32_TOL) & (z <= hi[seams] + FLOAT32_TOL)).all(), f"world {i}: off the surface"
        through += int((~exact[:v] & (ours[:v] < 0) & (dist[:v] >= 0)).sum())
        # The scan's kernel: the height that mj_ray's vertical ray finds, on seams too (either step on an edge).
        h = heights[i, :v]
        herr = np.abs(h - np.where(dist[:v] >= 0, top - dist[:v], MISS))[~edge]
        assert herr.max() < FLOAT32_TOL, f"world {i}: TerrainSlots.heights off mj_ray's by {herr.max():.1e} m"
        assert ((h >= lo - FLOAT32_TOL) & (h <= hi + FLOAT32_TOL)).all(), f"world {i}: heights off the surface"
        worst_ray, worst_height = max(worst_ray, err.max()), max(worst_height, herr.max())
    print(
        f"against mj_ray: BatchedSim.rays within {worst_ray:.1e} m ({through} passed between abutting boxes), "
        f"TerrainSlots.heights within {worst_height:.1e} m"
    )
    # Points of another shape get buffers of their own: each shape's result stays where it was, as a recorded CUDA
    # graph needs, and the first shape's heights are unchanged.
    first = slots.heights(_tensor(_padded([p[1] for p in probes])), top)
    other = slots.heights(_tensor(_padded([p[1][:4] for p in probes])), top)
    again = slots.heights(_tensor(_padded([p[1] for p in probes])), top)
    assert again.data_ptr() == first.data_ptr() and other.data_ptr() != first.data_ptr()
    np.testing.assert_array_equal(again.cpu().numpy(), heights)
    np.testing.assert_array_equal(other.cpu().numpy(), heights[:, :4])


def test_placing_moves_only_the_masked_worlds(tiles, slots_sim):
    sim, slots = slots_sim
    _place(slots, PLACES)

    def placed():  # the slots' poses and per-world sizes
        return [
            t[:, slots.ids].clone() for t in (sim.geom_xpos, sim.geom_xmat, *(sim.model[f] for f in slots.PER_WORLD))
        ]

    before = placed()
    moved = torch.tensor([False, True, False, True, False], device=DEVICE)
    new = [(2, 4), (0, 2), (1, 1), (0, 0), (0, 3)]  # the unmasked worlds' tiles are ignored
    _place(slots, new, moved)
    after = placed()
    for b, a in zip(before, after):
        assert torch.equal(a[~moved], b[~moved])  # bit for bit
        assert not torch.equal(a[moved], b[moved])
    for i in (1, 3):  # every slot, used or waiting, from the tile's table
        level, col = new[i]
        torch.testing.assert_close(sim.geom_xpos[i, slots.ids], _tensor(tiles.pos[level, col]))
        torch.testing.assert_close(sim.geom_xmat[i, slots.ids], _tensor(tiles.rot[level, col]))
        torch.testing.assert_close(sim.model["geom_size"][i, slots.ids], _tensor(tiles.half[level, col]))
    # MuJoCo Warp never recomputes static poses: a reset and a step leave the tiles where they were put.
    sim.reset(torch.ones(sim.num_envs, dtype=torch.bool, device=DEVICE), sim.default_qpos.expand(sim.num_envs, -1))
    sim.step()
    for a, b in zip(placed(), after):
        assert torch.equal(a, b)


def test_robots_tumbling_over_box_edges_lose_no_contact(tiles, slots_sim):
    """Go1s thrown tumbling onto the hardest stairs, bumps and blocks (trunk, thighs and calves across box edges):
    the contact buffers sized by contact_capacity(static_touch=6) hold every contact (a world that loses one is
    flagged by MuJoCo Warp's overflow bits)."""
    sim, slots = slots_sim
    places = [(2, 0), (2, 1), (2, 3), (2, 4), (2, 1)]
    _place(slots, places)
    n, gen = sim.num_envs, torch.Generator().manual_seed(0)
    qpos = sim.default_qpos.cpu().expand(n, -1).clone()
    centre = torch.tensor(np.stack([tiles.tile_origins[p][:2] for p in places]))
    qpos[:, :2] = centre + 1.8 * (torch.rand(n, 2, generator=gen) - 0.5)
    for i, p in enumerate(places):  # 0.5 m above the highest box within reach of the robot
        reach = qpos[i, :2].numpy() + np.array(list(itertools.product((-0.5, 0, 0.5), repeat=2)))
        qpos[i, 2] = float(ec.surface_height(tiles.tile(*p), reach).max()) + 0.5
    quat = torch.randn(n, 4, generator=gen)
    qpos[:, 3:7] = quat / quat.norm(dim=1, keepdim=True)
    qvel = torch.zeros(n, sim.mjm.nv)
    qvel[:, :3] = torch.randn(n, 3, generator=gen)
    all_worlds = torch.ones(n, dtype=torch.bool, device=DEVICE)
    sim.reset(all_worlds, qpos.to(DEVICE), qvel.to(DEVICE), sim.default_ctrl.expand(n, -1))
    contacts = 0
    for _ in range(50):  # 1 s
        sim.step()
        assert not sim.overflowed().any(), f"overflow bits {sim.overflow.tolist()}"
        contacts = max(contacts, int(sim.d.nacon.numpy()[0]))
    print(f"most contacts at once in {n} worlds: {contacts} (capacity {sim.nconmax} per world)")
    assert contacts >= 2 * n, "the robots should lie on the terrain"
    assert not sim.nonfinite().any()
