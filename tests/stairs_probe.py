"""How a rough-terrain policy gets up a flight of stairs, by the command it is given (a measurement script, not
collected by pytest). N robots on the stairs-up tiles of one level play the deterministic policy of a checkpoint,
on the models its training used (randomized if it was), either under the task's own random commands (what the
curriculum and --eval see) or with one velocity held, each robot turned square to a flight first (as
--capture-video films it). Prints, every 2 s, the share of robots that got farther than half a tile from their
tile's centre at some time before any fall (out of the pit; the curriculum promotes on the distance at an
episode's end), with its 95% interval, and the share that fell. CPU or GPU.

    python tests/stairs_probe.py runs/<run>/checkpoints/latest.pt --level 5 [--command 0.5 0] [--seconds 10]
"""

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs_common as ec  # noqa: E402
import ppo_isaac_locomotion as loco  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description="How a rough-terrain policy gets up a flight of stairs, by command.")
    parser.add_argument("checkpoint", help="a checkpoint of ppo_isaac_locomotion.py trained with --terrain rough")
    parser.add_argument("--level", type=int, required=True, help="the curriculum level of the stairs-up tiles")
    parser.add_argument("--command", type=float, nargs=2, metavar=("VX", "VY"), help="hold this velocity (m/s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="simulated time (one episode: 20 s)")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    try:
        ckpt = ec.load_checkpoint(args.checkpoint, device, "ppo_isaac_locomotion")
    except ec.UserError as e:
        parser.error(str(e))
    fields = {f.name for f in dataclasses.fields(loco.Args)}
    run = loco.Args(**{k: v for k, v in ckpt["args"].items() if k in fields})
    if run.terrain != "rough":
        parser.error(f"{args.checkpoint} was trained on --terrain {run.terrain}: give a rough-terrain checkpoint")
    if not 0 <= args.level < run.terrain_levels:
        parser.error(f"--level {args.level}: this checkpoint's terrain has levels 0 to {run.terrain_levels - 1}")
    if args.num_envs < 1 or (args.command is not None and not all(math.isfinite(v) for v in args.command)):
        parser.error("--num-envs must be at least 1 and --command two finite numbers")
    if not 0 < args.seconds <= run.episode_length_s:  # one episode: a reset would turn the robots at random
        parser.error(f"--seconds {args.seconds}: give up to the episode length, {run.episode_length_s} s")
    torch.manual_seed(args.seed)
    env = loco.Go1Env(args.num_envs, device, loco.Go1Config.from_args(run), curriculum=False)
    agent = loco.ActorCritic(env.num_obs, env.num_actions).to(device)
    agent.load_state_dict(ckpt["model"])
    normalizer = loco.ObservationNormalizer(env.num_obs, clip=run.obs_clip).to(device)
    normalizer.load_state_dict(ckpt["normalizer"])

    env.reset()
    obs = loco.start_on_stairs(env, args.level)
    if args.command is not None:  # square to a flight, as record_video does
        obs = loco.turn_square(env)
        ahead = ec.yaw_from_quat(env.root_quat)
        held = torch.tensor([*args.command, 0.0], device=device)

    farthest = torch.zeros(args.num_envs, device=device)
    fell = torch.zeros(args.num_envs, dtype=torch.bool, device=device)
    what = f"held at {args.command} m/s" if args.command is not None else "the task's random commands"
    print(f"{args.num_envs} robots, stairs up at level {args.level} of {run.terrain_levels - 1}, {what}")
    with torch.no_grad():
        steps = max(1, round(args.seconds / env.dt))
        for step in range(steps):
            if args.command is not None:
                loco.hold_command(env, obs, held, ahead)
            obs, _, terminated, *_ = env.step(agent.act_deterministic(normalizer(obs)))
            fell |= terminated.bool()
            walked = (env.root_pos[:, :2] - env.env_origin[:, :2]).norm(dim=1)
            farthest = torch.where(fell, farthest, torch.maximum(farthest, walked))  # until its first fall
            if (step + 1) % round(2.0 / env.dt) == 0 or step + 1 == steps:
                out = (farthest > loco.TILE_SIZE / 2).sum().item()
                low, high = ec.wilson_interval(out, args.num_envs)
                print(
                    f"  {(step + 1) * env.dt:4.0f} s: out of the pit {out / args.num_envs:.2f} (95% CI {low:.2f}-"
                    f"{high:.2f}) | fell {fell.float().mean().item():.2f} | median farthest {farthest.median():.2f} m"
                )


if __name__ == "__main__":
    main()
