"""Which terrain representation MuJoCo Warp steps fastest (issue #18): the same stairs as a heightfield (at two
horizontal scales) or as static boxes, each world holding its own tile (envs_common's TerrainSlots, as
ppo_isaac_locomotion.py's --terrain rough does). A measurement script, not a test.

The map: 2 stairs tiles of 4 m side by side (0.3 m wide, 0.1 m high steps, up to a 1 m platform; ec.stairs_boxes),
0.5 m of flat ground around them. The heightfield samples that surface (ec.surface_height of the tiles' boxes) every
0.1 m or 0.05 m into one MuJoCo heightfield that replaces go1.xml's floor, shared by every world. The boxes: go1.xml's
floor turned into the tile's box slots (ec.terrain_spec), each world's slots holding its tile (ec.TerrainSlots), with
contact buffers sized as the script sizes them. Go1s at the home pose (joints held at default_ctrl) are dropped at
random places over their tile, so that feet, calves and trunks meet step edges; the script prints physics steps per
second of each representation (all worlds together), timed after two untimed steps (kernel loading, graph capture).

    python tests/terrain_representation.py --device cuda --num-envs 4096 --steps 200
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs_common as ec  # noqa: E402

TILE, STEP_WIDTH, STEP_HEIGHT, PLATFORM, BORDER, COLUMNS = 4.0, 0.3, 0.1, 1.0, 0.5, 2
HOME_HEIGHT = 0.331  # go1.xml's home trunk height over flat ground (m)
CONTACT_BOXES = 6  # a robot geom touches at most this many boxes at once (ppo_isaac_locomotion.py's)


def stairs_tile(name, difficulty, tile, ground, rng):
    return ec.stairs_boxes(tile, STEP_WIDTH, STEP_HEIGHT, PLATFORM, ground)


TILES = ec.generate_tiles(stairs_tile, ("stairs",) * COLUMNS, 1, TILE, BORDER)  # tile (0, c) centred at (2, 2 + 4c)


def map_height(xy: np.ndarray) -> np.ndarray:
    """The map's height (m) at world points xy (..., 2) (m): the surface of the boxes of the tile the point is over
    (the nearest tile's ground beyond the map's tiles)."""
    col = np.clip(np.floor(xy[..., 1] / TILE), 0, COLUMNS - 1).astype(int)
    z = np.zeros(xy.shape[:-1])
    for c in range(COLUMNS):
        z[col == c] = ec.surface_height(TILES.tile(0, c), xy[col == c])
    return z


def heightfield_model(hscale: float):
    """go1.xml with its floor plane turned into one heightfield of the map sampled every `hscale` m (legged_gym's and
    Isaac Lab's representation). MuJoCo's heightfield (mjCHField::Compile): nrow rows along y, ncol columns along x,
    row-major; the compiler rescales the data to [0, 1] and the surface is at pos_z + data * size[2], from pos_x -
    size[0] (column 0) to pos_x + size[0] (column ncol - 1)."""
    mujoco = ec.import_mujoco()
    x = np.linspace(-BORDER, TILE + BORDER, round((TILE + 2 * BORDER) / hscale) + 1)
    y = np.linspace(-BORDER, COLUMNS * TILE + BORDER, round((COLUMNS * TILE + 2 * BORDER) / hscale) + 1)
    inside = np.stack(np.meshgrid(x, y), axis=-1).clip(-BORDER + 1e-9, [TILE + BORDER - 1e-9, y[-1] - 1e-9])
    z = map_height(inside)  # (len(y), len(x)): rows along y; the outermost samples a hair inside the ground
    lo, hi = float(z.min()), float(z.max())
    size = [(x[-1] - x[0]) / 2, (y[-1] - y[0]) / 2, hi - lo if hi - lo > 1e-6 else 1.0, 1.0]
    spec = mujoco.MjSpec.from_file(str(ec.ASSETS / "go1.xml"))
    spec.add_hfield(name="terrain", size=size, nrow=len(y), ncol=len(x), userdata=z.astype(np.float32).ravel().tolist())
    floor = spec.geom("floor")  # keeps its friction, material, contype/conaffinity, ...
    floor.type = mujoco.mjtGeom.mjGEOM_HFIELD
    floor.hfieldname = "terrain"
    floor.pos = [(x[0] + x[-1]) / 2, (y[0] + y[-1]) / 2, lo]
    return spec.compile()


def measure(name: str, mjm, args, boxes: bool) -> float:
    n = args.num_envs
    kwargs = {}
    if boxes:  # as the script: per-world slot sizes, contact buffers for CONTACT_BOXES boxes per geom
        kwargs["nconmax"], kwargs["njmax"] = ec.contact_capacity(mjm, static_touch=CONTACT_BOXES)
        kwargs["per_world"] = ec.TerrainSlots.PER_WORLD
    sim = ec.BatchedSim(mjm, n, args.device, decimation=1, **kwargs)
    col = torch.arange(n) % COLUMNS  # world i over tile (0, i % COLUMNS), in both representations
    if boxes:
        level = torch.zeros(n, dtype=torch.long, device=sim.device)
        ec.TerrainSlots(sim, TILES).place(torch.ones(n, dtype=torch.bool, device=sim.device), level, col.to(sim.device))
    gen = torch.Generator().manual_seed(0)
    qpos = sim.default_qpos.cpu().expand(n, -1).clone()
    xy = torch.tensor(TILES.tile_origins[0, :, :2])[col] + (TILE - 1.0) * (torch.rand(n, 2, generator=gen) - 0.5)
    qpos[:, :2] = xy
    # Above the step under the trunk and the next one up.
    qpos[:, 2] = torch.tensor(map_height(xy.double().numpy()), dtype=torch.float32) + HOME_HEIGHT + STEP_HEIGHT + 0.02
    sim.reset(
        torch.ones(n, dtype=torch.bool, device=sim.device), qpos.to(sim.device), ctrl=sim.default_ctrl.expand(n, -1)
    )
    sim.step()  # kernels, graph capture
    sim.step()
    if sim.device.type == "cuda":
        torch.cuda.synchronize(sim.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        sim.step()
    if sim.device.type == "cuda":
        torch.cuda.synchronize(sim.device)
    elapsed = time.perf_counter() - t0
    rate = n * args.steps / elapsed
    print(
        f"{name:<22} {rate:12,.0f} physics steps/s   (ngeom {mjm.ngeom}, nconmax {sim.nconmax}/world, "
        f"overflowed worlds {int(sim.overflowed().sum())}, mean trunk z {float(sim.qpos[:, 2].mean()):.2f} m)",
        flush=True,
    )
    return rate


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--num-envs", type=int, default=16, help="worlds stepped together")
    parser.add_argument("--steps", type=int, default=50, help="timed physics steps")
    args = parser.parse_args()
    if args.num_envs < 1 or args.steps < 1:
        parser.error("--num-envs and --steps must be at least 1")
    ec.import_mujoco()
    print(
        f"{args.num_envs} Go1s on {COLUMNS} stairs tiles, {args.steps} physics steps, {ec.resolve_device(args.device)}"
    )
    measure("heightfield, 0.1 m", heightfield_model(0.1), args, boxes=False)
    measure("heightfield, 0.05 m", heightfield_model(0.05), args, boxes=False)
    measure("boxes", ec.terrain_spec("go1.xml", TILES.num_slots).compile(), args, boxes=True)


if __name__ == "__main__":
    main()
