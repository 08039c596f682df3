"""The shared simulation layer against references: MuJoCo's C engine, MuJoCo's own quaternion functions, and
hand-checked invariants (resets, standing, overflow detection, errors). Real physics on the CPU."""

import copy
import os
import subprocess
import sys

import mujoco
import numpy as np
import pytest
import torch

import envs_common as ec

ASSETS = {"go1": "go1.xml", "panda": "panda.xml"}
# CI runs these on the CPU; on a GPU machine, TEST_DEVICE=cuda runs the simulation tests through CUDA graphs.
DEVICE = os.environ.get("TEST_DEVICE", "cpu")
ON_GPU = DEVICE.startswith("cuda")


@pytest.fixture(scope="module", params=sorted(ASSETS))
def model(request):
    return request.param, ec.load_model(ASSETS[request.param])


def _c_data_from_world(mjm, sim, i):
    data = mujoco.MjData(mjm)
    data.qpos[:] = sim.qpos[i].double().cpu().numpy()
    data.qvel[:] = sim.qvel[i].double().cpu().numpy()
    data.ctrl[:] = sim.ctrl[i].double().cpu().numpy()
    return data


# ---------------------------------------------------------------------------------------------------------------
# MuJoCo Warp (float32, batched) against MuJoCo's C engine (float64, one world at a time)
# ---------------------------------------------------------------------------------------------------------------
# Stated tolerance: after 300 physics steps (1.5 s) from perturbed states under random controls, every world's
# generalized positions agree with mj_step's to within QPOS_TOL (rad or m). Both engines run the same model; the
# difference is float32 against float64 arithmetic, which grows through the quadruped's contact onsets (it is
# dropped onto the floor) and stays tiny for the contact-free arm. A world that falls over (go1's world 3 rolls onto
# its side) is chaotic: its own mj_step trajectory moves by more than QPOS_TOL when its start is perturbed by
# PERTURBATION (float32-sized: 1e-6 rad); such a world is held to CHAOS_FACTOR times that spread instead (go1.xml's
# world 3: MuJoCo Warp 1.4e-2 from mj_step, mj_step 1.6e-2 from its perturbed self).
QPOS_TOL = {"go1": 1e-2, "panda": 1e-4}
PERTURBATION, CHAOS_FACTOR = 1e-6, 2.0


def test_batched_sim_matches_mujoco_c(model):
    name, mjm = model
    n, steps = 4, 300
    gen = torch.Generator().manual_seed(0)
    sim = ec.BatchedSim(mjm, n, DEVICE, decimation=1)
    qpos = sim.default_qpos.expand(n, -1).clone()
    free = 7 if mjm.jnt_type[0] == mujoco.mjtJoint.mjJNT_FREE else 0
    qpos[:, free:] += 0.1 * torch.randn(n, mjm.nq - free, generator=gen).to(DEVICE)
    if free:
        qpos[:, 2] += 0.05  # drop the quadruped from a little above the ground: contacts form during the test
    lo, hi = torch.tensor(mjm.actuator_ctrlrange, dtype=torch.float32, device=DEVICE).T
    ctrl = sim.default_ctrl + 0.2 * torch.randn(n, mjm.nu, generator=gen).to(DEVICE)
    ctrl = torch.maximum(torch.minimum(ctrl, hi), lo)
    sim.reset(torch.ones(n, dtype=torch.bool, device=DEVICE), qpos, ctrl=ctrl)
    refs = [_c_data_from_world(mjm, sim, i) for i in range(n)]
    perturbed = [_c_data_from_world(mjm, sim, i) for i in range(n)]
    for data in perturbed:
        data.qpos[free:] += PERTURBATION
    for _ in range(steps):
        sim.step()
        for data in refs + perturbed:
            mujoco.mj_step(mjm, data)
    for i, (data, other) in enumerate(zip(refs, perturbed)):
        err = np.abs(sim.qpos[i].double().cpu().numpy() - data.qpos).max()
        spread = np.abs(other.qpos - data.qpos).max()
        tol = max(QPOS_TOL[name], CHAOS_FACTOR * spread)
        print(f"{name} world {i}: max |qpos error| {err:.2e}, mj_step's own spread {spread:.2e}, tolerance {tol:.1e}")
        assert err < tol, f"{name} world {i}: |qpos - mj_step qpos| = {err:.2e} after {steps} steps"
        mujoco.mj_kinematics(mjm, data)
        assert np.abs(sim.xpos[i].double().cpu().numpy() - data.xpos).max() < tol
    assert not sim.overflowed().any()


# Per-world model fields (domain randomization): each world steps with its own model, as mj_step does with that
# world's values. The C model gets the same fields (float32 values, as the world holds them) and MuJoCo's own
# body_subtreemass for them (mj_setConst of a copy); the constants BatchedSim keeps at the compiled values
# (body_invweight0, dof_invweight0: see its docstring) stay at them in the C model too.
PER_WORLD = (
    "geom_friction",
    "body_mass",
    "body_inertia",
    "body_ipos",
    "actuator_gainprm",
    "actuator_biasprm",
    "dof_frictionloss",
    "dof_damping",
    "dof_armature",
)


def test_per_world_model_fields_match_mujoco_c():
    mjm = ec.load_model(ASSETS["go1"])
    n, steps = 3, 200
    gen = torch.Generator().manual_seed(4)
    sim = ec.BatchedSim(mjm, n, DEVICE, decimation=1, per_world=PER_WORLD)
    assert sim.model["body_subtreemass"].shape == (n, mjm.nbody), "body_mass brings its subtree masses along"
    for name in PER_WORLD:
        assert sim.model[name].shape[0] == n and torch.equal(sim.model[name][0], sim.nominal[name])

    def u(*shape, lo, hi):
        return (lo + (hi - lo) * torch.rand(*shape, generator=gen)).to(DEVICE)

    # World 0 keeps the compiled model; worlds 1 and 2 get large changes, so that a world stepping with another
    # world's values would be far off.
    field, w = sim.model, slice(1, n)
    field["geom_friction"][w, :, 0] *= u(n - 1, mjm.ngeom, lo=0.5, hi=1.5)
    scale = u(n - 1, mjm.nbody, lo=0.7, hi=1.3)
    field["body_mass"][w] *= scale
    field["body_mass"][w, 1] += 1.5
    field["body_inertia"][w] *= scale[..., None]
    field["body_ipos"][w, 1] += u(n - 1, 3, lo=-0.04, hi=0.04)
    kp = u(n - 1, mjm.nu, lo=0.7, hi=1.3)
    field["actuator_gainprm"][w, :, 0] *= kp
    field["actuator_biasprm"][w, :, 1] *= kp
    field["actuator_biasprm"][w, :, 2] *= u(n - 1, mjm.nu, lo=0.5, hi=2.0)
    field["dof_frictionloss"][w] *= u(n - 1, mjm.nv, lo=0.5, hi=1.5)
    field["dof_damping"][w, 6:] += u(n - 1, mjm.nv - 6, lo=0.0, hi=0.5)
    field["dof_armature"][w] *= u(n - 1, mjm.nv, lo=1.0, hi=1.5)
    qpos = sim.default_qpos.expand(n, -1).clone()
    qpos[:, 2] += 0.03  # dropped onto its feet: contacts form during the test
    ctrl = sim.default_ctrl + 0.1 * torch.randn(n, mjm.nu, generator=gen).to(DEVICE)
    sim.reset(torch.ones(n, dtype=torch.bool, device=DEVICE), qpos, ctrl=ctrl)  # also refreshes the subtree masses

    models = []
    for i in range(n):
        m = copy.deepcopy(mjm)
        for name in PER_WORLD:
            getattr(m, name)[:] = field[name][i].double().cpu().numpy().reshape(getattr(m, name).shape)
        scratch = copy.deepcopy(m)
        mujoco.mj_setConst(scratch, mujoco.MjData(scratch))
        np.testing.assert_allclose(field["body_subtreemass"][i].cpu().numpy(), scratch.body_subtreemass, rtol=1e-6)
        m.body_subtreemass[:] = scratch.body_subtreemass
        models.append(m)
    refs = [_c_data_from_world(mjm, sim, i) for i in range(n)]
    perturbed = [_c_data_from_world(mjm, sim, i) for i in range(n)]
    nominal = [_c_data_from_world(mjm, sim, i) for i in range(n)]  # each world's start in the compiled model
    for data in perturbed:
        data.qpos[7:] += PERTURBATION
    for _ in range(steps):
        sim.step()
        for i in range(n):
            for m, data in ((models[i], refs[i]), (models[i], perturbed[i]), (mjm, nominal[i])):
                mujoco.mj_step(m, data)
    for i in range(n):
        got = sim.qpos[i].double().cpu().numpy()
        err = np.abs(got - refs[i].qpos).max()
        tol = max(QPOS_TOL["go1"], CHAOS_FACTOR * np.abs(perturbed[i].qpos - refs[i].qpos).max())
        off = np.abs(got - nominal[i].qpos).max()
        print(f"world {i}: |qpos - mj_step| {err:.1e} (tolerance {tol:.0e}); from the compiled model's {off:.1e}")
        assert err < tol, f"world {i}: |qpos - mj_step qpos| = {err:.2e} after {steps} steps"
        if i > 0:
            assert off > 5 * tol, f"world {i}: its own model changed its motion by only {off:.1e}"


# ---------------------------------------------------------------------------------------------------------------
# The solver setting of go1.xml against a converged solve, one step at a time (tests/solver_fidelity.py)
# ---------------------------------------------------------------------------------------------------------------
def test_quadruped_solver_setting_converges_in_training_like_states():
    """Joint targets that jump every policy step, as a policy's: with go1.xml's 4 Newton iterations a physics step
    lands within 1e-3 rad/s of a converged solve in at least 90% of world-steps; with 1 iteration (what
    `--solver 1 5` trades for speed) it does not, which shows that the measure tells the two apart."""
    from solver_fidelity import per_step_errors

    sizes = dict(num_worlds=8, settle_steps=60, moving_steps=200, device=DEVICE)
    asset = per_step_errors(None, **sizes)["moving targets"]
    print(f"go1.xml: median {np.median(asset):.1e}, 90th percentile {np.percentile(asset, 90):.1e} rad/s")
    assert np.median(asset) < 1e-4 and np.percentile(asset, 90) < 1e-3
    one = per_step_errors((1, 5), **sizes)["moving targets"]
    print(f"1 iteration: median {np.median(one):.1e}, 90th percentile {np.percentile(one, 90):.1e} rad/s")
    assert np.percentile(one, 90) > 0.1


# ---------------------------------------------------------------------------------------------------------------
# Resets
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("by", ["mask", "ids"])
def test_reset_touches_only_the_chosen_worlds(model, by):
    name, mjm = model
    n = 6
    sim = ec.BatchedSim(mjm, n, DEVICE, decimation=2)
    sim.ctrl.add_(0.3 * torch.randn(n, mjm.nu, generator=torch.Generator().manual_seed(1)).to(DEVICE))
    for _ in range(5):
        sim.step()
    views = {k: getattr(sim, k).clone() for k in ("qpos", "qvel", "ctrl", "xpos", "xquat", "site_xpos")}
    chosen = torch.tensor([1, 4], device=DEVICE)
    mask = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    mask[chosen] = True
    target_q = sim.default_qpos + 0.05 * torch.arange(1, mjm.nq + 1, device=DEVICE) / mjm.nq
    target_v = 0.01 * torch.arange(mjm.nv, dtype=torch.float32, device=DEVICE)
    if by == "mask":
        sim.reset(mask, target_q.expand(n, -1), target_v.expand(n, -1))
    else:
        sim.reset(chosen, target_q.expand(2, -1), target_v.expand(2, -1))
    for k, before in views.items():
        assert torch.equal(getattr(sim, k)[~mask], before[~mask]), f"{name}: reset changed {k} of other worlds"
    assert torch.equal(sim.qpos[mask], target_q.expand(2, -1))
    assert torch.equal(sim.qvel[mask], target_v.expand(2, -1))
    # Body poses of the reset worlds are those of the new qpos, right away (MuJoCo's C kinematics as reference).
    data = mujoco.MjData(mjm)
    data.qpos[:] = target_q.double().cpu().numpy()
    mujoco.mj_kinematics(mjm, data)
    for i in chosen.tolist():
        np.testing.assert_allclose(sim.xpos[i].cpu().numpy(), data.xpos, atol=1e-5)
        np.testing.assert_allclose(sim.xquat[i].cpu().numpy(), data.xquat, atol=1e-5)
    # Stepping after a reset behaves like a fresh world: same state in, same state out.
    sim.reset(
        torch.ones(n, dtype=torch.bool, device=DEVICE), target_q.expand(n, -1), ctrl=sim.default_ctrl.expand(n, -1)
    )
    sim.step()
    assert torch.allclose(sim.qpos, sim.qpos[:1].expand(n, -1), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Standing and holding under the models' own PD actuation, with one and with many worlds
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 64])
def test_home_pose_is_stable(model, n):
    name, mjm = model
    sim = ec.BatchedSim(mjm, n, DEVICE, decimation=4, contact_forces=True)
    steps = int(round(2.0 / (mjm.opt.timestep * sim.decimation)))  # 2 s
    start = sim.qpos.clone()
    lowest = torch.full((n,), 1e9, device=DEVICE)
    for _ in range(steps):
        sim.step()
        if name == "go1":
            lowest = torch.minimum(lowest, sim.qpos[:, 2])
    assert torch.isfinite(sim.qpos).all()
    if name == "go1":
        trunk = sim.body_id("trunk")
        up = ec.projected_gravity(sim.qpos[:, 3:7])[:, 2]
        assert (up < -0.98).all(), "trunk tipped over"
        assert (lowest > start[:, 2] - 0.08).all(), f"trunk sagged to {lowest.min():.3f} m from {start[0, 2]:.3f}"
        assert (sim.contact_force[:, trunk].norm(dim=-1) == 0).all(), "trunk touched the ground"
        feet = [sim.body_id(f"{leg}_foot") for leg in ("FR", "FL", "RR", "RL")]
        weight = float(mjm.body_subtreemass[1] * 9.81)
        support = sim.contact_force[:, feet, 2].sum(-1)
        assert torch.allclose(support, torch.full_like(support, weight), rtol=0.05), "feet do not carry the weight"
        assert sim.qvel.abs().max() < 0.05, "not at rest after 2 s"
    else:
        assert (sim.qpos - start).abs().max() < 0.01, "arm drifted from its home pose"
        assert sim.qvel.abs().max() < 0.01


def test_contact_forces_match_mujoco_c():
    """The net contact force on each body after one policy step of 4 sub-steps (computed once, after the last one)
    against MuJoCo's C engine: four mj_step, then mj_rnePostConstraint."""
    mjm = ec.load_model(ASSETS["go1"])
    n = 4
    sim = ec.BatchedSim(mjm, n, DEVICE, decimation=4, contact_forces=True)
    for _ in range(25):  # 0.5 s: settle onto the feet
        sim.step()
    sim.ctrl.add_(0.3 * torch.randn(n, mjm.nu, generator=torch.Generator().manual_seed(1)).to(DEVICE))
    warmstart = sim.get_state()["qacc_warmstart"].double().cpu().numpy()
    refs = [_c_data_from_world(mjm, sim, i) for i in range(n)]
    sim.step()
    weight = float(mjm.body_subtreemass[1] * 9.81)
    largest = 0.0
    for i, data in enumerate(refs):
        data.qacc_warmstart[:] = warmstart[i]
        for _ in range(sim.decimation):
            mujoco.mj_step(mjm, data)
        mujoco.mj_rnePostConstraint(mjm, data)
        got, want = sim.contact_force[i].double().cpu().numpy(), data.cfrc_ext[:, 3:6]
        assert np.abs(got - want).max() < 0.01 * weight, f"world {i}: contact forces differ from mj_rnePostConstraint"
        largest = max(largest, np.abs(want).max())
    assert largest > 0.3 * weight, "no world touched the ground: the test compared zeros"


def test_c_engine_sim_is_mj_step_behind_batched_sims_interface(tmp_path, monkeypatch):
    """CEngineSim (sim-to-sim's second simulator) against plain mj_step from the same state: positions, velocities
    and contact forces after a policy step, a reset of chosen worlds only, and a blow-up flagged as non-finite
    (MuJoCo's own silent reset to qpos0 is off, so it cannot pass for a healthy world)."""
    monkeypatch.chdir(tmp_path)  # MuJoCo logs the blow-up's warnings to MUJOCO_LOG.TXT in the working folder
    mjm = ec.load_model(ASSETS["go1"])
    n = 3
    sim = ec.CEngineSim(mjm, n, "cpu", decimation=4, contact_forces=True)
    sim.ctrl.add_(0.3 * torch.randn(n, mjm.nu, generator=torch.Generator().manual_seed(1)))
    refs = [_c_data_from_world(mjm, sim, i) for i in range(n)]
    for _ in range(10):
        sim.step()
        for data in refs:
            mujoco.mj_step(mjm, data, nstep=4)
    for i, data in enumerate(refs):
        mujoco.mj_rnePostConstraint(mjm, data)
        np.testing.assert_allclose(sim.qpos[i].numpy(), data.qpos, atol=1e-6)
        np.testing.assert_allclose(sim.qvel[i].numpy(), data.qvel, atol=1e-5)
        np.testing.assert_allclose(sim.contact_force[i].numpy(), data.cfrc_ext[:, 3:6], atol=1e-4)
    weight = float(mjm.body_subtreemass[1] * 9.81)
    assert sim.contact_force[..., 2].sum(dim=1).max() > 0.5 * weight, "no robot on the ground: zeros compared"
    before = sim.qpos.clone()
    sim.reset(torch.tensor([1]), sim.default_qpos[None])
    assert torch.equal(sim.qpos[[0, 2]], before[[0, 2]]) and torch.equal(sim.qpos[1], sim.default_qpos)
    np.testing.assert_array_equal(sim.datas[1].qpos, sim.default_qpos.double().numpy())
    qvel = torch.zeros(1, mjm.nv)
    qvel[0, 6:] = 1e11  # beyond MuJoCo's limit of a sane velocity (mjMAXVAL)
    sim.reset(torch.tensor([2]), sim.default_qpos[None], qvel)
    sim.step()
    assert sim.nonfinite().tolist() == [False, False, True] and not sim.overflowed().any()


@pytest.mark.skipif(
    ON_GPU,
    reason="on a GPU, MuJoCo Warp's float atomics (contact slots, constraint sums) make two "
    "identical simulations differ in the last bits; the CPU runs the same kernels deterministically",
)
def test_skipping_pose_refresh_leaves_the_physics_bit_for_bit():
    """poses=False (the locomotion task's setting) drops the kinematics passes after step() and reset(): the state,
    actuator forces and contact forces stay bit-for-bit those of poses=True, while body poses are left as MuJoCo's
    mj_step leaves them (computed from the qpos before the last sub-step)."""
    mjm = ec.load_model(ASSETS["go1"])
    n = 4
    sims = [ec.BatchedSim(mjm, n, DEVICE, decimation=4, contact_forces=True, poses=p) for p in (True, False)]
    gen = torch.Generator().manual_seed(2)
    for step in range(30):
        ctrl = sims[0].default_ctrl + 0.3 * torch.randn(n, mjm.nu, generator=gen).to(DEVICE)
        if step == 12:  # reset two worlds to a perturbed pose mid-way
            qpos = sims[0].default_qpos.expand(n, -1).clone()
            qpos[:, 7:] += 0.2
            reset = torch.tensor([True, False, True, False], device=DEVICE)
        for sim in sims:
            sim.ctrl.copy_(ctrl)
            if step == 12:
                sim.reset(reset, qpos)
            sim.step()
    a, b = sims
    for name in ("qpos", "qvel", "act_force", "contact_force"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.contact_force[:, 1:].abs().max() > 1.0, "no contact: the test compared zeros"
    assert not torch.equal(a.xpos, b.xpos), "poses=False still refreshed the poses"


# ---------------------------------------------------------------------------------------------------------------
# Contact buffers: sized from the model, overflow detected per world instead of contacts dropped silently
# ---------------------------------------------------------------------------------------------------------------
def test_contact_overflow_is_detected():
    mjm = ec.load_model(ASSETS["go1"])
    nconmax, njmax = ec.contact_capacity(mjm)
    assert nconmax >= 4 + 1  # at least the four feet and the trunk can touch the floor
    assert njmax >= 4 * 4
    sim = ec.BatchedSim(mjm, 3, DEVICE, decimation=4, nconmax=1)  # far too small for four feet on the ground
    sim.step()
    assert sim.overflowed().all()
    sim.reset(torch.tensor([0, 1, 2], device=DEVICE), sim.default_qpos.expand(3, -1))
    assert not sim.overflowed().any(), "a reset clears the overflow flags"


# ---------------------------------------------------------------------------------------------------------------
# Quaternion helpers against MuJoCo's mju_* functions on random inputs
# ---------------------------------------------------------------------------------------------------------------
def _random_quats(n, seed=0):
    q = np.random.default_rng(seed).normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_quaternion_helpers_match_mujoco():
    n = 200
    q = _random_quats(n)
    v = np.random.default_rng(1).normal(size=(n, 3))
    qt, vt = torch.tensor(q), torch.tensor(v)
    rot, rot_inv, mul, mat = np.zeros((n, 3)), np.zeros((n, 3)), np.zeros((n, 4)), np.zeros(9)
    q2 = _random_quats(n, seed=2)
    for i in range(n):
        mujoco.mju_rotVecQuat(rot[i], v[i], q[i])
        neg = np.zeros(4)
        mujoco.mju_negQuat(neg, q[i])
        mujoco.mju_rotVecQuat(rot_inv[i], v[i], neg)
        mujoco.mju_mulQuat(mul[i], q[i], q2[i])
    np.testing.assert_allclose(ec.quat_rotate(qt, vt).numpy(), rot, atol=1e-12)
    np.testing.assert_allclose(ec.quat_rotate_inverse(qt, vt).numpy(), rot_inv, atol=1e-12)
    np.testing.assert_allclose(ec.quat_mul(qt, torch.tensor(q2)).numpy(), mul, atol=1e-12)
    np.testing.assert_allclose(ec.quat_rotate(ec.quat_conjugate(qt), ec.quat_rotate(qt, vt)).numpy(), v, atol=1e-12)
    # Projected gravity: the world's down axis expressed in the body frame, i.e. -(third row of R).
    grav = ec.projected_gravity(qt).numpy()
    rpy = ec.quat_to_rpy(qt).numpy()
    for i in range(n):
        mujoco.mju_quat2Mat(mat, q[i])
        r = mat.reshape(3, 3)
        np.testing.assert_allclose(grav[i], -r[2], atol=1e-12)
        # ZYX Euler angles rebuild the same rotation matrix.
        roll, pitch, yaw = rpy[i]
        rebuilt = np.zeros(4)
        parts = [np.zeros(4) for _ in range(3)]
        mujoco.mju_axisAngle2Quat(parts[0], [0, 0, 1], yaw)
        mujoco.mju_axisAngle2Quat(parts[1], [0, 1, 0], pitch)
        mujoco.mju_axisAngle2Quat(parts[2], [1, 0, 0], roll)
        tmp = np.zeros(4)
        mujoco.mju_mulQuat(tmp, parts[0], parts[1])
        mujoco.mju_mulQuat(rebuilt, tmp, parts[2])
        assert min(np.abs(rebuilt - q[i]).max(), np.abs(rebuilt + q[i]).max()) < 1e-9
        np.testing.assert_allclose(ec.yaw_from_quat(qt[i]).item(), np.arctan2(r[1, 0], r[0, 0]), atol=1e-9)
    yaw = torch.linspace(-3, 3, 7, dtype=torch.float64)
    for y, qy in zip(yaw.tolist(), ec.quat_from_yaw(yaw).numpy()):
        ref = np.zeros(4)
        mujoco.mju_axisAngle2Quat(ref, [0, 0, 1], y)
        np.testing.assert_allclose(qy, ref, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Rendering, seeding
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(ON_GPU, reason="the renderer is tested on the CPU (OSMesa) in CI")
def test_renderer_draws_the_robot(model, rendering_problem):
    if rendering_problem:
        pytest.skip(rendering_problem)
    name, mjm = model
    sim = ec.BatchedSim(mjm, 2, "cpu")
    camera = {"go1": "track", "panda": "front"}[name]
    renderer = ec.Renderer(sim, width=160, height=120, camera=camera)
    try:
        img = renderer.render(env_id=1)
    finally:
        renderer.close()
    assert img.shape == (120, 160, 3) and img.dtype == np.uint8
    assert img.std() > 10, "blank image"


@pytest.mark.skipif(ON_GPU, reason="the renderer is tested on the CPU (OSMesa) in CI")
def test_no_rendering_backend_is_a_clear_error():
    # A machine with no usable EGL driver: point libglvnd at no vendor at all, so EGL fails for real.
    code = (
        "import envs_common as ec\n"
        "sim = ec.BatchedSim(ec.load_model('panda.xml'), 1, 'cpu')\n"
        "try:\n    ec.Renderer(sim)\nexcept ec.UserError as e:\n    print('USERERROR', e)\n"
    )
    env = {**os.environ, "MUJOCO_GL": "egl", "__EGL_VENDOR_LIBRARY_FILENAMES": "/nonexistent.json"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert "USERERROR" in out.stdout, out.stdout + out.stderr
    assert "MUJOCO_GL=egl" in out.stdout and "MUJOCO_GL=osmesa" in out.stdout and "libosmesa6" in out.stdout


def test_seed_everything_repeats_all_generators():
    def draw():
        ec.seed_everything(123)
        return __import__("random").random(), np.random.rand(), torch.rand(1).item()

    assert draw() == draw()


# ---------------------------------------------------------------------------------------------------------------
# Bad input: clear errors that name the fix
# ---------------------------------------------------------------------------------------------------------------
def test_missing_asset_is_a_clear_error():
    with pytest.raises(ec.UserError, match="asset file not found"):
        ec.load_model("no_such_robot.xml")


@pytest.mark.parametrize("n", [0, -3])
def test_nonpositive_env_count_is_a_clear_error(n):
    with pytest.raises(ec.UserError, match="at least 1"):
        ec.BatchedSim(ec.load_model(ASSETS["panda"]), n, "cpu")


def test_cuda_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ec.UserError, match="--device cpu"):
        ec.resolve_device("cuda")
    assert ec.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ec.UserError, match="unknown device"):
        ec.resolve_device("gpu0")
