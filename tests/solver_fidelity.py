"""How far one physics step of MuJoCo Warp, at a given constraint-solver setting, is from a converged solve
(run by hand; tests/test_envs_common.py checks the asset's own setting with it).

    python tests/solver_fidelity.py --solver 1 5

MuJoCo's solver finds the contact and joint-friction forces by Newton's method, starting from the previous step's
solution; `iterations` caps the Newton iterations per physics step and `ls_iterations` the line-search steps of each.
Fewer iterations make a step cheaper on a GPU (MuJoCo Warp's solver is a chain of small kernels per iteration) but
may stop before the forces are found. This measures how far: quadrupeds settle at their home pose, then follow joint
targets that jump every policy step (4 physics steps), as a policy's do; at every physics step each world's state is
copied into MuJoCo's C engine (float64, solver run to convergence) and stepped there too, and the difference of the
generalized velocities after the step is recorded. Copying the state each step keeps errors from compounding, so
each number is one step's own error. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mujoco
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import envs_common as ec  # noqa: E402

PHASES = ("settling", "moving targets")


def per_step_errors(
    solver: tuple[int, int] | None,
    num_worlds: int = 16,
    settle_steps: int = 100,
    moving_steps: int = 400,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Max |qvel - converged qvel| over each world's dofs, for every physics step of each phase."""
    mjm = ec.load_model("go1.xml")
    if solver is not None:
        mjm.opt.iterations, mjm.opt.ls_iterations = solver
    converged = ec.load_model("go1.xml")
    converged.opt.iterations, converged.opt.ls_iterations, converged.opt.tolerance = 200, 50, 1e-10
    gen = torch.Generator().manual_seed(seed)
    sim = ec.BatchedSim(mjm, num_worlds, device, decimation=1)
    refs = [mujoco.MjData(converged) for _ in range(num_worlds)]
    errors = {phase: [] for phase in PHASES}
    for step in range(settle_steps + moving_steps):
        moving = step >= settle_steps
        if moving and step % 4 == 0:  # a new joint target each policy step (50 Hz), 0.3 rad around the home pose
            sim.ctrl.copy_(sim.default_ctrl + 0.3 * torch.randn(num_worlds, mjm.nu, generator=gen).to(device))
        state = {k: v.double().cpu().numpy() for k, v in sim.get_state().items()}
        for i, data in enumerate(refs):
            for k in ("qpos", "qvel", "ctrl", "qacc_warmstart"):
                getattr(data, k)[:] = state[k][i]
        sim.step()
        qvel = sim.qvel.double().cpu().numpy()
        for i, data in enumerate(refs):
            mujoco.mj_step(converged, data)
            if step >= 10:  # the first steps are the drop onto the feet, not a state training visits
                errors[PHASES[moving]].append(np.abs(qvel[i] - data.qvel).max())
    return {phase: np.array(e) for phase, e in errors.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--solver",
        type=int,
        nargs=2,
        default=None,
        metavar=("ITERATIONS", "LS_ITERATIONS"),
        help="MuJoCo's opt.iterations and opt.ls_iterations (default: go1.xml's)",
    )
    parser.add_argument("--num-worlds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=400, help="physics steps with moving targets")
    opts = parser.parse_args()
    errors = per_step_errors(opts.solver, opts.num_worlds, moving_steps=opts.steps)
    setting = opts.solver or "as in go1.xml"
    print(f"solver {setting}: per physics step, max over dofs of |qvel - converged qvel| (rad/s, m/s)")
    for phase, e in errors.items():
        print(
            f"  {phase:>14}: median {np.median(e):.1e}, 90th percentile {np.percentile(e, 90):.1e}, "
            f"99th {np.percentile(e, 99):.1e}, max {e.max():.1e} ({e.size} world-steps)"
        )


if __name__ == "__main__":
    main()
