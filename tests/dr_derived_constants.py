"""What keeping the compiled model's inverse weights does to a randomized Go1 (run by hand; the README quotes it).

    python tests/dr_derived_constants.py [--worlds 16] [--seconds 2] [--target-noise 0.05]

MuJoCo derives some model fields from others when it compiles a model (mj_setConst). With domain randomization,
envs_common.BatchedSim recomputes body_subtreemass for each world's masses but keeps body_invweight0 and
dof_invweight0 (the constraints' regularization scale) at the compiled model's values, since recomputing them on the
device costs a mass-matrix solve per dof and per body row at every reset step. This measures what that changes, in
MuJoCo's C engine (float64), for models drawn exactly as training draws them (ppo_isaac_locomotion's Go1Env with
--domain-rand, on the CPU): each drawn model is stepped
  - with everything recomputed (mj_setConst: what MuJoCo itself would step),
  - as the training simulator steps it (subtree masses recomputed, inverse weights kept),
  - the first again from a start moved by 1e-6 rad (how fast nearby trajectories part anyway),
  - and the compiled model itself (what the randomization changes),
from the home pose, with joint targets at the home pose plus Gaussian noise redrawn every policy step (4 physics
steps), and prints the largest difference of the generalized positions from the first after 0.2 s and at the end.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import mujoco
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ppo_isaac_locomotion as loco  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, default=16, help="randomized models to draw")
    parser.add_argument("--seconds", type=float, default=2.0, help="simulated time per model")
    parser.add_argument("--target-noise", type=float, default=0.05, help="std of the joint targets around home (rad)")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()

    torch.manual_seed(opts.seed)
    env = loco.Go1Env(opts.worlds, torch.device("cpu"))  # the defaults: --domain-rand
    env.reset()
    mjm, field = env.sim.mjm, env.sim.model
    names = [k for k in field if k != "body_subtreemass"]
    rng = np.random.default_rng(opts.seed)
    policy_steps = int(round(opts.seconds / env.dt))
    early = max(1, int(round(0.2 / env.dt)))
    rows = []
    for i in range(opts.worlds):
        kept = copy.deepcopy(mjm)
        for name in names:
            getattr(kept, name)[:] = field[name][i].double().numpy().reshape(getattr(kept, name).shape)
        own = copy.deepcopy(kept)
        mujoco.mj_setConst(own, mujoco.MjData(own))
        kept.body_subtreemass[:] = own.body_subtreemass
        body = np.abs(own.body_invweight0 - kept.body_invweight0).max() / np.abs(kept.body_invweight0).max()
        dof = np.abs(own.dof_invweight0 / kept.dof_invweight0 - 1)[6:].max()
        targets = mjm.key_ctrl[0] + opts.target_noise * rng.standard_normal((policy_steps, mjm.nu))
        runs = {}
        for label, model, nudge in (
            ("own", own, 0.0),
            ("kept", kept, 0.0),
            ("nudged", own, 1e-6),
            ("compiled", mjm, 0),
        ):
            data = mujoco.MjData(model)
            data.qpos[:] = mjm.key_qpos[0]
            data.qpos[7:] += nudge
            trajectory = []
            for target in targets:
                data.ctrl[:] = target
                for _ in range(env.sim.decimation):
                    mujoco.mj_step(model, data)
                trajectory.append(data.qpos.copy())
            runs[label] = np.array(trajectory)
        diff = {k: np.abs(runs[k] - runs["own"]).max(axis=1) for k in ("kept", "nudged", "compiled")}
        rows.append((body, dof, *(d[early - 1] for d in diff.values()), *(d[-1] for d in diff.values())))
        print(
            f"model {i:2d}: invweight0 off by {body:.3f} (bodies), {dof:.3f} (joints); max |qpos difference| from "
            f"the recomputed model after 0.2 s / {opts.seconds:g} s: kept {diff['kept'][early - 1]:.1e} / "
            f"{diff['kept'][-1]:.1e}, nudged by 1e-6 {diff['nudged'][early - 1]:.1e} / {diff['nudged'][-1]:.1e}, "
            f"compiled model {diff['compiled'][early - 1]:.1e} / {diff['compiled'][-1]:.1e}",
            flush=True,
        )
    r = np.array(rows)
    print(
        f"median over {opts.worlds} models: invweight0 off by {np.median(r[:, 0]):.3f} (bodies), "
        f"{np.median(r[:, 1]):.3f} (joints); max |qpos difference| after 0.2 s: kept {np.median(r[:, 2]):.1e}, "
        f"nudged {np.median(r[:, 3]):.1e}, compiled model {np.median(r[:, 4]):.1e}; after {opts.seconds:g} s: kept "
        f"{np.median(r[:, 5]):.1e}, nudged {np.median(r[:, 6]):.1e}, compiled model {np.median(r[:, 7]):.1e}"
    )


if __name__ == "__main__":
    main()
