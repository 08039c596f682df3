"""MuJoCo picks its OpenGL backend when first imported, so envs_common imports it here, before any test module
imports mujoco: it keeps MUJOCO_GL when that backend can load, picks one whose library is installed when MUJOCO_GL is
unset (OSMesa on a CPU machine, EGL on a GPU one), and otherwise imports MuJoCo without rendering. The tests that
draw images ask `rendering_problem` whether this machine can render, and skip with its reason when it cannot."""

import pytest

import envs_common

envs_common.import_mujoco()  # envs_common imports MuJoCo lazily: choose the backend now, before the test modules


@pytest.fixture(scope="session")
def rendering_problem() -> str | None:
    """Why envs_common.Renderer cannot work on this machine (its error message), or None when it can."""
    try:
        envs_common.Renderer.check_available()
    except envs_common.UserError as e:
        return str(e)
    return None
