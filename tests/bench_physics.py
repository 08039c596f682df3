"""Physics-only throughput of each asset through envs_common.BatchedSim (run by hand, not collected by pytest).

    python tests/bench_physics.py --num-envs 4096 [--device cuda]

Steps every world with its home controls held; on CUDA, the sub-steps are replayed from one CUDA graph.
Prints physics steps per second (worlds x physics steps / s) and environment steps per second (/ decimation).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs_common as ec  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--num-envs", type=int, nargs="+", default=[4096])
parser.add_argument("--device", default="auto")
parser.add_argument("--iters", type=int, default=200)
args = parser.parse_args()
device = ec.resolve_device(args.device)
for asset, decimation, contacts in [("go1.xml", 4, True), ("panda.xml", 4, False)]:
    for n in args.num_envs:
        sim = ec.BatchedSim(ec.load_model(asset), n, device, decimation=decimation, contact_forces=contacts)
        for _ in range(3):
            sim.step()  # kernels, graph capture
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.iters):
            sim.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        phys = n * decimation * args.iters / dt
        print(f"{asset:10s} {n:6d} envs on {device}: {phys / 1e6:7.2f} M physics steps/s, "
              f"{phys / decimation / 1e6:6.2f} M env steps/s, finite={bool(torch.isfinite(sim.qpos).all())}, "
              f"overflowed={int(sim.overflowed().sum())}", flush=True)
        del sim
