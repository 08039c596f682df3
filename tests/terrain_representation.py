"""Which terrain representation MuJoCo Warp steps fastest (issue #18): the same stairs as a heightfield (add_terrain,
at two horizontal scales) or as static boxes. A measurement script, not a test.

The map: 2 stairs tiles of 4 m (0.3 m wide, 0.1 m high steps, up to a 1 m platform), 0.5 m flat border. The boxes:
per tile, one box per step level, nested squares from the ground up to that step's height (the stairs are their
union; one box per level instead of four per ring side: fewer pairs for the broadphase), on the original plane floor.
Go1s at the home pose (joints held at default_ctrl) are dropped at random places over both tiles, so that feet,
calves and trunks meet step edges; the script prints physics steps per second of each representation (all worlds
together), timed after a first, untimed step (kernel loading, graph capture).

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

TILE, STEP_WIDTH, STEP_HEIGHT, PLATFORM, BORDER = 4.0, 0.3, 0.1, 1.0, 0.5


def stairs_map(hscale: float) -> ec.TerrainMap:
    def tile(name, difficulty, shape, h, rng):
        return ec.pyramid_stairs(shape, h, STEP_WIDTH, STEP_HEIGHT, PLATFORM)

    return ec.generate_terrain(tile, ("stairs", "stairs"), 1, (TILE, TILE), hscale, BORDER)


def box_model(terrain: ec.TerrainMap):
    """go1.xml with the same stairs as nested static boxes on its plane floor (same surface properties)."""
    mujoco = ec.import_mujoco()
    spec = mujoco.MjSpec.from_file(str(ec.ASSETS / "go1.xml"))
    floor = spec.geom("floor")
    rings = int(np.floor((TILE - PLATFORM) / 2 / STEP_WIDTH + 1e-6))
    for x, y, _ in terrain.tile_origins[0]:
        for k in range(1, rings + 1):
            half = TILE / 2 - k * STEP_WIDTH  # the square at k steps from the edge, k * STEP_HEIGHT high
            box = spec.worldbody.add_geom(
                type=mujoco.mjtGeom.mjGEOM_BOX,
                size=[half, half, k * STEP_HEIGHT / 2],
                pos=[float(x), float(y), k * STEP_HEIGHT / 2],
            )
            for attr in ("contype", "conaffinity", "condim", "friction", "priority", "solref", "solimp", "material"):
                setattr(box, attr, getattr(floor, attr))
    return spec.compile()


def measure(name: str, mjm, terrain: ec.TerrainMap, args) -> float:
    sim = ec.BatchedSim(mjm, args.num_envs, args.device, decimation=1)
    gen = torch.Generator().manual_seed(0)
    n = args.num_envs
    heights = ec.HeightMap(terrain, "cpu")
    qpos = sim.default_qpos.cpu().expand(n, -1).clone()
    tiles = torch.tensor(terrain.tile_origins[0, :, :2])[torch.randint(0, 2, (n,), generator=gen)]
    xy = tiles + (TILE - 1.0) * (torch.rand(n, 2, generator=gen) - 0.5)
    qpos[:, :2] = xy
    qpos[:, 2] = heights(xy) + 0.331 + STEP_HEIGHT + 0.02  # above the step under the trunk and the next one up
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
    print(f"{args.num_envs} Go1s on 2 stairs tiles, {args.steps} physics steps, {ec.resolve_device(args.device)}")
    coarse, fine = stairs_map(0.1), stairs_map(0.05)
    measure("heightfield, 0.1 m", ec.add_terrain("go1.xml", coarse), coarse, args)
    measure("heightfield, 0.05 m", ec.add_terrain("go1.xml", fine), fine, args)
    measure("boxes", box_model(coarse), coarse, args)


if __name__ == "__main__":
    main()
