"""Would the quadruped's physics run faster as K groups of worlds on K concurrent CUDA streams? (run by hand on a
GPU, not collected by pytest)

    python tests/bench_physics_streams.py --num-envs 4096 --groups 1 2 4

At 4096 worlds a sub-step is a chain of about 90 small kernels (see the benchmark's --profile), so the GPU might have
room to run two chains at once. For each K, K locomotion environments of num_envs / K worlds are driven with random
actions into the states that training visits, then their recorded sub-steps are replayed for 24 policy steps, once
one group after the other on one stream and once each group on a stream of its own; prints environment steps/s.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs_common as ec  # noqa: E402
import ppo_isaac_locomotion as loco  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--num-envs", type=int, default=4096)
parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
parser.add_argument("--steps", type=int, default=24, help="policy steps per timed repetition")
opts = parser.parse_args()
device = torch.device("cuda")
ec.seed_everything(0)


def flailing_env(n):
    env = loco.Go1Env(n, device, loco.Args(num_envs=n, device="cuda"))
    env.reset()
    env.desynchronize()
    for _ in range(80):  # an untrained policy's actions: robots stumble and fall, as early in training
        env.step(torch.randn(n, 12, device=device))
    return env


def replay_seconds(envs, concurrent: bool, repeats: int = 6) -> float:
    snapshots = [e.sim.get_state() for e in envs]
    streams = [ec.wp.stream_from_torch(torch.cuda.Stream()) for _ in envs]
    shared = ec.wp.get_device("cuda:0").stream
    best = float("inf")
    for repetition in range(repeats + 1):  # the first one is a warm-up
        for e, s in zip(envs, snapshots):
            e.sim.set_state(s)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(opts.steps):
            for e, stream in zip(envs, streams):
                ec.wp.capture_launch(e.sim._graph, stream=stream if concurrent else shared)
        torch.cuda.synchronize()
        if repetition:
            best = min(best, time.perf_counter() - t)
    return best


print(f"{torch.cuda.get_device_name(device)}: {opts.num_envs} worlds, {opts.steps} policy steps per repetition")
for k in opts.groups:
    envs = [flailing_env(opts.num_envs // k) for _ in range(k)]
    for concurrent in (False, True):
        s = replay_seconds(envs, concurrent)
        how = f"{k} streams" if concurrent else "one stream"
        print(f"{k} group(s) of {opts.num_envs // k:5d} worlds, {how:>10}: {1e3 * s:6.1f} ms, "
              f"{opts.num_envs * opts.steps / s / 1e6:.2f}M environment steps/s", flush=True)
    del envs
    torch.cuda.empty_cache()
