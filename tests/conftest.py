"""Pick MuJoCo's headless OpenGL backend before any test module imports mujoco (it is chosen at import)."""
import os

os.environ.setdefault("MUJOCO_GL", "osmesa")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
