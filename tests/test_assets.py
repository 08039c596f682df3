"""The assets against the sources they cite, value by value: assets/go1.xml's masses, centres of mass, inertias, body
positions, joint axes, ranges and torque limits against Unitree's Go1 URDF, its joint friction, damping, armature and
servo gains against MuJoCo Menagerie's and MuJoCo Playground's Go1. Checked on the compiled model (MuJoCo's C
compiler), not on the XML text."""

import mujoco
import numpy as np
import pytest

import envs_common as ec

# ---------------------------------------------------------------------------------------------------------------
# Unitree's Go1 description: github.com/unitreerobotics/unitree_ros, robots/go1_description/urdf/go1.urdf at commit
# 4590b76 (2024-05-27; its inertial values are those of commit ca57a18, "reconfirm Go1 inertial params").
# Every link that has an <inertial>, transcribed as:
#   link: (MuJoCo body it is rigidly fixed to, origin of the link frame in that body's frame (m, the fixed joints'
#          <origin xyz>), mass (kg), centre of mass in the link frame (m), inertia about the centre of mass in the link
#          frame (kg m^2): ixx, iyy, izz, ixy, ixz, iyz)
# Every fixed joint below has rpy 0 except the eight sensor links' (cameras, ultrasound), whose inertia is isotropic
# (1e-6 kg m^2 on the diagonal), so their rotation does not matter. The foot links are fixed to their calves in the
# URDF; go1.xml keeps each foot as a body of its own welded to the calf (no joint: MuJoCo moves it with the calf),
# because the locomotion task reads the feet's contact forces apart from the calves'.
# ---------------------------------------------------------------------------------------------------------------
ZERO = (0.0, 0.0, 0.0)
SENSOR_INERTIA = (1e-6, 1e-6, 1e-6, 0.0, 0.0, 0.0)
HIP_ROTOR_INERTIA = (0.000111842, 5.9647e-05, 5.9647e-05, 0.0, 0.0, 0.0)
LEG_ROTOR_INERTIA = (5.9647e-05, 0.000111842, 5.9647e-05, 0.0, 0.0, 0.0)
CALF_INERTIA = (0.001088793059, 0.001100428748, 2.4787446e-05, -2.55679e-07, 7.117814e-06, 2.077264e-06)
FOOT_INERTIA = (9.6e-06, 9.6e-06, 9.6e-06, 0.0, 0.0, 0.0)
URDF_LINKS = {
    "trunk": (
        "trunk",
        ZERO,
        5.204,
        (0.0223, 0.002, -0.0005),
        (0.0168128557, 0.063009565, 0.0716547275, -0.0002296769, -0.0002945293, -4.18731e-05),
    ),
    "imu_link": ("trunk", (-0.01592, -0.06659, -0.00617), 0.001, ZERO, (0.0001, 0.0001, 0.0001, 0.0, 0.0, 0.0)),
    "camera_face": ("trunk", (0.2785, 0.0125, 0.0167), 1e-5, ZERO, SENSOR_INERTIA),
    "camera_chin": ("trunk", (0.2522, 0.0125, -0.0436), 1e-5, ZERO, SENSOR_INERTIA),
    "camera_left": ("trunk", (-0.066, 0.082, -0.0176), 1e-5, ZERO, SENSOR_INERTIA),
    "camera_right": ("trunk", (-0.041, -0.082, -0.0176), 1e-5, ZERO, SENSOR_INERTIA),
    "camera_rearDown": ("trunk", (-0.0825, 0.0125, -0.04365), 1e-5, ZERO, SENSOR_INERTIA),
    "ultraSound_left": ("trunk", (-0.0535, 0.0826, 0.00868), 1e-5, ZERO, SENSOR_INERTIA),
    "ultraSound_right": ("trunk", (-0.0535, -0.0826, 0.00868), 1e-5, ZERO, SENSOR_INERTIA),
    "ultraSound_face": ("trunk", (0.2747, 0.0, -0.0088), 1e-5, ZERO, SENSOR_INERTIA),
    "FR_hip_rotor": ("trunk", (0.11215, -0.04675, 0.0), 0.089, ZERO, HIP_ROTOR_INERTIA),
    "FL_hip_rotor": ("trunk", (0.11215, 0.04675, 0.0), 0.089, ZERO, HIP_ROTOR_INERTIA),
    "RR_hip_rotor": ("trunk", (-0.11215, -0.04675, 0.0), 0.089, ZERO, HIP_ROTOR_INERTIA),
    "RL_hip_rotor": ("trunk", (-0.11215, 0.04675, 0.0), 0.089, ZERO, HIP_ROTOR_INERTIA),
    "FR_hip": (
        "FR_hip",
        ZERO,
        0.591,
        (-0.005657, 0.008752, -0.000102),
        (0.000334008405, 0.000619101213, 0.00040057614, 1.0826066e-05, 1.290732e-06, -1.643194e-06),
    ),
    "FL_hip": (
        "FL_hip",
        ZERO,
        0.591,
        (-0.005657, -0.008752, -0.000102),
        (0.000334008405, 0.000619101213, 0.00040057614, -1.0826066e-05, 1.290732e-06, 1.643194e-06),
    ),
    "RR_hip": (
        "RR_hip",
        ZERO,
        0.591,
        (0.005657, 0.008752, -0.000102),
        (0.000334008405, 0.000619101213, 0.00040057614, -1.0826066e-05, -1.290732e-06, -1.643194e-06),
    ),
    "RL_hip": (
        "RL_hip",
        ZERO,
        0.591,
        (0.005657, -0.008752, -0.000102),
        (0.000334008405, 0.000619101213, 0.00040057614, 1.0826066e-05, -1.290732e-06, 1.643194e-06),
    ),
    "FR_thigh_rotor": ("FR_hip", (0.0, 0.00015, 0.0), 0.089, ZERO, LEG_ROTOR_INERTIA),
    "FL_thigh_rotor": ("FL_hip", (0.0, -0.00015, 0.0), 0.089, ZERO, LEG_ROTOR_INERTIA),
    "RR_thigh_rotor": ("RR_hip", (0.0, 0.00015, 0.0), 0.089, ZERO, LEG_ROTOR_INERTIA),
    "RL_thigh_rotor": ("RL_hip", (0.0, -0.00015, 0.0), 0.089, ZERO, LEG_ROTOR_INERTIA),
    "FR_thigh": (
        "FR_thigh",
        ZERO,
        0.92,
        (-0.003342, 0.018054, -0.033451),
        (0.004431760472, 0.004485671726, 0.000740309489, -5.7496807e-05, -0.000218457134, -0.000572001265),
    ),
    "FL_thigh": (
        "FL_thigh",
        ZERO,
        0.92,
        (-0.003342, -0.018054, -0.033451),
        (0.004431760472, 0.004485671726, 0.000740309489, 5.7496807e-05, -0.000218457134, 0.000572001265),
    ),
    "RR_thigh": (
        "RR_thigh",
        ZERO,
        0.92,
        (-0.003342, 0.018054, -0.033451),
        (0.004431760472, 0.004485671726, 0.000740309489, -5.7496807e-05, -0.000218457134, -0.000572001265),
    ),
    "RL_thigh": (
        "RL_thigh",
        ZERO,
        0.92,
        (-0.003342, -0.018054, -0.033451),
        (0.004431760472, 0.004485671726, 0.000740309489, 5.7496807e-05, -0.000218457134, 0.000572001265),
    ),
    "FR_calf_rotor": ("FR_thigh", (0.0, 0.03235, 0.0), 0.089, ZERO, LEG_ROTOR_INERTIA),
    "FL_calf_rotor": ("FL_thigh", (0.0, -0.03235, 0.0), 0.089, ZERO, LEG_ROTOR_INERTIA),
    "RR_calf_rotor": ("RR_thigh", (0.0, 0.03235, 0.0), 0.089, ZERO, LEG_ROTOR_INERTIA),
    "RL_calf_rotor": ("RL_thigh", (0.0, -0.03235, 0.0), 0.089, ZERO, LEG_ROTOR_INERTIA),
    # The URDF gives all four calves the same centre of mass and inertia (no mirroring in y).
    **{
        f"{leg}_calf": (f"{leg}_calf", ZERO, 0.135862, (0.006197, 0.001408, -0.116695), CALF_INERTIA)
        for leg in ("FR", "FL", "RR", "RL")
    },
    **{f"{leg}_foot": (f"{leg}_foot", ZERO, 0.06, ZERO, FOOT_INERTIA) for leg in ("FR", "FL", "RR", "RL")},
}
# Revolute joints: child link origin in its parent's frame (m), axis, limits (rad) and effort (N m) from the same URDF;
# the feet are fixed 0.213 m below their calves.
URDF_BODY_POS = {
    "FR_hip": (0.1881, -0.04675, 0.0),
    "FL_hip": (0.1881, 0.04675, 0.0),
    "RR_hip": (-0.1881, -0.04675, 0.0),
    "RL_hip": (-0.1881, 0.04675, 0.0),
    **{f"{leg}_thigh": (0.0, -0.08 if leg[1] == "R" else 0.08, 0.0) for leg in ("FR", "FL", "RR", "RL")},
    **{f"{leg}_{part}": (0.0, 0.0, -0.213) for leg in ("FR", "FL", "RR", "RL") for part in ("calf", "foot")},
}
URDF_JOINTS = {  # joint kind: (axis, lower, upper, effort)
    "hip": ((1, 0, 0), -0.863, 0.863, 23.7),
    "thigh": ((0, 1, 0), -0.686, 4.501, 23.7),
    "calf": ((0, 1, 0), -2.818, -0.888, 35.55),
}
# Joint dynamics the URDF leaves out (its <dynamics> are zero): MuJoCo Menagerie's Go1
# (github.com/google-deepmind/mujoco_menagerie, unitree_go1/go1.xml, commit 28ffb48: armature 0.01 kg m^2,
# frictionloss 0.2 N m), as MuJoCo Playground's Go1 joystick task uses them
# (github.com/google-deepmind/mujoco_playground, commit 4c7f5a2: locomotion/go1/base.py sets the joints' damping to
# zero, as the PD servo's Kd supplies it; joystick.py: Kp 35 N m/rad, Kd 0.5 N m s/rad).
JOINT_DYNAMICS = {"armature": 0.01, "frictionloss": 0.2, "damping": 0.0}
SERVO = {"kp": 35.0, "kv": 0.5}


def lumped_inertials(links=URDF_LINKS):
    """{body: (mass, centre of mass, 3x3 inertia about it)} of every MuJoCo body, each the rigid union of the URDF
    links fixed to it (parallel axis theorem). Units: kg, m, kg m^2 in the body frame."""
    bodies = {}
    for body, origin, mass, com, inertia in links.values():
        bodies.setdefault(body, []).append((mass, np.add(origin, com), inertia))
    out = {}
    for body, parts in bodies.items():
        total = sum(m for m, _, _ in parts)
        com = sum(m * c for m, c, _ in parts) / total
        inertia = np.zeros((3, 3))
        for m, c, (ixx, iyy, izz, ixy, ixz, iyz) in parts:
            d = c - com
            inertia += np.array([[ixx, ixy, ixz], [ixy, iyy, iyz], [ixz, iyz, izz]])
            inertia += m * (d @ d * np.eye(3) - np.outer(d, d))
        out[body] = (total, com, inertia)
    return out


@pytest.fixture(scope="module")
def go1():
    return ec.load_model("go1.xml")


def _body_inertia(mjm, b):
    """Full 3x3 inertia of body b about its centre of mass, in the body frame, from the compiled principal axes."""
    rot = np.zeros(9)
    mujoco.mju_quat2Mat(rot, mjm.body_iquat[b])
    rot = rot.reshape(3, 3)
    return rot @ np.diag(mjm.body_inertia[b]) @ rot.T


def test_go1_masses_centres_of_mass_and_inertias_are_the_urdfs(go1):
    expected = lumped_inertials()
    assert len(expected) == go1.nbody - 1, "a body of go1.xml that no URDF link accounts for, or the reverse"
    for body, (mass, com, inertia) in expected.items():
        b = mujoco.mj_name2id(go1, mujoco.mjtObj.mjOBJ_BODY, body)
        assert b > 0, body
        assert go1.body_mass[b] == pytest.approx(mass, rel=1e-9), body
        np.testing.assert_allclose(go1.body_ipos[b], com, atol=1e-9, err_msg=body)
        np.testing.assert_allclose(_body_inertia(go1, b), inertia, atol=1e-11, err_msg=body)
    # The whole robot weighs what the URDF's links weigh, each counted once (the foot is not also in the calf).
    urdf_total = sum(link[2] for link in URDF_LINKS.values())
    assert go1.body_subtreemass[1] == pytest.approx(urdf_total, rel=1e-12)
    for leg in ("FR", "FL", "RR", "RL"):
        calf = mujoco.mj_name2id(go1, mujoco.mjtObj.mjOBJ_BODY, f"{leg}_calf")
        assert go1.body_subtreemass[calf] == pytest.approx(0.135862 + 0.06, rel=1e-12)  # calf + foot: 0.196 kg


def test_go1_kinematics_ranges_and_torque_limits_are_the_urdfs(go1):
    for body, pos in URDF_BODY_POS.items():
        b = mujoco.mj_name2id(go1, mujoco.mjtObj.mjOBJ_BODY, body)
        np.testing.assert_allclose(go1.body_pos[b], pos, atol=1e-12, err_msg=body)
        np.testing.assert_allclose(go1.body_quat[b], (1, 0, 0, 0), atol=1e-12, err_msg=body)
    assert go1.njnt == 13 and go1.nu == 12
    for j in range(1, go1.njnt):
        name = mujoco.mj_id2name(go1, mujoco.mjtObj.mjOBJ_JOINT, j)
        axis, lower, upper, effort = URDF_JOINTS[name.split("_")[1]]
        np.testing.assert_allclose(go1.jnt_axis[j], axis, atol=1e-12, err_msg=name)
        assert go1.jnt_limited[j] and tuple(go1.jnt_range[j]) == pytest.approx((lower, upper), abs=1e-12), name
        a = int(np.flatnonzero(go1.actuator_trnid[:, 0] == j)[0])
        assert tuple(go1.actuator_forcerange[a]) == pytest.approx((-effort, effort), abs=1e-12), name
        assert tuple(go1.actuator_ctrlrange[a]) == pytest.approx((lower, upper), abs=1e-12), name


def test_go1_joint_friction_damping_armature_and_servo_are_menagerie_and_playgrounds(go1):
    dofs = slice(6, go1.nv)  # the 12 hinges, after the free joint's 6 velocities
    np.testing.assert_array_equal(go1.dof_armature[dofs], JOINT_DYNAMICS["armature"])
    np.testing.assert_array_equal(go1.dof_frictionloss[dofs], JOINT_DYNAMICS["frictionloss"])
    np.testing.assert_array_equal(go1.dof_damping[dofs], JOINT_DYNAMICS["damping"])
    assert (go1.dof_damping[:6] == 0).all() and (go1.dof_frictionloss[:6] == 0).all(), "the free joint is free"
    np.testing.assert_array_equal(go1.actuator_gainprm[:, 0], SERVO["kp"])
    np.testing.assert_array_equal(go1.actuator_biasprm[:, 1], -SERVO["kp"])
    np.testing.assert_array_equal(go1.actuator_biasprm[:, 2], -SERVO["kv"])
