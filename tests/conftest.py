"""MuJoCo picks its headless OpenGL backend when first imported: envs_common chooses one whose library is present
(OSMesa on a CPU machine, EGL on a GPU one) before any test module imports mujoco."""
import envs_common  # noqa: F401
