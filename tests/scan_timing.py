"""How long the rough task's height scan takes (a measurement script, not collected by pytest): 4096 worlds x 187
rays cast by Go1Env.terrain_height (envs_common.TerrainSlots.heights: a Warp kernel, one thread per ray, each
world's boxes only) and by MuJoCo Warp's own rays (BatchedSim.rays), their largest difference, and one policy step of
physics (4 sub-steps) for scale. Needs a GPU.

    python tests/scan_timing.py [--num-envs 4096]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs_common as ec  # noqa: E402
import ppo_isaac_locomotion as loco  # noqa: E402


def timed(fn, repeats: int = 50) -> float:
    """Milliseconds per call of fn, after one untimed call."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-envs", type=int, default=4096, help="worlds, each on its own tile")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this measurement needs a GPU")
    device = torch.device("cuda")
    env = loco.Go1Env(args.num_envs, device, loco.Go1Config.from_args(loco.Args(terrain="rough")))
    env.reset()
    xy = env.root_pos[:, None, :2] + env.scan[None]  # the scan's points, unrotated: timing only
    origin = torch.cat([xy, torch.full_like(xy[..., :1], loco.SCAN_RAY_TOP)], dim=-1)
    down = env._down.expand_as(origin)
    mine = env.terrain_height(xy).clone()
    dist = env.sim.rays(origin, down, ec.TERRAIN_GROUP).clone()
    theirs = torch.where(dist >= 0, loco.SCAN_RAY_TOP - dist, ec.TERRAIN_BOTTOM - 1.0)
    rays = f"{args.num_envs} x {len(env.scan)} rays"
    print(f"max |TerrainSlots.heights - MuJoCo Warp rays| = {(mine - theirs).abs().max():.2e} m over {rays}")
    print(f"TerrainSlots.heights: {timed(lambda: env.terrain_height(xy)):.3f} ms per scan")
    print(f"MuJoCo Warp rays:     {timed(lambda: env.sim.rays(origin, down, ec.TERRAIN_GROUP)):.3f} ms per scan")
    print(f"physics, one policy step ({env.sim.decimation} sub-steps): {timed(env.sim.step):.3f} ms")


if __name__ == "__main__":
    main()
