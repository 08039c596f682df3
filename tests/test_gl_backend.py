"""MUJOCO_GL, whatever it says, never stops training: the choice of MuJoCo's OpenGL backend as a pure function on
faked machines, then real processes on this machine with a backend that cannot load here."""

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import envs_common as ec

ROOT = Path(__file__).resolve().parents[1]


def finder(*present):
    """A stand-in for ctypes.util.find_library on a machine that has only the libraries named."""
    return lambda name: f"lib{name}.so.1" if name in present else None


# ---------------------------------------------------------------------------------------------------------------
# The choice, on faked machines
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("gpu", "present", "expected"),
    [
        (False, ("EGL", "OSMesa"), "osmesa"),  # a CPU machine renders in software
        (True, ("EGL", "OSMesa"), "egl"),  # a GPU machine renders on the GPU
        (False, ("EGL",), "egl"),
        (True, ("OSMesa",), "osmesa"),
    ],
)
def test_unset_picks_a_backend_whose_library_is_there(gpu, present, expected):
    assert ec.choose_gl_backend(None, "Linux", gpu, finder(*present)) == (expected, None)
    assert ec.choose_gl_backend("", "Linux", gpu, finder(*present)) == (expected, None)


def test_unset_without_any_library_disables_rendering_and_says_what_to_install():
    backend, problem = ec.choose_gl_backend(None, "Linux", False, finder())
    assert backend == "disable"
    for word in ("libEGL", "libOSMesa", "libegl1", "libosmesa6"):
        assert word in problem


@pytest.mark.parametrize(
    ("requested", "library", "package"),
    [("osmesa", "libOSMesa", "libosmesa6"), ("egl", "libEGL", "libegl1"), ("OSMesa", "libOSMesa", "libosmesa6")],
)
def test_a_requested_backend_without_its_library_is_named_in_the_reason(requested, library, package):
    assert ec.choose_gl_backend(requested, "Linux", False, finder("EGL", "OSMesa")) == (requested, None)
    backend, problem = ec.choose_gl_backend(requested, "Linux", False, finder())
    assert backend == "disable"
    assert f"MUJOCO_GL={requested}" in problem and library in problem and f"apt-get install {package}" in problem


@pytest.mark.parametrize("requested", ["bogus", "vulkan", "egl2"])
def test_an_unknown_backend_disables_rendering(requested):
    backend, problem = ec.choose_gl_backend(requested, "Linux", True, finder("EGL", "OSMesa"))
    assert backend == "disable" and f"MUJOCO_GL={requested}" in problem and "egl, osmesa or glfw" in problem


@pytest.mark.parametrize("requested", ["disable", "off", "0"])
def test_rendering_turned_off_stays_off(requested):
    assert ec.choose_gl_backend(requested, "Linux", False, finder("EGL", "OSMesa")) == (
        requested,
        f"MUJOCO_GL={requested} turns rendering off",
    )


@pytest.mark.parametrize(
    ("requested", "system"),
    [("glfw", "Linux"), ("glx", "Linux"), (None, "Darwin"), ("cgl", "Darwin"), ("glfw", "Darwin"), ("wgl", "Windows")],
)
def test_backends_with_no_library_to_check_are_left_to_mujoco(requested, system):
    assert ec.choose_gl_backend(requested, system, False, finder()) == (requested, None)


# ---------------------------------------------------------------------------------------------------------------
# Real processes with a backend that cannot load here
# ---------------------------------------------------------------------------------------------------------------
def broken_backend() -> tuple[str, str]:
    """A MUJOCO_GL value that breaks a bare `import mujoco` on this machine, and the word its error must say: a
    headless backend whose library this machine lacks (a real missing library), else a name MuJoCo rejects."""
    for backend, (library, package) in ec.GL_LIBRARIES.items():
        if ctypes.util.find_library(library) is None:
            return backend, package
    return "bogus", "not a backend"


def run(args, cwd, backend):
    env = {**os.environ, "MUJOCO_GL": backend, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    env.pop("PYOPENGL_PLATFORM", None)  # set in this process by MuJoCo's own backend; a user's shell has none
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_backend_really_breaks_a_bare_mujoco_import(tmp_path):
    """The premise of the tests below: without envs_common's choice, this MUJOCO_GL stops `import mujoco`."""
    backend, _ = broken_backend()
    out = run(["-c", "import mujoco"], tmp_path, backend)
    assert out.returncode != 0, f"MUJOCO_GL={backend} imports fine here"


def test_import_works_and_the_renderer_names_the_missing_piece(tmp_path):
    backend, word = broken_backend()
    code = (
        "import os, envs_common as ec\n"
        "print('MUJOCO_GL after import:', os.environ['MUJOCO_GL'])\n"
        "try:\n    ec.Renderer.check_available()\nexcept ec.UserError as e:\n    print('USERERROR', e)\n"
    )
    out = run(["-c", code], ROOT, backend)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"MUJOCO_GL after import: {backend}\n" in out.stdout  # child processes see the user's own setting
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("USERERROR")]
    assert f"MUJOCO_GL={backend}" in line and word in line and "--capture-video" in line


def test_training_runs_and_only_capture_video_fails(tmp_path):
    backend, word = broken_backend()
    tiny = [
        str(ROOT / "ppo_isaac_locomotion.py"),
        "--device",
        "cpu",
        "--num-envs",
        "4",
        "--num-steps",
        "4",
        "--num-minibatches",
        "2",
        "--num-iterations",
        "1",
        "--eval-interval",
        "0",
    ]
    out = run(tiny, tmp_path, backend)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "iter     1/1" in out.stdout and list((tmp_path / "runs").glob("*/checkpoints/latest.pt"))
    out = run([*tiny, "--capture-video"], tmp_path / "runs", backend)
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: no OpenGL rendering backend works here") and word in line, line
    assert not (tmp_path / "runs" / "runs").exists(), "a run folder was written before the error"


def test_a_library_found_but_failing_to_load_still_leaves_training_working(tmp_path):
    """The last guard: a library that the lookup finds but that fails to load (a broken install), faked by a lookup
    that claims the missing library is there. MuJoCo is then imported again without rendering."""
    backend, _ = broken_backend()
    if backend not in ec.GL_LIBRARIES:
        pytest.skip("every headless OpenGL library is installed here: none to fake")
    library = ec.GL_LIBRARIES[backend][0]
    code = (
        "import ctypes.util\n"
        "real = ctypes.util.find_library\n"
        f"ctypes.util.find_library = lambda name: 'lib{library}.so' if name == '{library}' else real(name)\n"
        "import envs_common as ec\n"
        "sim = ec.BatchedSim(ec.load_model('panda.xml'), 2, 'cpu')\n"
        "sim.step()\n"
        "try:\n    ec.Renderer.check_available()\nexcept ec.UserError as e:\n    print('USERERROR', e)\n"
    )
    out = run(["-c", code], ROOT, backend)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"USERERROR no OpenGL rendering backend works here: MUJOCO_GL={backend} fails to load" in out.stdout
