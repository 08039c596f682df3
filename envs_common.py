"""Shared helpers for the ppo_isaac_*.py scripts: MuJoCo Warp in the role of Isaac Gym, and the plumbing of a run.

What lives here is everything that is not the lesson: the batched simulation and its zero-copy torch views (its
sub-steps recorded once as a graph and replayed), resets of a subset of worlds in place, CUDA graphs, quaternion
math, rendering and video, seeding and devices; and the run's plumbing: argument domains and a checkpoint's
arguments, checkpoints, run folders and loggers (TensorBoard, W&B), signals, progress, export. Tasks, rewards,
policies and PPO live in the scripts, each readable on its own.

Conventions, stated once:
- Quaternions are MuJoCo's (w, x, y, z), scalar first. (Isaac Gym's are (x, y, z, w).)
- Every tensor is batched over worlds first: shape (num_envs, ...), one row per environment.
- A free joint's qpos is (x, y, z, qw, qx, qy, qz) in the world frame; its qvel is the linear velocity in the
  world frame followed by the angular velocity in the BODY frame (MuJoCo's convention, unlike Isaac Gym's
  world-frame angular velocity).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes.util
import dataclasses
import datetime
import functools
import hashlib
import importlib
import io
import json
import math
import os
import platform
import random
import secrets
import signal
import sys
import threading
import time
import weakref
from pathlib import Path


class _LazyModule:
    """A module imported on first use. torch, MuJoCo and Warp take seconds to import, and `--help` or a bad argument
    needs none of them: the scripts read their command line first. `before` runs just before the import (MuJoCo's
    OpenGL backend must be chosen before MuJoCo is imported), `after` just after."""

    def __init__(self, name: str, before=None, after=None):
        self._name, self._before, self._after, self._module = name, before, after, None

    def __getattr__(self, attr: str):
        if self._module is None:
            if self._before is not None:
                self._before()
            self._module = importlib.import_module(self._name)
            if self._after is not None:
                self._after(self._module)
        return getattr(self._module, attr)


np = _LazyModule("numpy")
torch = _LazyModule("torch")


# MuJoCo's headless OpenGL backends on Linux: the library each loads and the Debian/Ubuntu package that has it.
GL_LIBRARIES = {"egl": ("EGL", "libegl1"), "osmesa": ("OSMesa", "libosmesa6")}
_GL_OFF = ("disable", "disabled", "off", "false", "0")
# The other names MuJoCo accepts on each platform (on Linux all of them mean GLFW, which needs a display).
_GL_OTHERS = {
    "Linux": ("glfw", "glx", "enable", "enabled", "on", "true", "1"),
    "Darwin": ("glfw", "cgl"),
    "Windows": ("glfw", "wgl"),
}


def choose_gl_backend(
    requested: str | None, system: str, gpu: bool, find_library=ctypes.util.find_library
) -> tuple[str | None, str | None]:
    """The MUJOCO_GL value to import MuJoCo with (None: leave it unset), and why rendering cannot work (None: it may).

    `requested` is the user's MUJOCO_GL (None or "": unset), `system` is platform.system(), `gpu` whether torch sees
    a GPU, and `find_library` looks a library up by name as ctypes.util.find_library does (tests pass a fake one).
    MuJoCo loads the backend's library when first imported, and a missing library or an unknown name breaks
    `import mujoco` itself; such a request becomes "disable", so that training, evaluation and export still run and
    only Renderer fails, with the returned reason. Unset on Linux: EGL on a GPU machine, OSMesa on a CPU one,
    whichever library is present."""
    name = (requested or "").strip().lower()
    if not name:
        if system != "Linux":
            return requested, None  # macOS and Windows have their own backend (CGL, WGL)
        for backend in ("egl", "osmesa") if gpu else ("osmesa", "egl"):
            if find_library(GL_LIBRARIES[backend][0]):
                return backend, None
        return "disable", (
            "MUJOCO_GL is not set and neither libEGL nor libOSMesa is installed (Debian/Ubuntu: "
            "apt-get install libegl1 on a GPU machine, libosmesa6 on a CPU one)"
        )
    if name in _GL_OFF:
        return requested, f"MUJOCO_GL={requested} turns rendering off"
    if system == "Linux" and name in GL_LIBRARIES:
        library, package = GL_LIBRARIES[name]
        if find_library(library):
            return requested, None
        return "disable", (
            f"MUJOCO_GL={requested} needs lib{library}, which is not installed "
            f"(Debian/Ubuntu: apt-get install {package})"
        )
    if name in _GL_OTHERS.get(system, ()):
        return requested, None  # GLFW comes inside its Python package; a missing display shows in Renderer
    return "disable", f"MUJOCO_GL={requested} is not a backend MuJoCo knows (on Linux: egl, osmesa or glfw)"


def _pick_gl_backend() -> str | None:
    """Set MUJOCO_GL for MuJoCo's import (see choose_gl_backend); return why rendering cannot work, or None."""
    backend, problem = choose_gl_backend(GL_REQUESTED, platform.system(), torch.cuda.is_available())
    if backend is not None:
        os.environ["MUJOCO_GL"] = backend
    return problem


GL_REQUESTED = os.environ.get("MUJOCO_GL")  # the user's choice, which Renderer's errors name
_GL_PROBLEM = None


def _import_mujoco_with_a_working_backend() -> None:
    """Choose MUJOCO_GL (see choose_gl_backend), then import MuJoCo; if its library is there but fails to load,
    import it without rendering. Renderer's error says why rendering cannot work."""
    global _GL_PROBLEM
    _GL_PROBLEM = _pick_gl_backend()
    try:
        importlib.import_module("mujoco")
    except Exception as e:  # noqa: BLE001 - a library that is there but fails to load: import without rendering
        _GL_PROBLEM = f"MUJOCO_GL={os.environ.get('MUJOCO_GL')} fails to load ({type(e).__name__}: {str(e)[:200]!r})"
        os.environ["MUJOCO_GL"] = "disable"
        importlib.import_module("mujoco")  # Python dropped the modules that failed; the rest are reused
    if _GL_PROBLEM is not None:  # put the user's setting back for child processes, which decide for themselves
        if GL_REQUESTED is None:
            os.environ.pop("MUJOCO_GL", None)
        else:
            os.environ["MUJOCO_GL"] = GL_REQUESTED


def _quiet_warp(module) -> None:
    module.config.log_level = module.LOG_WARNING  # keep Warp's per-kernel "Module ... load" lines out of the log


mujoco = _LazyModule("mujoco", before=_import_mujoco_with_a_working_backend)
mjw = _LazyModule("mujoco_warp", before=lambda: mujoco.MjModel)  # MuJoCo Warp imports MuJoCo: its backend first
wp = _LazyModule("warp", after=_quiet_warp)


def import_mujoco():
    """MuJoCo, imported now with a working OpenGL backend (or none): for code that imports mujoco itself."""
    mujoco.MjModel  # noqa: B018 - the attribute access imports it
    return mujoco._module


ASSETS = Path(__file__).resolve().parent / "assets"


class UserError(Exception):
    """Bad input from the user. The scripts print its message as one line and exit with code 2 (in a run of several
    processes, rank 0 prints it: every process meets the same bad input)."""


class RankError(UserError):
    """Bad input that only some processes of a run meet (their device): each of them prints it, naming its rank."""


# ----------------------------------------------------------------------------------------------------------------
# Devices, seeds, models
# ----------------------------------------------------------------------------------------------------------------
def resolve_device(name: str | None) -> torch.device:
    """'auto' or None: the first GPU when there is one, else the CPU. 'cuda', 'cuda:N' or 'cpu' otherwise."""
    if name in (None, "", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {name} was asked for, but torch sees no CUDA GPU on this machine: "
                "use --device cpu (or install a CUDA build of torch)"
            )
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise UserError(f"unsupported device {name!r}: use 'cpu' or 'cuda:N'")
    return device


def seed_everything(seed: int, torch_deterministic: bool = True) -> None:
    """One seed for Python's random, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def rng_state() -> dict:
    """The state of every generator seed_everything seeds, for a checkpoint that resumes exactly."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


@contextlib.contextmanager
def separate_rng(seed: int, device: torch.device):
    """Run a block (an evaluation, a video) on torch's generators seeded with `seed`, then put them back as they were:
    the block draws the same random numbers every time, and training's random stream goes on untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load_model(path: str | os.PathLike) -> mujoco.MjModel:
    """Compile an MJCF file with MuJoCo's C compiler. A bare name is looked up in assets/."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = ASSETS / path
    if not path.is_file():
        raise UserError(
            f"asset file not found: {path} (the models ship in {ASSETS}; run from a full checkout of the repository)"
        )
    try:
        return mujoco.MjModel.from_xml_path(str(path))
    except ValueError as e:  # MuJoCo's compiler error: say which file, keep its message
        raise UserError(f"could not load MJCF {path}: {e}") from None


def check_memory(device: torch.device, num_envs: int, bytes_per_env: int) -> None:
    """Refuse a number of environments that cannot fit in the device's free memory, before anything is allocated,
    naming the largest power of two that fits. bytes_per_env is each script's measured estimate (simulation, rollout
    and update together)."""
    if device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0], f"GPU memory on {device}"
    else:
        with open("/proc/meminfo") as f:
            available = {line.split(":")[0]: line.split()[1] for line in f}.get("MemAvailable")
        if available is None:  # not Linux: let the allocation itself tell
            return
        free, where = int(available) * 1024, "memory"
    if num_envs * bytes_per_env > free:
        largest = 2 ** max(0, int(np.log2(max(free / bytes_per_env, 1))))
        raise UserError(
            f"--num-envs {num_envs} needs about {num_envs * bytes_per_env / 2**30:.1f} GiB but only "
            f"{free / 2**30:.1f} GiB of {where} is free: use --num-envs {largest} or fewer"
        )


def out_of_memory(error: BaseException) -> bool:
    """Whether an exception from torch or Warp means that the device ran out of memory."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError)
        and any(s in str(error).lower() for s in ("out of memory", "failed to allocate"))
    )


# ----------------------------------------------------------------------------------------------------------------
# Terrain (legged_gym: terrain.py; Isaac Gym: add_triangle_mesh / add_heightfield)
# ----------------------------------------------------------------------------------------------------------------
# A terrain is a grid of square tiles: rows are difficulty levels (along x, level 0 the easiest), columns are terrain
# types (along y), as in legged_gym's curriculum terrain (legged_gym/utils/terrain.py) and Isaac Lab's
# TerrainGenerator. In Isaac Gym every environment stands on one shared triangle mesh. MuJoCo Warp's worlds share a
# model, but each world has its own poses of static geoms (Data.geom_xpos/geom_xmat, set once and never recomputed)
# and may have its own geom sizes (per-world Model fields): so each world holds only its own tile, as K static box
# geoms (the model's "terrain_<k>" slots), placed when its robot moves to another tile. Boxes collide exactly
# (MuJoCo's primitive sphere/capsule/box-box collisions; README: Rough terrain measures them against a heightfield),
# and K boxes per world keep the broadphase small whatever the number of tiles.
#
# A tile is a union of boxes (`Boxes`) in the tile's frame: centre (0, 0), the ground around it at height 0. Every
# box reaches down to TERRAIN_BOTTOM, so a union of them has no holes underneath; what a union of boxes can make is
# the pointwise maximum of their tops, hence the shapes below: stairs, pits with sloped sides, blocks.
TERRAIN_BOTTOM = -3.0  # m: the boxes' bottoms, below the deepest pit
TERRAIN_GROUP = 3  # the terrain boxes' geom group: the height scan's rays see this group only
_PARKED_Z = -50.0  # m: an unused slot's box waits here, far below everything


@dataclasses.dataclass(frozen=True)
class Boxes:
    """Static boxes: centres `pos` (k, 3) m, half sizes `half` (k, 3) m, orientations `rot` (k, 3, 3) (columns: the
    box's axes in the parent frame; MuJoCo's geom_xmat). float64 numpy arrays."""

    pos: np.ndarray
    half: np.ndarray
    rot: np.ndarray

    def __len__(self) -> int:
        return len(self.pos)

    @staticmethod
    def join(*parts: Boxes) -> Boxes:
        """The boxes of all `parts`, in order."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return Boxes(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3, 3)))
        return Boxes(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("pos", "half", "rot")))

    def turned(self, yaw: float) -> Boxes:
        """The boxes turned by `yaw` rad about the vertical axis through (0, 0)."""
        c, s = math.cos(yaw), math.sin(yaw)
        rz = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        return Boxes(self.pos @ rz.T, self.half.copy(), rz @ self.rot)


def slab(x0: float, x1: float, y0: float, y1: float, top: float, bottom: float = TERRAIN_BOTTOM) -> Boxes:
    """One axis-aligned box over [x0, x1] x [y0, y1] (m) from `bottom` up to `top` (m)."""
    if not (x1 > x0 and y1 > y0 and top > bottom):
        raise UserError(f"an empty box: x [{x0}, {x1}], y [{y0}, {y1}], z [{bottom}, {top}] m")
    pos = [[(x0 + x1) / 2, (y0 + y1) / 2, (top + bottom) / 2]]
    half = [[(x1 - x0) / 2, (y1 - y0) / 2, (top - bottom) / 2]]
    return Boxes(np.array(pos, dtype=float), np.array(half, dtype=float), np.eye(3)[None].copy())


def ground_frame(tile: float, ground: float) -> Boxes:
    """The ground around a tile of side `tile` m: four boxes with tops at height 0, `ground` m wide (a square ring
    from the tile's edge out to tile / 2 + ground)."""
    a, b = tile / 2, tile / 2 + ground
    return Boxes.join(
        slab(a, b, -b, b, 0.0), slab(-b, -a, -b, b, 0.0), slab(-a, a, a, b, 0.0), slab(-a, a, -b, -a, 0.0)
    )


def _check_tile(tile: float, platform: float) -> None:
    if not 0 <= platform <= tile:
        raise UserError(f"a tile of side {tile} m needs a platform of 0 to {tile} m, got {platform} m")


def stairs_boxes(tile: float, step_width: float, step_height: float, platform: float, ground: float) -> Boxes:
    """Stairs on four sides (legged_gym's pyramid_stairs_terrain): square rings `step_width` m wide, the outermost
    at height 0 and each one further in `step_height` m higher (lower when negative), up to the central square, at
    least `platform` m wide, which is the last step. step_height > 0: the centre is the top (a robot spawned there
    climbs down); < 0: a pit (it climbs up and out). The ground (height 0) reaches `ground` m beyond the tile.

    Returns R + 1 boxes (nested squares) for stairs up to a top, 4 R + 1 (the rings' sides and the platform) for a
    pit, R = the number of full rings around the platform. Raises UserError on step_width <= 0 or a platform outside
    [0, tile]."""
    _check_tile(tile, platform)
    if not step_width > 0:
        raise UserError(f"stairs need step_width > 0, got {step_width} m")
    rings = int(math.floor((tile - platform) / 2 / step_width + 1e-9))
    a, w, h = tile / 2, step_width, step_height
    if h >= 0:  # nested squares: the union of square k (k steps in, k * h high) is the staircase
        return Boxes.join(
            slab(-a - ground, a + ground, -a - ground, a + ground, 0.0),
            *(slab(-(a - k * w), a - k * w, -(a - k * w), a - k * w, max(k * h, 1e-6)) for k in range(1, rings + 1)),
        )
    parts = []
    for j in range(rings):  # ring j: from j to j + 1 steps in, j * h high (the outermost one is also the ground)
        outer, inner = (a + ground if j == 0 else a - j * w), a - (j + 1) * w
        top = j * h
        parts += [
            slab(-outer, outer, inner, outer, top),
            slab(-outer, outer, -outer, -inner, top),
            slab(inner, outer, -inner, inner, top),
            slab(-outer, -inner, -inner, inner, top),
        ]
    last = a - rings * w
    return Boxes.join(*parts, slab(-last, last, -last, last, rings * h))


def _face_rot(slope: float) -> np.ndarray:
    """The axes of a box whose top rises toward +x at `slope` (rise over run), turned about y."""
    c, s = 1 / math.sqrt(1 + slope * slope), slope / math.sqrt(1 + slope * slope)
    return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])  # columns: up the slope, y, the top's normal


def pit_boxes(tile: float, slope: float, platform: float, ground: float) -> Boxes:
    """A four-sided pit (legged_gym's pyramid_sloped_terrain with a negative slope): the ground at the tile's edge is
    at 0 and the surface sinks toward the centre at `slope` (rise over run, >= 0) down to a flat central square of
    side `platform` m, slope * (tile - platform) / 2 m deep. Each side is one box tilted about its edge; the four
    overlap, and their union is the pit, since its surface is the highest of the four planes. (A pyramid that rises
    to the centre is the lowest of four planes: a union of boxes cannot make it.)

    Returns 9 boxes: 4 ground, the platform, the 4 sides. Raises UserError on slope < 0 or a platform outside
    [0, tile]."""
    _check_tile(tile, platform)
    if slope < 0:
        raise UserError(f"a pit's slope must be >= 0, got {slope}")
    a, p = tile / 2, platform / 2
    depth = slope * (a - p)
    rot = _face_rot(slope)
    thickness = 0.5  # m, across the side's top
    length = (a - p) * math.sqrt(1 + slope * slope)  # along the side's top, from the platform's edge to the tile's
    centre = np.array([(a + p) / 2, 0.0, -depth / 2]) - thickness / 2 * rot[:, 2]
    side = Boxes(centre[None], np.array([[length / 2, a, thickness / 2]]), rot[None])
    return Boxes.join(
        ground_frame(tile, ground),
        slab(-p, p, -p, p, -depth if depth > 0 else 0.0),
        *(side.turned(k * math.pi / 2) for k in range(4)),
    )


def pit_bumps(
    tile: float, slope: float, platform: float, count: int, size: tuple[float, float], height: tuple[float, float], rng
) -> Boxes:
    """`count` flat blocks lying on the sides of pit_boxes(tile, slope, platform, ...): each on a side drawn at
    random, turned with it, `size` (lo, hi) m wide along each of its two axes, its top `height` (lo, hi) m above
    the side's surface, all of it over the side's own part of the tile (between the platform and the tile's edge).
    rng: np.random.Generator. Returns `count` boxes. Raises UserError on a negative count or an empty range."""
    if count < 0 or not (0 < size[0] <= size[1]) or not (0 < height[0] <= height[1]):
        raise UserError(f"bumps need count >= 0 and 0 < lo <= hi, got count={count}, size={size}, height={height} m")
    a, p = tile / 2, platform / 2
    rot = _face_rot(slope)
    parts = []
    for _ in range(int(count)):
        wx, wy = rng.uniform(*size, size=2) / 2
        rise = rng.uniform(*height)
        inward = rise * abs(rot[0, 2])  # the top, `rise` out along the side's tilted normal, leans this far inward
        x = rng.uniform(p + wx + inward, a - wx)  # the footprint stays between the platform and the edge
        room = x - wx - wy - inward  # and inside its side's triangle (|y| <= x), clear of the neighbouring sides
        y = rng.uniform(-room, room) if room > 0 else 0.0
        surface = np.array([x, y, slope * (x - a)])  # on the side (the pit's rim, x = a, is at 0)
        thickness = rise + 0.1  # the block reaches 0.1 m into the side
        centre = surface + (rise - thickness / 2) * rot[:, 2]
        parts.append(
            Boxes(centre[None], np.array([[wx, wy, thickness / 2]]), rot[None]).turned(
                int(rng.integers(4)) * math.pi / 2
            )
        )
    return Boxes.join(*parts)


def block_boxes(
    tile: float, heights, min_size: float, max_size: float, count: int, platform: float, ground: float, rng
) -> Boxes:
    """Flat ground (0) with `count` axis-aligned blocks (legged_gym's discrete_obstacles_terrain, its raised half):
    each side uniform in [min_size, max_size] m, placed uniformly inside the tile, each top drawn from `heights` (m,
    > 0), none over the central square of side `platform` m (redrawn until clear). rng: np.random.Generator.
    Returns 1 + count boxes (the ground first). Raises UserError on 0 < min_size <= max_size <= tile not holding,
    count < 0, a height <= 0 or a platform outside [0, tile]."""
    _check_tile(tile, platform)
    heights = np.asarray(heights, dtype=float)
    if not (0 < min_size <= max_size <= tile) or count < 0 or not len(heights) or (heights <= 0).any():
        raise UserError(
            "blocks need 0 < min_size <= max_size <= tile, count >= 0 and heights > 0, got "
            f"min_size={min_size}, max_size={max_size}, count={count}, heights={heights.tolist()}"
        )
    a, p = tile / 2, platform / 2
    parts = [slab(-a - ground, a + ground, -a - ground, a + ground, 0.0)]
    while len(parts) < count + 1:
        wx, wy = rng.uniform(min_size, max_size, size=2)
        x0, y0 = rng.uniform(-a, a - wx), rng.uniform(-a, a - wy)
        top = float(rng.choice(heights))
        if x0 < p and x0 + wx > -p and y0 < p and y0 + wy > -p:
            continue  # over the platform: draw again
        parts.append(slab(x0, x0 + wx, y0, y0 + wy, top))
    return Boxes.join(*parts)


def surface_height(boxes: Boxes, xy, top: float = 100.0) -> np.ndarray:
    """The height (m) of the union of `boxes`' upper surface under the points xy (..., 2): where a ray cast straight
    down from `top` first meets a box (an exact slab test in each box's frame), TERRAIN_BOTTOM - 1 where it meets
    none. float64 numpy; for spawning and for tests (the policy's scan casts MuJoCo's rays)."""
    xy = np.asarray(xy, dtype=float)
    origin = np.concatenate([xy, np.full(xy.shape[:-1] + (1,), top)], axis=-1)[..., None, :]  # (..., 1, 3)
    local_origin = np.einsum("kji,...kj->...ki", boxes.rot, origin - boxes.pos)  # (..., k, 3)
    local_dir = -boxes.rot[:, 2, :]  # (k, 3): the direction (0, 0, -1) in each box's frame
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-boxes.half - local_origin) / local_dir
        t2 = (boxes.half - local_origin) / local_dir
    inside = np.abs(local_origin) <= boxes.half  # a ray parallel to a slab: inside it or never
    parallel = np.abs(local_dir) < 1e-12
    near = np.where(parallel, np.where(inside, -np.inf, np.inf), np.minimum(t1, t2)).max(axis=-1)
    far = np.where(parallel, np.where(inside, np.inf, -np.inf), np.maximum(t1, t2)).min(axis=-1)
    hit = (near <= far) & (far >= 0)
    t = np.where(hit, np.maximum(near, 0.0), np.inf).min(axis=-1)
    return np.where(np.isfinite(t), top - t, TERRAIN_BOTTOM - 1.0)


def columns_by_proportion(proportions: dict[str, float], num_cols: int) -> tuple[str, ...]:
    """The terrain type of each of num_cols columns: each type with p > 0 gets round(p / sum(p) * num_cols) columns,
    at least one, the total fixed by largest remainders (Hamilton's method), in the dict's order (legged_gym's
    terrain_proportions, which it maps to columns through cumulative sums). Returns a tuple of num_cols names.
    Raises UserError on a negative proportion, proportions that sum to 0, or fewer columns than types with p > 0."""
    if any(p < 0 for p in proportions.values()):
        raise UserError(f"terrain proportions must be >= 0, got {proportions}")
    used = {name: float(p) for name, p in proportions.items() if p > 0}
    if not used:
        raise UserError(f"terrain proportions must not all be 0, got {proportions}")
    if num_cols < len(used):
        raise UserError(
            f"{len(used)} terrain types with proportion > 0 need at least {len(used)} columns, got {num_cols}"
        )
    total = sum(used.values())
    exact = {name: p / total * num_cols for name, p in used.items()}
    counts = {name: max(1, int(np.floor(x))) for name, x in exact.items()}
    while sum(counts.values()) < num_cols:  # the largest remainders first (the first in the dict on ties)
        counts[max(used, key=lambda n: exact[n] - counts[n])] += 1
    while sum(counts.values()) > num_cols:  # the "at least one" rule took columns: give back the most over-served
        counts[max((n for n in used if counts[n] > 1), key=lambda n: counts[n] - exact[n])] -= 1
    return tuple(name for name in used for _ in range(counts[name]))


@dataclasses.dataclass(frozen=True)
class TerrainTiles:
    """A terrain: num_levels rows (along x; row = difficulty level, 0 the easiest) by num_cols columns (along y; one
    terrain type each) of square tiles, each a union of boxes, padded to the same number of boxes (num_slots).

    pos (L, C, K, 3), half (L, C, K, 3), rot (L, C, K, 3, 3): the boxes of tile (level, col) in world coordinates
      (a `Boxes` each); the tile's centre is at world ((level + 0.5) * tile_size, (col + 0.5) * tile_size), where
      legged_gym places its tiles (its terrain starts at 0 as well). Unused boxes wait far below (z = -50 m).
    used (L, C): how many of the K boxes each tile uses (the first ones).
    tile_size: m, the tiles' side. ground: m of flat ground (height 0) around each tile, in its world.
    tile_origins (L, C, 3) float32: each tile's centre (x, y) and the surface height there, z (the spawn point;
      legged_gym's env_origins / terrain_origins).
    column_types: the terrain type name of each column.
    """

    pos: np.ndarray
    half: np.ndarray
    rot: np.ndarray
    used: np.ndarray
    tile_size: float
    ground: float
    tile_origins: np.ndarray
    column_types: tuple[str, ...]

    @property
    def num_levels(self) -> int:
        return int(self.pos.shape[0])

    @property
    def num_cols(self) -> int:
        return int(self.pos.shape[1])

    @property
    def num_slots(self) -> int:
        return int(self.pos.shape[2])

    def tile(self, level: int, col: int) -> Boxes:
        """The boxes that tile (level, col) uses, in world coordinates."""
        n = int(self.used[level, col])
        return Boxes(self.pos[level, col, :n], self.half[level, col, :n], self.rot[level, col, :n])


def generate_tiles(
    tile_fn, columns, num_levels: int, tile_size: float = 8.0, ground: float = 25.0, seed: int = 0
) -> TerrainTiles:
    """Lay out num_levels x len(columns) tiles (legged_gym: Terrain.curiculum).

    tile_fn(type_name, difficulty, tile_size, ground, rng) -> Boxes of one tile in its own frame (centre (0, 0), the
    ground around it at height 0, reaching `ground` m beyond its edge): type_name from `columns`, difficulty =
    level / (num_levels - 1) in [0, 1] (the top level's is 1.0; with one level, 0), rng =
    np.random.default_rng([seed, level, col]) (each tile drawn on its own: the same seed makes the same terrain).
    ground: m of flat ground around each tile (legged_gym's border_size is 25 m: room for a robot that walks away).

    Raises UserError on num_levels < 1, no columns, tile_size <= 0, ground < 0 or seed < 0; ValueError when tile_fn
    returns no boxes or non-finite ones.
    """
    columns = tuple(columns)
    if int(num_levels) < 1 or not columns:
        raise UserError(
            f"a terrain needs at least 1 level and 1 column, got {num_levels} levels, {len(columns)} columns"
        )
    if not tile_size > 0 or ground < 0 or seed < 0:
        raise UserError(
            f"the terrain needs tile_size > 0, ground >= 0 and seed >= 0, got {tile_size} m, {ground} m, {seed}"
        )
    levels, cols = int(num_levels), len(columns)
    tiles = {}
    for level in range(levels):
        difficulty = level / (levels - 1) if levels > 1 else 0.0
        for col, name in enumerate(columns):
            boxes = tile_fn(
                name, difficulty, float(tile_size), float(ground), np.random.default_rng([seed, level, col])
            )
            if not len(boxes) or not all(np.isfinite(getattr(boxes, f)).all() for f in ("pos", "half", "rot")):
                raise ValueError(f"tile_fn({name!r}, {difficulty}) returned no boxes or non-finite ones")
            tiles[level, col] = boxes
    k = max(len(b) for b in tiles.values())
    pos, half = np.zeros((levels, cols, k, 3)), np.full((levels, cols, k, 3), 0.01)
    rot = np.broadcast_to(np.eye(3), (levels, cols, k, 3, 3)).copy()
    used = np.zeros((levels, cols), dtype=np.int64)
    origins = np.zeros((levels, cols, 3), dtype=np.float32)
    for (level, col), boxes in tiles.items():
        centre = np.array([(level + 0.5) * tile_size, (col + 0.5) * tile_size, 0.0])
        n = used[level, col] = len(boxes)
        pos[level, col] = centre + [0.0, 0.0, _PARKED_Z]
        pos[level, col, :n], half[level, col, :n], rot[level, col, :n] = boxes.pos + centre, boxes.half, boxes.rot
        origins[level, col] = (centre[0], centre[1], surface_height(boxes, np.zeros(2)))
    return TerrainTiles(pos, half, rot, used, float(tile_size), float(ground), origins, columns)


def terrain_spec(mjm_path, num_slots: int, floor: str = "floor") -> mujoco.MjSpec:
    """The model's MjSpec with its plane geom `floor` replaced by `num_slots` static box geoms "terrain_0", ... (the
    terrain's slots, waiting far below until placed), in geom group TERRAIN_GROUP, each with every other attribute
    of the floor (friction, material, contype/conaffinity, condim, priority, solref, solimp). Isaac Gym:
    add_triangle_mesh.

    mjm_path: an MJCF path (a bare name is looked up in assets/, as in load_model). Raises UserError when the file
    is missing, the model has no plane geom named `floor`, or num_slots < 1.
    """
    path = Path(mjm_path)
    if not path.is_absolute() and not path.exists():
        path = ASSETS / path
    if not path.is_file():
        raise UserError(f"asset file not found: {path}")
    if int(num_slots) < 1:
        raise UserError(f"the terrain needs at least one box slot, got {num_slots}")
    spec = mujoco.MjSpec.from_file(str(path))
    plane = spec.geom(floor)
    if plane is None or plane.type != mujoco.mjtGeom.mjGEOM_PLANE:
        raise UserError(f"the model has no plane geom named {floor!r} to turn into the terrain")
    attributes = {
        a: getattr(plane, a)
        for a in (
            "contype",
            "conaffinity",
            "condim",
            "friction",
            "priority",
            "solref",
            "solimp",
            "solmix",
            "margin",
            "gap",
            "material",
            "rgba",
        )
    }
    spec.delete(plane)
    for k in range(int(num_slots)):
        box = spec.worldbody.add_geom(
            name=f"terrain_{k}",
            type=mujoco.mjtGeom.mjGEOM_BOX,
            size=[0.01, 0.01, 0.01],
            pos=[0.0, 0.0, _PARKED_Z],
            group=TERRAIN_GROUP,
        )
        for name, value in attributes.items():
            setattr(box, name, value)
    return spec


def place_tile(spec: mujoco.MjSpec, boxes: Boxes) -> mujoco.MjModel:
    """terrain_spec()'s model, compiled, with its first len(boxes) slots at `boxes` (the rest left waiting): one
    world's terrain as MuJoCo's C engine sees it (for CEngineSim, the renderer's checks and tests). Raises
    UserError when `boxes` has more boxes than the spec has slots."""
    spec = spec.copy()
    slots = [g for g in spec.geoms if g.name.startswith("terrain_")]
    if len(boxes) > len(slots):
        raise UserError(f"{len(boxes)} boxes do not fit in the model's {len(slots)} terrain slots")
    for geom, pos, half, rot in zip(slots, boxes.pos, boxes.half, boxes.rot):
        quat = np.zeros(4)
        mujoco.mju_mat2Quat(quat, rot.reshape(-1))
        geom.pos, geom.size, geom.quat = pos.tolist(), half.tolist(), quat.tolist()
    return spec.compile()


warp = None  # the warp module itself, bound by _box_rays_kernel() for the kernel's code


def _box_rays(xy, ids, geom_xpos, geom_xmat, geom_size, top, miss, height):
    """TerrainSlots.heights' Warp kernel (see _box_rays_kernel): one thread per (world, ray)."""
    world, ray = warp.tid()
    origin = warp.vec3(xy[world, ray][0], xy[world, ray][1], top)
    best = float(miss)
    for k in range(ids.shape[0]):
        g = ids[k]
        rot = geom_xmat[world, g]
        # Sides 0.1 mm out (tops as they are): a ray on the seam of two abutting boxes (a pit's rings) must not pass
        # between them, both finding it a float32 rounding outside, and report no terrain (mj_ray in float64 hits).
        half = geom_size[world % geom_size.shape[0], g] + warp.vec3(1.0e-4, 1.0e-4, 0.0)
        local = warp.transpose(rot) @ (origin - geom_xpos[world, g])  # the ray in the box's frame
        down = warp.vec3(-rot[2, 0], -rot[2, 1], -rot[2, 2])
        near, far = float(-1.0e30), float(1.0e30)  # noqa: UP018 - Warp: float() makes them mutable
        for i in range(3):  # slab test; a ray parallel to a slab divides by +-1e-12 instead: inside it, the two
            d = down[i]  # distances are huge and of opposite signs (no bound), outside of the same sign (a miss)
            d = warp.where(warp.abs(d) < 1.0e-12, warp.where(d < 0.0, -1.0e-12, 1.0e-12), d)
            t1 = (-half[i] - local[i]) / d
            t2 = (half[i] - local[i]) / d
            near = warp.max(near, warp.min(t1, t2))
            far = warp.min(far, warp.max(t1, t2))
        if near <= far and far >= 0.0:
            best = warp.max(best, top - warp.max(near, 0.0))
    height[world, ray] = best


@functools.cache
def _box_rays_kernel():
    """_box_rays as a Warp kernel, made on first use (warp is imported lazily); its argument types given as objects
    (this module's annotations are strings). Warp's code generator resolves the kernel's names in this module's
    globals, where `wp` is a lazy proxy that it misreads (the kernel came out wrong): the kernel names the module
    itself, `warp`, bound here."""
    global warp
    warp = importlib.import_module("warp")
    _box_rays.__annotations__ = {
        "xy": wp.array2d(dtype=wp.vec2),
        "ids": wp.array(dtype=wp.int32),
        "geom_xpos": wp.array2d(dtype=wp.vec3),
        "geom_xmat": wp.array2d(dtype=wp.mat33),
        "geom_size": wp.array2d(dtype=wp.vec3),
        "top": float,
        "miss": float,
        "height": wp.array2d(dtype=float),
    }
    return wp.kernel(_box_rays, module="unique")


class TerrainSlots:
    """Places each world's tile in its terrain slots, on the device (BatchedSim): the slots' poses go into
    Data.geom_xpos / geom_xmat (MuJoCo Warp computes a static geom's pose once, in make_data, and never again) and
    their sizes into the per-world Model fields geom_size, geom_aabb and geom_rbound (the broadphase's bounds), so
    the `sim` must be made with per_world=TerrainSlots.PER_WORLD.

    place(mask, level, col): the worlds in `mask` (N,) bool get the boxes of tiles (level[i], col[i]) ((N,) long),
    the others keep theirs bit for bit; in place, no host sync, so it may run inside a recorded step.
    """

    PER_WORLD = ("geom_size", "geom_aabb", "geom_rbound")

    def __init__(self, sim: BatchedSim, tiles: TerrainTiles):
        self.sim, self.num_cols = sim, tiles.num_cols
        self.ids = torch.tensor([sim.geom_id(f"terrain_{k}") for k in range(tiles.num_slots)], device=sim.device)

        def table(a: np.ndarray) -> torch.Tensor:  # (L, C, K, ...) -> (L * C, K, ...) on the device
            return torch.tensor(a.reshape(-1, *a.shape[2:]), dtype=torch.float32, device=sim.device)

        self.pos, self.rot, self.half = table(tiles.pos), table(tiles.rot), table(tiles.half)
        self.aabb = torch.stack([torch.zeros_like(self.half), self.half], dim=2)  # (centre offset, half sizes)
        self.rbound = self.half.norm(dim=-1)
        self._scans: dict[tuple, dict] = {}  # the buffers of each shape of points cast, kept for recorded graphs
        # A Warp launch and buffers that torch.compile must not trace (it mishandles the buffers' first allocation
        # inside a compiled step): it calls heights() as it is.
        self.heights = torch.compiler.disable(self.heights)

    def heights(self, xy: torch.Tensor, top: float) -> torch.Tensor:
        """The height (m) of each world's terrain under its points xy (N, P, 2) (world x, y, m), (N, P) float32: a
        ray cast straight down from height `top` against the world's terrain boxes, the first hit; TERRAIN_BOTTOM -
        1 where it hits none. What BatchedSim.rays (MuJoCo Warp's rays, mj_ray's algorithm) gives for these rays,
        26 times faster on an H200 (README: Rough terrain): one thread per ray and a slab test against the K boxes,
        where MuJoCo Warp's spreads each ray over 64 threads and every geom; and where two boxes abut (within 0.1 mm
        of the seam), what mj_ray gives, where MuJoCo Warp's float32 rays may pass between them and miss. Returns a
        buffer, one per shape of xy, that the next call of that shape overwrites. In place, no host sync: may run
        inside a recorded step (after a first call of each shape, which allocates its buffers)."""
        n, p = xy.shape[:2]
        key = tuple(xy.shape)
        if key not in self._scans:  # allocated once per shape, before graphs record it
            buf = {"xy": torch.zeros(n, p, 2, device=xy.device), "out": torch.zeros(n, p, device=xy.device)}
            buf["ids"] = self.ids.to(torch.int32)  # kept: Warp's view of it must not outlive it
            buf["wp"] = [
                wp.from_torch(buf["xy"], dtype=wp.vec2),
                wp.from_torch(buf["ids"]),
                wp.from_torch(self.sim.geom_xpos, dtype=wp.vec3),
                wp.from_torch(self.sim.geom_xmat, dtype=wp.mat33),
                wp.from_torch(self.sim.model["geom_size"], dtype=wp.vec3),
            ]
            buf["out_wp"] = wp.from_torch(buf["out"])
            self._scans[key] = buf
        buf = self._scans[key]
        buf["xy"].copy_(xy)
        with wp.ScopedDevice(self.sim.wp_device):
            wp.launch(
                _box_rays_kernel(),
                dim=(n, p),
                inputs=[*buf["wp"], float(top), TERRAIN_BOTTOM - 1.0],
                outputs=[buf["out_wp"]],
            )
        return buf["out"]

    def place(self, mask: torch.Tensor, level: torch.Tensor, col: torch.Tensor) -> None:
        s, tile, ids = self.sim, level * self.num_cols + col, self.ids
        for target, table in (
            (s.geom_xpos, self.pos),
            (s.geom_xmat, self.rot),
            (s.model["geom_size"], self.half),
            (s.model["geom_aabb"], self.aabb),
            (s.model["geom_rbound"], self.rbound),
        ):
            keep = target[:, ids]
            target[:, ids] = torch.where(mask.view(-1, *[1] * (keep.dim() - 1)), table[tile], keep)


# ----------------------------------------------------------------------------------------------------------------
# Buffer sizing: MuJoCo Warp preallocates contacts and constraint rows. Size them from the model so that they
# cannot overflow, and flag an overflow per world if it happens anyway (never drop contacts silently).
# ----------------------------------------------------------------------------------------------------------------
def _pair_max_contacts() -> dict:
    """Most contacts MuJoCo Warp's collision functions make for one pair of geom types (a pair not listed: 8).

    A heightfield pair makes at most 4, whatever the other geom: MuJoCo Warp's ccd_hfield_kernel
    (mujoco_warp/_src/collision_convex.py, 4.0.0) collects up to mjMAXCONPAIR (50) touching prisms, then writes
    the deepest contact and up to three spread around it (its "contact 0" to "contact 3"); more than 50 touching
    prisms set the HFIELD overflow bit. (MuJoCo's C engine keeps all of them, up to 50.)"""
    _G = mujoco.mjtGeom
    others = (
        _G.mjGEOM_SPHERE,
        _G.mjGEOM_CAPSULE,
        _G.mjGEOM_ELLIPSOID,
        _G.mjGEOM_CYLINDER,
        _G.mjGEOM_BOX,
        _G.mjGEOM_MESH,
    )
    hfield = {frozenset([_G.mjGEOM_HFIELD, g]): 4 for g in others}
    return hfield | {
        frozenset([_G.mjGEOM_SPHERE, _G.mjGEOM_BOX]): 1,
        frozenset([_G.mjGEOM_CAPSULE, _G.mjGEOM_BOX]): 2,
        frozenset([_G.mjGEOM_PLANE, _G.mjGEOM_SPHERE]): 1,
        frozenset([_G.mjGEOM_PLANE, _G.mjGEOM_CAPSULE]): 2,
        frozenset([_G.mjGEOM_PLANE, _G.mjGEOM_BOX]): 4,
        frozenset([_G.mjGEOM_PLANE, _G.mjGEOM_CYLINDER]): 4,
        frozenset([_G.mjGEOM_PLANE, _G.mjGEOM_ELLIPSOID]): 1,
        frozenset([_G.mjGEOM_SPHERE]): 1,
        frozenset([_G.mjGEOM_SPHERE, _G.mjGEOM_CAPSULE]): 1,
        frozenset([_G.mjGEOM_CAPSULE]): 2,
        frozenset([_G.mjGEOM_BOX]): 8,
    }


def overflow_bits() -> int:
    """MuJoCo Warp's overflow bits that mean lost contacts or constraints (its solver's iteration-limit bits are
    not overflows). HFIELD: a geom touched more than 50 heightfield prisms, and the rest went unexamined."""
    o = mjw.OverflowType
    return int(o.NEFC | o.NJMAX_NNZ | o.BROADPHASE | o.NARROWPHASE | o.CCD | o.HFIELD | o.NVMAX)


def contact_capacity(mjm: mujoco.MjModel, static_touch: int | None = None) -> tuple[int, int]:
    """Upper bounds (nconmax, njmax) per world: contacts of every geom pair that may touch, and their rows.

    static_touch: if given, a moving geom is taken to touch at most this many static geoms (the world body's) at
    once, those of its pairs that make the most contacts: a bound for a terrain of many boxes, of which a foot
    touches a few at a time (a world that exceeds it anyway is flagged by overflowed(), never silently)."""
    ncon, nrows = 0, 0
    if not mjm.opt.disableflags & mujoco.mjtDisableBit.mjDSBL_CONTACT:
        body_weld = mjm.body_weldid
        pairs = set()
        for g1 in range(mjm.ngeom):
            for g2 in range(g1 + 1, mjm.ngeom):
                b1, b2 = body_weld[mjm.geom_bodyid[g1]], body_weld[mjm.geom_bodyid[g2]]
                compatible = (mjm.geom_contype[g1] & mjm.geom_conaffinity[g2]) or (
                    mjm.geom_contype[g2] & mjm.geom_conaffinity[g1]
                )
                if compatible and b1 != b2 and not (b1 == 0 and b2 == 0):
                    pairs.add((g1, g2))
        pairs |= {(min(g1, g2), max(g1, g2)) for g1, g2 in zip(mjm.pair_geom1, mjm.pair_geom2)}  # <pair>s
        max_contacts = _pair_max_contacts()
        static = {}  # moving geom -> [(contacts, rows)] of its pairs with static geoms
        for g1, g2 in pairs:
            n = max_contacts.get(frozenset([mjm.geom_type[g1], mjm.geom_type[g2]]), 8)
            condim = max(mjm.geom_condim[g1], mjm.geom_condim[g2])
            rows = (
                1 if condim == 1 else (2 * (condim - 1) if mjm.opt.cone == mujoco.mjtCone.mjCONE_PYRAMIDAL else condim)
            )
            w1, w2 = body_weld[mjm.geom_bodyid[g1]], body_weld[mjm.geom_bodyid[g2]]
            if static_touch is not None and (w1 == 0) != (w2 == 0):
                static.setdefault(g2 if w1 == 0 else g1, []).append((n, n * rows))
                continue
            ncon += n
            nrows += n * rows
        for touching in static.values():
            for n, r in sorted(touching, reverse=True)[:static_touch]:
                ncon += n
                nrows += r
    # Joint limits, DOF friction loss and equality constraints each add rows.
    nrows += int(mjm.jnt_limited.sum()) + int((mjm.dof_frictionloss > 0).sum()) + 6 * mjm.neq
    return int(max(ncon, 1)), int(max(nrows, 1))


# ----------------------------------------------------------------------------------------------------------------
# The batched simulation
# ----------------------------------------------------------------------------------------------------------------
_SHARED_STREAMS: dict[str, torch.cuda.Stream] = {}


def _share_stream(device: torch.device, wp_device) -> None:
    """Make torch and Warp issue their work on one CUDA stream of this device: every kernel then runs in program
    order with no explicit synchronisation, and one CUDA graph can record both. The stream is created by torch as a
    non-blocking stream (newer torch refuses to capture graphs on blocking ones, which Warp's own streams are)."""
    key = str(device)
    if key not in _SHARED_STREAMS:
        torch.cuda.set_device(device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # after whatever torch has queued so far
        _SHARED_STREAMS[key] = stream
        wp_device.set_stream(wp.stream_from_torch(stream))
    torch.cuda.set_stream(_SHARED_STREAMS[key])


_KERNELS_ANNOUNCED: set[str] = set()  # devices for which the one-time kernel message was printed


@contextlib.contextmanager
def _heartbeat(what: str, every_s: float):
    """Print `what (N s)` every `every_s` seconds while the block runs (a long compile shows it is alive)."""
    import threading

    done, t0 = threading.Event(), time.time()

    def beat():
        while not done.wait(every_s):
            print(f"{what} ({time.time() - t0:.0f} s)", flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class BatchedSim:
    """`num_envs` copies of one MuJoCo model on one device, stepped in lockstep by MuJoCo Warp.

    Torch views of the simulation state (zero-copy: they alias Warp's arrays, so writing them writes the sim and
    every step refreshes them in place; never rebind them, write into them with `[:] =`, `copy_` or `index_copy_`):

    | attribute  | shape            | content                                         | Isaac Gym counterpart          |
    |------------|------------------|-------------------------------------------------|--------------------------------|
    | qpos       | (N, nq)          | generalized positions; free joint first if any  | root state [:, 0:7] + DOF pos  |
    | qvel       | (N, nv)          | generalized velocities                          | root state [:, 7:13] + DOF vel |
    | ctrl       | (N, nu)          | actuator inputs: position targets or torques    | actuation / DOF target tensor  |
    | act_force  | (N, nu)          | actuator force (torque on the joint) last step  | DOF force tensor               |
    | xpos       | (N, nbody, 3)    | body frame positions, world frame               | rigid body state [..., 0:3]    |
    | xquat      | (N, nbody, 4)    | body frame orientations (w, x, y, z)            | rigid body state [..., 3:7]    |
    | site_xpos  | (N, nsite, 3)    | site positions, world frame                     | -                              |
    | geom_xpos  | (N, ngeom, 3)    | geom positions, world frame (static ones: set)  | -                              |
    | geom_xmat  | (N, ngeom, 3, 3) | geom orientations (columns: the geom's axes)    | -                              |
    | mocap_pos  | (N, nmocap, 3)   | mocap body positions (markers, targets)         | -                              |
    | contact_force | (N, nbody, 3) | net external (contact) force per body, world    | net contact force tensor       |
    | overflow   | (N,) int32       | MuJoCo Warp's overflow bits, sticky until reset | -                              |
    | model[f]   | (N, ...)         | per-world model field f (`per_world`, below)    | actor and DOF properties       |

    `contact_force` is filled only with `contact_forces=True` (an extra pass after the solver's last sub-step).
    With `poses=True`, body poses (xpos, xquat, site_xpos) are recomputed after every `step()` and `reset()`, so
    they match `qpos` (MuJoCo's own mj_step leaves them one sub-step behind). A task that needs no exact poses passes
    `poses=False` and saves those two kinematics passes per policy step (about 20 small kernels); the physics is
    the same, since every physics step starts by computing the poses of its qpos. After `step()` the poses are then
    those of the last sub-step's start, one sub-step behind `qpos` as mj_step leaves them (fine for a reward term);
    after `reset()` they are stale until the next `step()`.

    Per-world model fields (domain randomization; Isaac Gym: set_actor_rigid_body_properties and friends, per
    environment). MuJoCo Warp's kernels read a model field of shape (k, ...) at row `world % k`, and put_model makes
    the fields named in its `batch_sizes` one row per world. The fields named in `per_world` (MuJoCo Warp Model
    names, e.g. "geom_friction", "body_mass", "actuator_gainprm") are made so, and `model[name]` is a zero-copy torch
    view of shape (N, ...) of each (`nominal[name]`: the compiled model's values, shape (...)). Write them in place,
    for the worlds of your choice (torch.where, masked_fill_), then call reset() for those worlds, or
    refresh_derived() if they are not reset: no host sync, so it may run inside a recorded step. The views exist
    from construction on, before any step or CUDA graph is recorded, and are never reallocated, so graphs read the
    values written into them. They belong to the state (get_state/set_state).

    Derived constants. MuJoCo computes some model fields from others when it compiles a model (mj_setConst), and
    MuJoCo Warp's step reads them as they are; MuJoCo Warp's own set_const recomputes them for every world at once.
    - body_subtreemass (from body_mass): read at every step (subtree centres of mass, the origin of the com-based
      frames). Made per-world with body_mass and recomputed for the refreshed worlds (refresh_derived).
    - body_invweight0, dof_invweight0 (from masses, inertias, centres of mass, armature, at qpos0): they only scale
      the constraints' regularization (contact, joint-limit and friction-loss softness). Kept at the compiled
      model's values, as MuJoCo Playground's MJX randomization keeps them: MuJoCo Warp's set_const computes them
      with one mass-matrix solve per dof and per body row (about 130 solves for the Go1), which would cost more than
      a physics step at every reset step. The README measures what this changes (tests/dr_derived_constants.py).
    - actuator_acc0: read by muscle actuators only.
    Other fields that MuJoCo derives (geom bounds from geom_size, lengths at qpos0, ...) are not refreshed here:
    randomize them only after checking what reads them.
    """

    # Model fields that MuJoCo computes from a per-world field and that a step reads: made per-world along with it.
    DERIVED_FIELDS = {"body_mass": ("body_subtreemass",)}

    def __init__(
        self,
        mjm: mujoco.MjModel,
        num_envs: int,
        device: torch.device | str,
        decimation: int = 1,
        nconmax: int | None = None,
        njmax: int | None = None,
        contact_forces: bool = False,
        poses: bool = True,
        per_world: tuple[str, ...] = (),
    ):
        if int(num_envs) < 1:
            raise UserError(f"the number of environments must be at least 1, got {num_envs}")
        if int(decimation) < 1:
            raise UserError(f"decimation (physics sub-steps per policy step) must be at least 1, got {decimation}")
        self.mjm, self.num_envs, self.decimation = mjm, int(num_envs), int(decimation)
        self.device = resolve_device(str(device))
        wp.config.quiet = True  # no Warp banner
        # GPU code straight to machine code for this GPU (cubin), kept in Warp's cache: the default PTX is translated
        # again by the driver on every process whose driver cache misses (README: Cold and warm start).
        wp.config.cuda_output = "cubin"
        wp.init()
        self.wp_device = wp.get_device("cpu" if self.device.type == "cpu" else f"cuda:{self.device.index}")
        if self.device.type == "cuda":
            _share_stream(self.device, self.wp_device)
        auto_ncon, auto_njmax = contact_capacity(mjm)
        self.nconmax, self.njmax = int(nconmax or auto_ncon), int(njmax or auto_njmax)
        derived = [f for name in per_world for f in self.DERIVED_FIELDS.get(name, ())]
        batched = dict.fromkeys([*per_world, *derived])
        with wp.ScopedDevice(self.wp_device):
            self.m = mjw.put_model(mjm, batch_sizes={name: self.num_envs for name in batched})
            self.d = mjw.make_data(mjm, nworld=self.num_envs, nconmax=self.nconmax, njmax=self.njmax)
        self.model = {name: wp.to_torch(getattr(self.m, name)) for name in batched}
        self.nominal = {name: t[0].clone() for name, t in self.model.items()}
        if "body_mass" in self.model:
            # subtree[b, j] = 1 where body j is b or one of its descendants (bodies come after their parents).
            subtree = np.eye(mjm.nbody, dtype=np.float32)
            for j in range(mjm.nbody - 1, 0, -1):
                subtree[mjm.body_parentid[j]] += subtree[j]
            self._subtree = torch.tensor(subtree, device=self.device)
        self.m.opt.warn_overflow = 0  # overflows are counted per world on the device instead of printed
        self.contact_forces, self.poses = contact_forces, poses

        d = self.d
        self.qpos, self.qvel, self.ctrl = wp.to_torch(d.qpos), wp.to_torch(d.qvel), wp.to_torch(d.ctrl)
        self.act_force = wp.to_torch(d.actuator_force)
        self.xpos, self.xquat = wp.to_torch(d.xpos), wp.to_torch(d.xquat)
        self.site_xpos = wp.to_torch(d.site_xpos)
        self.geom_xpos, self.geom_xmat = wp.to_torch(d.geom_xpos), wp.to_torch(d.geom_xmat)
        self.mocap_pos = wp.to_torch(d.mocap_pos)
        self.contact_force = wp.to_torch(d.cfrc_ext)[..., 3:6]  # cfrc_ext is (torque, force) at the body's COM
        self.overflow = wp.to_torch(d.overflow)
        self._time = wp.to_torch(d.time)
        # State that a reset must clear besides qpos/qvel: the solver's warm start, applied forces, actuator state.
        # Everything a step reads from the previous one, for get_state()/set_state() (exact resume).
        self._state = {
            name: wp.to_torch(getattr(d, name))
            for name in (
                "qpos",
                "qvel",
                "act",
                "ctrl",
                "qacc_warmstart",
                "qacc",
                "time",
                "mocap_pos",
                "mocap_quat",
                "qfrc_applied",
                "xfrc_applied",
                "overflow",
            )
            if getattr(d, name).size > 0
        }
        self._state.update({f"model.{name}": t for name, t in self.model.items()})
        self._zero_on_reset = [
            wp.to_torch(a) for a in (d.qacc_warmstart, d.qacc, d.qfrc_applied, d.xfrc_applied, d.act) if a.size > 0
        ]
        self._graph = None
        self._stepped_once = False
        self._ray_buffers: dict = {}
        self._overflow_bits = overflow_bits()
        # Warp's launches are not torch ops: torch.compile calls these as they are, untraced.
        self.step, self._kinematics = torch.compiler.disable(self.step), torch.compiler.disable(self._kinematics)
        self._cast = torch.compiler.disable(self._cast)

        # Start every world at the first keyframe (else the model's qpos0) with its controls.
        key = 0 if mjm.nkey else None
        qpos0 = mjm.key_qpos[key] if key is not None else mjm.qpos0
        ctrl0 = mjm.key_ctrl[key] if key is not None else np.zeros(mjm.nu)
        self.default_qpos = torch.tensor(qpos0, dtype=torch.float32, device=self.device)
        self.default_ctrl = torch.tensor(ctrl0, dtype=torch.float32, device=self.device)
        all_envs = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        self.reset(
            all_envs, self.default_qpos.expand(self.num_envs, -1), ctrl=self.default_ctrl.expand(self.num_envs, -1)
        )

    # --------------------------------------------------------------------------------------------------------
    def _substeps(self):
        for i in range(self.decimation):
            # Contact forces are read once per policy step, after its last sub-step: compute them only there.
            self.m.opt.run_rne_postconstraint = self.contact_forces and i == self.decimation - 1
            mjw.step(self.m, self.d)
        if self.poses:
            mjw.kinematics(self.m, self.d)  # body poses of the new qpos (Isaac Gym: refresh_rigid_body_state_tensor)

    def step(self) -> None:
        """Advance every world by `decimation` physics steps with the current `ctrl` (held: a zero-order hold).

        The sub-steps are recorded once as a graph and replayed: one launch per policy step instead of hundreds of
        kernel launches from Python. On a GPU that is a CUDA graph; on the CPU, Warp records the launches and
        replays them in C++ (bit-for-bit the same results as launching them one by one, 5 to 13 times faster). The
        first call runs eagerly, which compiles (or loads) Warp's kernels.
        """
        with wp.ScopedDevice(self.wp_device):
            if self.wp_device.is_capturing:  # inside cuda_graphed(): recorded into the caller's graph
                self._substeps()
                return
            if not self._stepped_once:
                first = str(self.device) not in _KERNELS_ANNOUNCED
                if first:
                    _KERNELS_ANNOUNCED.add(str(self.device))
                    print(
                        f"MuJoCo Warp: compiling or loading its kernels for {self.device} (cached in "
                        f"{wp.config.kernel_cache_dir}; the first time, minutes on a CPU)...",
                        flush=True,
                    )
                    t0 = time.time()
                    if self.device.type == "cuda" and os.environ.get("MJW_PRELOAD", "1") != "0":
                        # All of MuJoCo Warp's modules at once, compiled in parallel: launches would load them
                        # one after another.
                        wp.load_module(
                            importlib.import_module("mujoco_warp"),
                            device=self.wp_device,
                            recursive=True,
                            max_workers=os.cpu_count(),
                        )
                alive = _heartbeat("MuJoCo Warp: still compiling or loading", every_s=15.0)
                with alive if first else contextlib.nullcontext():
                    self._substeps()
                self._stepped_once = True
                if first:
                    print(f"MuJoCo Warp: kernels ready after {time.time() - t0:.1f} s", flush=True)
                return
            if self._graph is None:
                with wp.ScopedCapture(device=self.wp_device) as capture:
                    self._substeps()
                self._graph = capture.graph
            wp.capture_launch(self._graph)

    def reset(
        self, envs: torch.Tensor, qpos: torch.Tensor, qvel: torch.Tensor | None = None, ctrl: torch.Tensor | None = None
    ) -> None:
        """Put the worlds in `envs` at (qpos, qvel), leaving every other world bit-for-bit untouched.

        `envs` is either a bool mask of shape (N,), with qpos of shape (N, nq) whose other rows are ignored, or a
        long tensor of ids, with qpos of shape (len(ids), nq). qvel (default zero) and ctrl (default: unchanged)
        follow the same rule. Runs on the device with no host sync, so it may be called inside a rollout.
        With `poses=True`, body poses are recomputed right away, so `xpos` and friends match the new `qpos`.
        """
        if envs.dtype == torch.bool:
            mask = envs
        else:
            mask = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device).index_fill_(0, envs, True)
            qpos = self._scatter_rows(envs, qpos, self.qpos)
            qvel = None if qvel is None else self._scatter_rows(envs, qvel, self.qvel)
            ctrl = None if ctrl is None else self._scatter_rows(envs, ctrl, self.ctrl)
        rows = mask.unsqueeze(-1)
        self.qpos.copy_(torch.where(rows, qpos, self.qpos))
        self.qvel.copy_(torch.where(rows, 0.0 if qvel is None else qvel, self.qvel))
        if ctrl is not None:
            self.ctrl.copy_(torch.where(rows, ctrl, self.ctrl))
        for t in self._zero_on_reset:
            t.masked_fill_(mask.view(-1, *[1] * (t.dim() - 1)), 0.0)
        self._time.masked_fill_(mask, 0.0)
        self.overflow.masked_fill_(mask, 0)
        self.refresh_derived(mask)
        if self.poses:
            self._kinematics()  # deterministic: untouched worlds get the very same poses back

    def refresh_derived(self, mask: torch.Tensor) -> None:
        """Recompute the derived model constants of the worlds in `mask` ((N,) bool) from their per-world fields:
        body_subtreemass from body_mass (see the class docstring for the others). In place, no host sync; the
        other worlds keep theirs bit for bit. Nothing to do without a per-world body_mass."""
        if "body_mass" in self.model:
            mass = self.model["body_mass"]
            subtree_mass = (mass[:, None, :] * self._subtree).sum(dim=-1)  # elementwise: no TF32 matmul rounding
            self.model["body_subtreemass"].copy_(
                torch.where(mask[:, None], subtree_mass, self.model["body_subtreemass"])
            )

    def _kinematics(self):
        with wp.ScopedDevice(self.wp_device):
            mjw.kinematics(self.m, self.d)

    @staticmethod
    def _scatter_rows(ids, rows, like):
        return like.clone().index_copy_(0, ids, rows.to(like.dtype))

    def nonfinite(self) -> torch.Tensor:
        """(N,) bool: worlds whose state holds a NaN or an infinity (a blown-up simulation), on the device."""
        return ~(torch.isfinite(self.qpos).all(dim=1) & torch.isfinite(self.qvel).all(dim=1))

    def get_state(self) -> dict[str, torch.Tensor]:
        """A copy of everything the next step depends on (positions, velocities, controls, actuator states, the
        solver's warm start, time, mocap poses, applied forces, the per-world model fields as "model.<name>"):
        set_state() of it continues bit for bit. Not the poses of static geoms (geom_xpos/geom_xmat of world-body
        geoms): whoever placed them (TerrainSlots) places them again."""
        return {name: t.clone() for name, t in self._state.items()}

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a get_state(). Per-world model fields that `state` lacks (saved by a simulation without them) keep
        their present values. Raises UserError when a saved tensor's shape differs from this simulation's."""
        for name, t in self._state.items():
            if name.startswith("model.") and name not in state:
                continue
            if state[name].shape != t.shape:
                raise UserError(
                    f"saved simulation state {name} has shape {tuple(state[name].shape)}, this "
                    f"simulation {tuple(t.shape)}: different number of environments or model"
                )
            t.copy_(state[name])
        self._kinematics()

    def overflowed(self) -> torch.Tensor:
        """(N,) bool: worlds whose contact or constraint buffers overflowed since their last reset."""
        return (self.overflow & self._overflow_bits) != 0

    def rays(self, pnt: torch.Tensor, vec: torch.Tensor, group: int) -> torch.Tensor:
        """Cast P rays in every world against the geoms of geom group `group` (MuJoCo Warp's batched rays, which
        do what mujoco.mj_ray does for each ray; Isaac Lab: RayCaster): pnt (N, P, 3) origins and vec (N, P, 3)
        directions, world frame. Returns (N, P) float32: the distance along vec (in units of |vec|) to the first
        surface hit, -1 where none. The result is a buffer that the next call with the same P overwrites (copy it
        to keep it). In place and without host sync: may run inside a recorded step."""
        n, p = pnt.shape[:2]
        buf = self._ray_buffers.get((p, group))
        if buf is None:  # allocated once per shape, before any graph records them
            z = functools.partial(torch.zeros, device=self.device)
            buf = {"pnt": z(n, p, 3), "vec": z(n, p, 3), "dist": z(n, p), "geomid": z(n, p, dtype=torch.int32)}
            buf["normal"], buf["exclude"] = z(n, p, 3), torch.full((p,), -1, dtype=torch.int32, device=self.device)
            mask = [0] * 6
            mask[group] = 1
            buf["wp"] = {
                "pnt": wp.from_torch(buf["pnt"], dtype=wp.vec3),
                "vec": wp.from_torch(buf["vec"], dtype=wp.vec3),
                "geomgroup": wp.types.vector(6, wp.float32)(*mask),
                "flg_static": True,
                "bodyexclude": wp.from_torch(buf["exclude"]),
                "dist": wp.from_torch(buf["dist"]),
                "geomid": wp.from_torch(buf["geomid"]),
                "normal": wp.from_torch(buf["normal"], dtype=wp.vec3),
            }
            self._ray_buffers[p, group] = buf
        buf["pnt"].copy_(pnt)
        buf["vec"].copy_(vec)
        self._cast(buf["wp"])
        return buf["dist"]

    def _cast(self, arrays: dict) -> None:
        with wp.ScopedDevice(self.wp_device):
            mjw.rays(self.m, self.d, **arrays)

    def body_id(self, name: str) -> int:
        return self._id(mujoco.mjtObj.mjOBJ_BODY, name)

    def site_id(self, name: str) -> int:
        return self._id(mujoco.mjtObj.mjOBJ_SITE, name)

    def geom_id(self, name: str) -> int:
        return self._id(mujoco.mjtObj.mjOBJ_GEOM, name)

    def _id(self, kind, name):
        i = mujoco.mj_name2id(self.mjm, kind, name)
        if i < 0:
            raise UserError(f"the model has no {kind.name[6:].lower()} named {name!r}")
        return i


# ----------------------------------------------------------------------------------------------------------------
# CUDA graphs of whole steps: torch ops and MuJoCo Warp kernels recorded together, replayed with one launch
# ----------------------------------------------------------------------------------------------------------------
def cuda_graphed(fn, device: torch.device):
    """`fn` (no arguments, no result) as a callable that, on a GPU, runs eagerly on its first call (kernels load,
    lazily created state such as gradients and optimizer moments appears), is recorded as one CUDA graph on its
    second and replayed from then on. On the CPU it is `fn` itself.

    Inside a graph every tensor keeps its address and nothing runs on the host, so `fn` must read and write its
    state in place, never branch on tensor values, and never copy to the host. Random numbers come from torch's
    default generator, which a graph advances at each replay."""
    if device.type != "cuda":
        return fn
    graph, calls = None, 0

    def run():
        nonlocal graph, calls
        calls += 1
        if calls == 1:
            return fn()
        if graph is None:
            graph = _capture(fn, device)
        graph.replay()

    return run


_GRAPHS = weakref.WeakSet()  # every recorded graph still alive (see release_cuda_graphs)


def release_cuda_graphs() -> None:
    """Free every recorded CUDA graph now. NCCL lets a communicator go only once each graph that recorded one of its
    collectives is destroyed (Distributed.stop calls this first); a graph must not be replayed afterwards."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    for graph in list(_GRAPHS):
        graph.reset()


def _capture(fn, device: torch.device) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    _GRAPHS.add(graph)
    stream = wp.get_device(str(device)).stream  # the stream torch and Warp share (see _share_stream)
    with torch.cuda.graph(graph, stream=torch.cuda.current_stream(device), capture_error_mode="thread_local"):
        # Tell Warp that a capture is on, so that MuJoCo Warp's launches are recorded into this graph.
        wp.capture_begin(
            stream=stream, force_module_load=False, external=True, capture_mode=wp.CaptureMode.THREAD_LOCAL
        )
        try:
            fn()
        finally:
            wp.capture_end(stream=stream)
    return graph


# ----------------------------------------------------------------------------------------------------------------
# Quaternion and frame math, batched over leading dimensions. (w, x, y, z) order.
# ----------------------------------------------------------------------------------------------------------------
def quat_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product a * b (rotate by b first, then by a)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def quat_conjugate(q: torch.Tensor) -> torch.Tensor:
    """The inverse rotation of a unit quaternion."""
    return torch.cat([q[..., :1], -q[..., 1:]], dim=-1)  # (no constant tensor: nothing to copy from the host)


def quat_rotate(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate v by q: body frame to world frame when q is a body's orientation."""
    w, u = q[..., :1], q[..., 1:]
    t = 2.0 * torch.cross(u, v, dim=-1)
    return v + w * t + torch.cross(u, t, dim=-1)


def quat_rotate_inverse(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate v by the inverse of q: world frame to body frame."""
    return quat_rotate(quat_conjugate(q), v)


def projected_gravity(q: torch.Tensor) -> torch.Tensor:
    """The unit gravity direction (0, 0, -1) seen in the body frame: (0, 0, -1) when upright."""
    down = torch.zeros(q.shape[:-1] + (3,), dtype=q.dtype, device=q.device)
    down[..., 2] = -1.0
    return quat_rotate_inverse(q, down)


def quat_to_rpy(q: torch.Tensor) -> torch.Tensor:
    """Roll, pitch, yaw (intrinsic z-y'-x'' Tait-Bryan angles, as in ROS), stacked on the last dimension."""
    w, x, y, z = q.unbind(-1)
    roll = torch.atan2(2.0 * (w * x + y * z), 1.0 - 2.0 * (x * x + y * y))
    pitch = torch.asin((2.0 * (w * y - z * x)).clamp(-1.0, 1.0))
    yaw = torch.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
    return torch.stack([roll, pitch, yaw], dim=-1)


def yaw_from_quat(q: torch.Tensor) -> torch.Tensor:
    """Heading angle about the world z axis."""
    return quat_to_rpy(q)[..., 2]


def quat_from_yaw(yaw: torch.Tensor) -> torch.Tensor:
    """Rotation by `yaw` radians about the world z axis."""
    zero = torch.zeros_like(yaw)
    return torch.stack([torch.cos(yaw / 2), zero, zero, torch.sin(yaw / 2)], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Rendering (MuJoCo's OpenGL renderer on one world copied to the host: for videos, never inside training's hot loop)
# ----------------------------------------------------------------------------------------------------------------
def tracking_camera(body_id: int, distance: float, elevation: float, azimuth: float) -> mujoco.MjvCamera:
    """A camera for Renderer that follows body `body_id` from `distance` m, looking down `elevation` degrees below
    the horizon (negative: from above), from compass direction `azimuth` degrees (MuJoCo's mjCAMERA_TRACKING)."""
    camera = mujoco.MjvCamera()
    camera.type = mujoco.mjtCamera.mjCAMERA_TRACKING
    camera.trackbodyid, camera.distance, camera.elevation, camera.azimuth = body_id, distance, elevation, azimuth
    return camera


class Renderer:
    """Renders one environment of a BatchedSim to an (height, width, 3) uint8 image, seen from `camera`: a camera
    of the model (name or id; -1 MuJoCo's free camera) or an mujoco.MjvCamera (tracking_camera)."""

    def __init__(self, sim: BatchedSim, width: int = 640, height: int = 480, camera=-1):
        self.sim, self.camera = sim, camera
        fix = (
            "set MUJOCO_GL=egl on a GPU machine (Debian/Ubuntu: apt-get install libegl1) or MUJOCO_GL=osmesa on "
            "a CPU one (apt-get install libosmesa6), or run without --capture-video"
        )
        if _GL_PROBLEM is not None:  # known since import: MuJoCo was imported without rendering
            raise UserError(f"no OpenGL rendering backend works here: {_GL_PROBLEM}. To render, {fix}")
        try:
            self._model = copy.copy(sim.mjm)  # its geom sizes follow the rendered world's (TerrainSlots)
            self._renderer = mujoco.Renderer(self._model, height=height, width=width)
        except Exception as e:  # noqa: BLE001 - the library loads but makes no context (no driver, no display)
            backend = GL_REQUESTED or os.environ.get("MUJOCO_GL")
            setting = f"MUJOCO_GL={backend}" if backend else "MUJOCO_GL unset"
            if platform.system() == "Linux" and (backend or "").strip().lower() in _GL_OTHERS["Linux"]:
                setting += ", a window through GLFW, which needs a display"
            raise UserError(
                f"no OpenGL rendering backend works here ({setting}: {str(e).splitlines()[0]}). To render, {fix}"
            ) from None
        self._data = mujoco.MjData(sim.mjm)
        self._option = mujoco.MjvOption()
        self._option.geomgroup[TERRAIN_GROUP] = 1  # the terrain's boxes: MuJoCo shows groups 0-2 only by default

    @staticmethod
    def check_available() -> None:
        """Raise the UserError of __init__ now if no backend can render: --capture-video checks this at start-up,
        before a run spends an hour training and then fails at its first video."""
        Renderer(_TinySim(), width=16, height=16).close()

    def render(self, env_id: int = 0) -> np.ndarray:
        s = self.sim
        self._data.qpos[:] = s.qpos[env_id].cpu().numpy()
        self._data.qvel[:] = s.qvel[env_id].cpu().numpy()
        if s.mjm.nmocap:
            self._data.mocap_pos[:] = s.mocap_pos[env_id].cpu().numpy()
        mujoco.mj_forward(s.mjm, self._data)
        if hasattr(s, "geom_xpos"):  # a BatchedSim: static geoms may differ per world (TerrainSlots)
            self._data.geom_xpos[:] = s.geom_xpos[env_id].cpu().numpy()
            self._data.geom_xmat[:] = s.geom_xmat[env_id].reshape(-1, 9).cpu().numpy()
            if "geom_size" in s.model:
                self._model.geom_size[:] = s.model["geom_size"][env_id].cpu().numpy()
        self._renderer.update_scene(self._data, camera=self.camera, scene_option=self._option)
        return self._renderer.render()

    def close(self):
        self._renderer.close()

    def __enter__(self) -> Renderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _TinySim:
    """The least a Renderer needs: a model (an empty world)."""

    def __init__(self):
        self.mjm = mujoco.MjModel.from_xml_string("<mujoco/>")


def draw_gauges(frame: np.ndarray, commanded, actual, span: float) -> np.ndarray:
    """A copy of an (H, W, 3) uint8 frame with one horizontal gauge per value at its top, from -span to span:
    a green mark for the commanded value, a red one for the actual value. Plain NumPy: no font or GUI toolkit."""
    frame = frame.copy()
    _, w, _ = frame.shape
    for row, (c, a) in enumerate(zip(commanded, actual)):
        y = 8 + row * 14
        frame[y : y + 8, 10 : w - 10] = 40
        frame[y : y + 8, w // 2] = 255
        for value, color in ((c, (0, 220, 0)), (a, (230, 30, 30))):
            x = int(w / 2 + np.clip(value / span, -1, 1) * (w / 2 - 12))
            frame[y : y + 8, max(x - 2, 0) : x + 2] = color
    return frame


def save_video(frames: list[np.ndarray], path: str | os.PathLike, fps: float) -> None:
    """Write frames as an H.264 mp4 (through imageio's bundled ffmpeg); a temporary file then a rename, so a
    killed run never leaves a truncated video behind."""
    import imageio.v2 as imageio  # only video capture needs it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.mp4")
    with imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=8, quality=7) as writer:
        for f in frames:
            writer.append_data(f)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Arguments: domains checked before anything is created, and a checkpoint's arguments adopted
# ----------------------------------------------------------------------------------------------------------------
def flag(name: str) -> str:
    """The command-line spelling of an Args field: num_envs -> --num-envs."""
    return "--" + name.replace("_", "-")


def check_range(
    args,
    name: str,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
    hint: str = "",
) -> None:
    """Raise UserError unless getattr(args, name) lies in the interval [lo, hi] (open ends as asked), is finite, and
    is an integer if `integer`. None passes (an unset optional). NaN and infinities fail every check."""
    value = getattr(args, name)
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
    ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        left = "" if lo is None else f"{'>' if lo_open else 'at least'} {lo:g}"
        right = "" if hi is None else f"{'<' if hi_open else 'at most'} {hi:g}"
        domain = " and ".join(s for s in (left, right) if s) or "finite"
        raise UserError(
            f"{flag(name)} must be {'an integer ' if integer else ''}{domain}, got {value}"
            + (f": {hint}" if hint else "")
        )


def check_pair(args, name: str, lo: float | None = None, integer: bool = False, ordered: bool = True) -> None:
    """A (low, high) pair: both finite (integers if asked, at least `lo` if given) and, if `ordered`, low <= high."""
    pair = getattr(args, name)
    if pair is None:
        return
    a, b = pair
    bad = not all(math.isfinite(v) and (not integer or float(v).is_integer()) and (lo is None or v >= lo) for v in pair)
    if bad:
        raise UserError(
            f"{flag(name)} {a} {b}: both values must be finite{' integers' if integer else ''}"
            + (f" of at least {lo:g}" if lo is not None else "")
        )
    if ordered and a > b:
        raise UserError(f"{flag(name)} {a} {b}: give the lower bound first ({flag(name)} {b} {a})")


def check_name(args, name: str, optional: bool = False) -> None:
    """A name used in folder names and W&B: letters, digits, '.', '_' and '-' only."""
    value = getattr(args, name)
    if value is None and optional:
        return
    if not value or not all(c.isalnum() or c in "._-" for c in value) or value in (".", "..") or len(value) > 100:
        raise UserError(
            f"{flag(name)} {value[:40]!r}{'...' if value and len(value) > 40 else ''}: use up to 100 letters, digits, "
            "'.', '_' and '-' (it names folders)"
        )


def check_common_args(args, num_obs_steps_hint: str = "") -> None:
    """The domains of the Args fields both scripts share (sizes, PPO's coefficients, logging). Each script checks
    its task's own fields after calling this. Raises UserError naming the flag and the fix."""
    check_name(args, "exp_name")
    if args.device == "":
        raise UserError("--device '': give auto, cpu, cuda or cuda:N")
    if args.checkpoint == "":
        raise UserError("--checkpoint '': give a checkpoint file, e.g. runs/<run>/checkpoints/latest.pt")
    check_range(args, "seed", 0, 2**32 - 1, integer=True, hint="NumPy seeds are unsigned 32-bit integers")
    check_name(args, "wandb_project_name")
    check_name(args, "wandb_entity", optional=True)
    for name in (
        "num_envs",
        "num_iterations",
        "num_steps",
        "num_minibatches",
        "update_epochs",
        "save_interval",
        "video_interval",
        "video_length",
        "eval_envs",
    ):
        check_range(args, name, 1, integer=True)
    check_range(args, "eval_interval", 0, integer=True, hint="0 turns evaluations off")
    check_range(args, "learning_rate", 0, 1, lo_open=True, hint="rsl_rl's 1e-3 is a good start")
    check_range(args, "desired_kl", 0, hint="0 turns the adaptive learning rate off")
    check_range(args, "gamma", 0, 1, lo_open=True)
    check_range(args, "gae_lambda", 0, 1)
    check_range(args, "clip_coef", 0, lo_open=True)
    check_range(args, "ent_coef", 0)
    check_range(args, "vf_coef", 0, lo_open=True, hint="the critic must be trained for GAE")
    check_range(args, "max_grad_norm", 0, lo_open=True)
    check_range(args, "init_noise_std", 0, lo_open=True, hint="a Gaussian policy needs a positive standard deviation")
    check_range(args, "obs_clip", 0, lo_open=True)
    if args.eval and args.export:
        raise UserError("--eval and --export together: give one of them (run the command twice)")
    if (args.eval or args.export) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            f"--{'eval' if args.eval else 'export'} runs in one process: start it with python, not torchrun"
        )
    if (args.eval or args.export) and not args.checkpoint:
        raise UserError(
            f"--{'eval' if args.eval else 'export'} needs a policy: add --checkpoint runs/<run>/checkpoints/latest.pt"
        )
    if args.num_envs is not None:
        batch = args.num_envs * args.num_steps
        if batch % args.num_minibatches:
            raise UserError(
                f"the batch of num_envs * num_steps = {batch} does not split into "
                f"{args.num_minibatches} minibatches: change --num-minibatches or --num-envs"
            )
        if batch // args.num_minibatches < 2:
            raise UserError(
                f"minibatches of {batch // args.num_minibatches} sample(s): advantages are normalized "
                "per minibatch and need at least 2; lower --num-minibatches or raise --num-envs"
            )


def read_command_line(args_cls, check_args):
    """tyro's command line, checked by `check_args` before anything heavy is imported: `--help` and a bad argument
    answer in about a second. Bad input: one `error:` line on stderr and exit code 2."""
    global _START_UP_SIGNALS
    rank = int(os.environ.get("RANK", "0"))  # torchrun's: in a run of several processes, rank 0 alone prints
    if rank != 0:
        _silence_stdout()
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _START_UP_SIGNALS = _StartUpSignals()
    import tyro

    with contextlib.redirect_stderr(io.StringIO()) if rank != 0 else contextlib.nullcontext():
        args = tyro.cli(args_cls)  # tyro's own errors: once, from rank 0 (each process exits with tyro's code 2)
    try:
        distributed()  # PPO_DIST_TIMEOUT_S checked
        check_args(args)
        if args.checkpoint and not os.path.isfile(args.checkpoint):
            load_checkpoint(args.checkpoint, None, "")  # raises the missing file's or folder's UserError
    except UserError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return args


def adopt_checkpoint_args(args, args_cls, script: str, task_fields: tuple[str, ...]):
    """The arguments with a checkpoint's adopted (none without --checkpoint).

    Resuming training (`--checkpoint PATH`): every argument comes from the checkpoint unless the command line sets
    it (a note names what differs), so the printed resume command resumes exactly. `--eval` and `--export`: the
    `task_fields` (what defines the policy's observations, actions and task) always come from the checkpoint.
    Unreadable checkpoints raise UserError (see load_checkpoint)."""
    import tyro

    if not args.checkpoint:
        return args
    saved = read_checkpoint_args(args.checkpoint, script)
    names = {f.name for f in dataclasses.fields(args_cls)}
    mode = {"checkpoint": args.checkpoint, "eval": args.eval, "export": args.export}
    if not (args.eval or args.export):
        defaults = args_cls(**{**{k: _as_field(v) for k, v in saved.items() if k in names}, **mode})
        resumed = tyro.cli(args_cls, default=defaults)  # what the command line sets wins
        for name in sorted(names - set(mode)):
            if name in saved and getattr(resumed, name) != _as_field(saved[name]):
                print(
                    f"note: {flag(name)} {getattr(resumed, name)} from the command line (the checkpoint has "
                    f"{saved[name]})",
                    flush=True,
                )
        return resumed
    for name in task_fields:
        if name in saved and _as_field(saved[name]) != getattr(args, name):
            print(
                f"note: using the checkpoint's {flag(name)} {saved[name]} (its policy was trained with it)", flush=True
            )
            setattr(args, name, _as_field(saved[name]))
    return args


def _as_field(value):
    return tuple(value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written atomically, read with one clear error for every way they can be wrong
# ----------------------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic: a temporary file, flushed to disk, then renamed over the target, so a kill or a power cut never
    leaves a torn or empty checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, device: torch.device, script: str) -> dict:
    """Read a checkpoint of `script` onto `device`. Raises UserError when the path is a folder, missing, truncated,
    not a torch file, or another script's checkpoint."""
    if os.path.isdir(path):
        raise UserError(f"--checkpoint {path} is a directory: give a file in it, e.g. {Path(path) / 'latest.pt'}")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path} (look in runs/<run>/checkpoints/)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or not a torch file: one message
        raise UserError(
            f"cannot read checkpoint {path} ({type(e).__name__}): it is truncated or not a "
            "checkpoint; use another one, e.g. runs/<run>/checkpoints/latest.pt"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != script:
        origin = ckpt.get("script", "something else") if isinstance(ckpt, dict) else "something else"
        raise UserError(f"{path} is not a checkpoint of {script}.py (it comes from {origin})")
    return ckpt


def read_checkpoint_args(path: str, script: str) -> dict:
    """The Args (as a dict) a checkpoint of `script` was written with. UserError as load_checkpoint."""
    return dict(load_checkpoint(path, torch.device("cpu"), script).get("args", {}))


def check_checkpoint_dims(ckpt: dict, path: str, num_obs: int, num_actions: int) -> None:
    """UserError unless the checkpoint's policy has this task's observation and action sizes."""
    if (ckpt.get("obs_dim"), ckpt.get("act_dim")) != (num_obs, num_actions):
        raise UserError(
            f"{path} has {ckpt.get('obs_dim')} observations and {ckpt.get('act_dim')} actions; "
            f"this task has {num_obs} and {num_actions}"
        )


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Adam's state from a checkpoint written on any device. A state dict carries its param groups' `fused` and
    `capturable` flags, which belong to the device that wrote it (a CUDA graph cannot record a non-capturable step;
    the CPU has no fused kernel): this optimizer keeps its own flags and the moments follow its device."""
    state = {**state, "param_groups": [dict(g) for g in state["param_groups"]]}
    for saved, own in zip(state["param_groups"], optimizer.param_groups):
        for key in ("fused", "capturable", "foreach", "differentiable"):
            if key in own:
                saved[key] = own[key]
        if isinstance(own["lr"], torch.Tensor):  # keep the learning rate a tensor on this optimizer's device
            saved["lr"] = torch.as_tensor(saved["lr"], dtype=own["lr"].dtype).to(own["lr"].device)
    optimizer.load_state_dict(state)  # torch places each moment and step count as these flags ask


def run_dir_of(ckpt_path: str) -> Path:
    """runs/<run>/ for runs/<run>/checkpoints/x.pt; else the checkpoint's own folder."""
    folder = Path(ckpt_path).resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


# ----------------------------------------------------------------------------------------------------------------
# Run folders and loggers: TensorBoard always, Weights & Biases with --track, config and metrics as JSON
# ----------------------------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    """A human name for the device, for titles and config.json: 'NVIDIA H200' or 'CPU (2 cores)'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def finite_or_none(tree):
    """NaN and infinities as JSON's null, which every parser reads; dicts and lists walked."""
    if isinstance(tree, dict):
        return {k: finite_or_none(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [finite_or_none(v) for v in tree]
    return None if isinstance(tree, float) and not np.isfinite(tree) else tree


def write_json(path: Path, obj) -> None:
    """Atomic JSON write (temporary file, then rename), NaN written as null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(finite_or_none(obj), indent=2))
    os.replace(tmp, path)


def print_metrics(title: str, metrics: dict[str, float], units: dict[str, str]) -> None:
    """An evaluation's metrics as a two-column table on the console (the same table in both scripts)."""
    print(title)
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        value = f"{v:12.4f}" if isinstance(v, float) else f"{v!s:>12}"
        print(f"  {k:<{width}} {value} {units.get(k, '')}".rstrip())


def print_metrics_side_by_side(title: str, columns: dict[str, dict[str, float]], units: dict[str, str]) -> None:
    """The same metrics of several evaluations (column name -> metrics) as one table, and the difference of the
    last column from the first."""
    names = list(columns)
    rows = list(columns[names[0]])
    width = max(len(k) for k in rows)
    cols = [max(14, len(n)) for n in names]
    print(title)
    header = "".join(f" {n:>{w}}" for n, w in zip(names, cols))
    print(f"  {'':<{width}}{header} {'difference':>12}")
    for k in rows:
        values = [columns[n].get(k, float("nan")) for n in names]
        cells = "".join(f" {v:{w}.4f}" if isinstance(v, float) else f" {v!s:>{w}}" for v, w in zip(values, cols))
        first, last = values[0], values[-1]
        diff = f" {last - first:+12.4f}" if isinstance(first, float) and isinstance(last, float) else " " * 13
        print(f"  {k:<{width}}{cells}{diff} {units.get(k, '')}".rstrip())


def check_wandb_login() -> None:
    """--track with no credentials would stop at wandb's interactive prompt or fail after start-up: say it now."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc().authenticators(host):  # where `wandb login` keeps the key
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise UserError(
        "--track needs a Weights & Biases login: run `wandb login` (or set WANDB_API_KEY), or log "
        "offline with WANDB_MODE=offline (then `wandb sync` later)"
    )


class Logger:
    """Scalars to TensorBoard (always) and to Weights & Biases (with --track), both under the run folder.

    A resumed run (resume_step given) purges TensorBoard's events after its checkpoint, so no curve doubles back,
    and continues the checkpoint's W&B run (same id): online it rewinds that run to the checkpoint's step
    (W&B's resume_from), offline it resumes it and W&B drops steps it already has. W&B's files go to
    <run>/wandb, next to everything else the run writes."""

    def __init__(
        self, run_dir: Path, args, resume_step: int | None = None, wandb_id: str | None = None, enabled: bool = True
    ):
        """`args`: the script's Args (its fields are the run's config; track, wandb_project_name, wandb_entity).
        enabled=False: a logger that writes nothing (the processes other than rank 0 of a run of several)."""
        self.run_dir, self.wandb, self.writer, self.wandb_id = run_dir, None, None, wandb_id
        if not enabled:
            return
        config = dataclasses.asdict(args)
        track, project, entity = args.track, args.wandb_project_name, args.wandb_entity
        from torch.utils.tensorboard import SummaryWriter

        # flush_secs: a killed run loses at most 10 s of curves.
        self.writer = SummaryWriter(
            str(run_dir), flush_secs=10, purge_step=resume_step + 1 if resume_step is not None else None
        )
        self.writer.add_text(
            "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items())
        )
        if track:
            import wandb  # only --track needs it

            self.wandb_id = wandb_id or secrets.token_hex(4)  # a W&B run id; not from the seeded generators
            offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun")
            resume = {}
            if wandb_id is not None and resume_step is not None:
                resume = (
                    {"id": wandb_id, "resume": "allow"}
                    if offline
                    else {"resume_from": f"{wandb_id}?_step={resume_step}"}
                )
            self.wandb = wandb.init(
                project=project,
                entity=entity,
                config=config,
                name=run_dir.name,
                dir=str(run_dir),
                **(resume or {"id": self.wandb_id}),
            )

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def video(self, path: Path, step: int) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({"videos/policy": wandb.Video(str(path), format="mp4")}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def new_run_dir(exp_name: str, seed: int) -> Path:
    """runs/<exp_name>__<seed>__<unix time>, not created yet."""
    return Path("runs") / f"{exp_name}__{seed}__{int(time.time())}"


def versions(packages=("torch", "warp-lang", "mujoco", "mujoco-warp")) -> dict[str, str | None]:
    """The installed version of each package (None: not installed), and Python's."""
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            found[package] = None
    return found


def write_config(run_dir: Path, script: str, args, device: torch.device, processes: int = 1) -> None:
    """runs/<run>/config.json: the arguments, the device (rank 0's, for a run of several `processes`, each with
    args.num_envs environments) and the versions a run was made with (plots read it)."""
    write_json(
        run_dir / "config.json",
        {
            "script": script,
            "args": dataclasses.asdict(args),
            "device": str(device),
            "device_name": device_name(device),
            "processes": processes,
            "versions": versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


# ----------------------------------------------------------------------------------------------------------------
# Signals: Ctrl-C or SIGTERM (a pre-empted job) finish the iteration, save, and exit
# ----------------------------------------------------------------------------------------------------------------
class StopRequest:
    """Catches SIGINT and SIGTERM: `signal` holds the first one received (None until then); a second one stops at
    once (the default handler comes back)."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signum
        signal.signal(signum, signal.SIG_DFL)
        print(
            f"\n{signal.Signals(signum).name}: finishing this iteration, then saving a checkpoint "
            "(send it again to stop at once)",
            flush=True,
        )


# ----------------------------------------------------------------------------------------------------------------
# Data-parallel training: processes launched by torchrun, one device each, talking through torch.distributed
# ----------------------------------------------------------------------------------------------------------------
class LostProcess(RuntimeError):
    """A collective failed: another process of the run died, was killed, or hung past the timeout."""


class ProcessesDiverged(RuntimeError):
    """The processes' copies of the policy, normalizer or optimizer differ (a bug: they must stay identical)."""


class Distributed:
    """This process's place in a data-parallel run, or the only process of a plain one.

    torchrun (`python -m torch.distributed.run`) starts the processes and gives each its WORLD_SIZE (processes in
    all), RANK (0 to WORLD_SIZE - 1) and LOCAL_RANK (its index on its machine, which picks its GPU); without them
    there is one process, no process group, and every method below returns at once. Each process steps its own
    environments on its own device and holds a whole copy of the policy. The copies stay identical: every process
    starts from rank 0's parameters (broadcast_) and takes the same step, from gradients averaged over all processes
    (average_), with observation statistics merged exactly (merge_moments). NCCL connects GPUs, gloo CPUs; on many
    machines it is the same code (torchrun's rendezvous finds the others).

    The collectives work in place on tensors of the process's device, with no host sync, so that a CUDA graph can
    record them (NCCL's can be captured; torch leaves captured ones out of its watchdog, torch PR 103503). Every
    collective of every process runs in the same order: the training loop calls them unconditionally. A collective
    that fails (another process died: torchrun then also sends SIGTERM to the rest) raises LostProcess; one that
    waits longer than `timeout_s` fails too (PPO_DIST_TIMEOUT_S, default 600 s: the others wait for rank 0's
    evaluations, videos and checkpoints, so it must exceed the longest of those)."""

    def __init__(self, world_size: int = 1, rank: int = 0, local_rank: int = 0, timeout_s: float = 600.0):
        self.world_size, self.rank, self.local_rank, self.timeout_s = world_size, rank, local_rank, timeout_s
        self.device = None
        self.failed = False  # a collective failed: the group is broken, leave it without a goodbye

    @classmethod
    def from_environment(cls, environ=None) -> Distributed:
        """torchrun's variables (none: a single process). Raises UserError, in a run of several processes, for a
        PPO_DIST_TIMEOUT_S that is not a positive number of seconds."""
        environ = os.environ if environ is None else environ
        sizes = [
            int(environ.get(name, default)) for name, default in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0))
        ]
        timeout = environ.get("PPO_DIST_TIMEOUT_S", "600")
        try:
            timeout_s = float(timeout)
        except ValueError:
            timeout_s = float("nan")
        if sizes[0] > 1 and not (math.isfinite(timeout_s) and timeout_s > 0):
            raise UserError(f"PPO_DIST_TIMEOUT_S={timeout}: give a positive number of seconds, e.g. 600")
        return cls(*sizes, timeout_s=timeout_s)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, evaluates, records videos and writes the run's files."""
        return self.rank == 0

    def choose_device(self, name: str | None) -> torch.device:
        """The device of this process: resolve_device(name) in a single process; in several, the GPU of its
        LOCAL_RANK ('auto' and 'cuda' both mean it) or the CPU. Raises UserError for 'cuda:N' (which would put every
        process on one GPU) and RankError for a LOCAL_RANK with no GPU of its own."""
        device = resolve_device(name)
        if self.world_size == 1 or device.type == "cpu":
            return device
        if name not in ("auto", "cuda"):
            raise UserError(
                f"--device {name} with {self.world_size} processes: each process takes the GPU of its LOCAL_RANK; "
                "give --device cuda (or auto), and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise RankError(
                f"rank {self.rank}: torchrun started local rank {self.local_rank} on a machine with {count} GPU(s): "
                f"use --nproc-per-node {count} or fewer"
            )
        return torch.device("cuda", self.local_rank)

    def start(self, device: torch.device) -> None:
        """Join the process group (NCCL on a GPU, gloo on the CPU), after every check of the input has passed."""
        held = _START_UP_SIGNALS.release() if _START_UP_SIGNALS is not None else None
        if held is not None:
            print(f"{signal.Signals(held).name} during start-up: stopped before training", flush=True)
            sys.exit(128 + held)
        if self.world_size == 1:
            return
        self.device = device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self._run(
            "start-up",
            torch.distributed.init_process_group,
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=self.timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        if device.type == "cuda":  # torch.compile (GPU only) traces the rollout step: run this as it is, as sim steps
            self.merge_moments = torch.compiler.disable(self.merge_moments)

    def broadcast_(self, *modules: torch.nn.Module) -> None:
        """Every parameter and buffer of `modules` set to rank 0's, in place."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for module in modules:
                for t in [*module.parameters(), *module.buffers()]:
                    self._run("broadcast", torch.distributed.broadcast, t.detach(), src=0)

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Each tensor replaced by its mean over the processes, in place, with one all_reduce over a flat copy of
        them all (one dtype, one device). No host sync: a CUDA graph records it."""
        self._flat_all_reduce(tensors, mean=True)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Each tensor replaced by its sum over the processes, in place, with one all_reduce (as average_)."""
        self._flat_all_reduce(tensors, mean=False)

    def _flat_all_reduce(self, tensors, mean: bool) -> None:
        if self.world_size == 1:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self._run("all_reduce", torch.distributed.all_reduce, flat)
        if mean:
            flat.div_(self.world_size)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    def merge_moments(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and the (population) variance of every process's batch together, from each process's batch mean
        and variance, for batches of one size: the mean of the means, and the mean of var + mean^2 less the square of
        that mean (Chan et al.'s merge of N equal parts). Summed in float64, so that the subtraction loses none of a
        float32 variance's digits (an observation near 1 that hardly varies). One all_reduce, no host sync."""
        if self.world_size == 1:
            return mean, var
        m = mean.double()
        moments = torch.stack([m, var.double() + m.square()])
        self._run("all_reduce", torch.distributed.all_reduce, moments)
        moments.div_(self.world_size)
        merged_mean = moments[0]
        return merged_mean.to(mean.dtype), (moments[1] - merged_mean.square()).clamp(min=0.0).to(var.dtype)

    def agree_on_signal(self, signum: int | None) -> int | None:
        """The stop signal that any process has received (the largest number if several), or None: every process
        gets the same answer, so that all stop after the same iteration and save one checkpoint together. A single
        process gets its own. One small all_reduce and a host sync, once per iteration."""
        if self.world_size == 1:
            return signum
        flag = torch.tensor([signum or 0], dtype=torch.int64, device=self.device)
        self._run("all_reduce", torch.distributed.all_reduce, flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None

    def checkpoint(self, payload: dict, own: dict, state: tuple) -> dict | None:
        """The checkpoint to write, on rank 0 (None on the others; every process must call this at the same
        iteration). It is `payload` (the same on every process: the policy, optimizer, normalizer and arguments),
        with rank 0's `own` entries (its environments and generators) at the top level as a single process writes
        them, every other process's in "other_processes" (rank 1 first), the number of processes, and every
        process's state_digest of `state` in "digests". Raises ProcessesDiverged on rank 0 when the digests differ."""
        if self.world_size > 1:
            own = _to_cpu(own)  # gathered by pickling: CPU tensors, which rank 0 can hold whatever their device
        mine = {**own, "digest": state_digest(*state)}
        gathered = [mine]
        if self.world_size > 1:
            gathered = [None] * self.world_size if self.is_main else None
            self._run("gather", torch.distributed.gather_object, mine, gathered, dst=0)
        if not self.is_main:
            return None
        digests = [g.pop("digest") for g in gathered]
        if len(set(digests)) > 1:
            raise ProcessesDiverged(
                f"the {self.world_size} processes' copies of the policy, normalizer and optimizer differ (state "
                f"digests by rank: {', '.join(digests)}): they must stay identical. Please report this as a bug"
            )
        return {
            **payload,
            **gathered[0],
            "processes": self.world_size,
            "other_processes": gathered[1:],
            "digests": digests,
        }

    def own_state(self, ckpt: dict, num_envs: int) -> dict | None:
        """This process's entries of a checkpoint (its environments and generators: see checkpoint) when it was
        written by as many processes of `num_envs` environments each; None otherwise (the environments start
        afresh)."""
        if "env" not in ckpt or ckpt["args"]["num_envs"] != num_envs or ckpt.get("processes", 1) != self.world_size:
            return None
        return ckpt if self.rank == 0 else ckpt["other_processes"][self.rank - 1]

    def stop(self) -> None:
        """Leave the process group at the end of a run: the recorded CUDA graphs released first (NCCL waits for
        them), and at most 30 s spent, so that a broken group cannot hold the process at exit."""
        if self.world_size == 1 or self.failed or not torch.distributed.is_initialized():
            return
        release_cuda_graphs()
        leave = threading.Thread(target=torch.distributed.destroy_process_group, daemon=True)
        leave.start()
        leave.join(timeout=30)

    def _run(self, what: str, collective, *args, **kwargs):
        try:
            return collective(*args, **kwargs)
        except RuntimeError as e:  # gloo's and NCCL's errors are RuntimeErrors (torch.distributed.DistError among them)
            capturing = (
                self.device is not None and self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            )
            if capturing:  # a failure to record it: a bug, with its own traceback
                raise
            self.failed = True
            cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise LostProcess(
                f"rank {self.rank} of {self.world_size}: lost the other processes of this run in {what} ({cause}). "
                "One of them stopped, died or hung: its own output, and torchrun's summary, say which; this one "
                "stops too. Resume from the run's checkpoints/latest.pt"
            ) from None


class _StartUpSignals:
    """Rank 0 of a run of several processes holds SIGINT and SIGTERM back from its first line until the process group
    starts. The processes check the same input, but when one exits on bad input torchrun sends SIGTERM to the rest at
    once, and rank 0, the one that reports bad input, must live to say it. A signal held back ends the process
    quietly at Distributed.start, before any process group work (torchrun kills it after 30 s in any case)."""

    def __init__(self):
        self.signal = None
        self._previous = {s: signal.signal(s, self._hold) for s in (signal.SIGINT, signal.SIGTERM)}

    def _hold(self, signum, _frame):
        self.signal = self.signal or signum

    def release(self) -> int | None:
        """Put the previous handlers back; the first signal held back, or None."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return self.signal


_START_UP_SIGNALS: _StartUpSignals | None = None
_DISTRIBUTED = None


def distributed() -> Distributed:
    """This process's Distributed, read once from torchrun's variables (see Distributed.from_environment)."""
    global _DISTRIBUTED
    if _DISTRIBUTED is None:
        _DISTRIBUTED = Distributed.from_environment()
    return _DISTRIBUTED


def state_digest(*objects) -> str:
    """A SHA-256 (16 hex digits) of every tensor in the state of `objects` (modules, optimizers or their
    state_dicts), keys and bytes: equal digests mean bit-for-bit equal states."""
    digest = hashlib.sha256()

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            digest.update(f"{prefix}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(data.tobytes())
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(f"{prefix}.{k}", value[k])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)

    for i, obj in enumerate(objects):
        walk(str(i), obj.state_dict() if hasattr(obj, "state_dict") else obj)
    return digest.hexdigest()[:16]


def _to_cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


def explained_variance(returns: torch.Tensor, values: torch.Tensor, dist: Distributed | None = None) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) (unbiased variances, the second at least 1e-8) over the rollouts of
    every process: float64 sums, one all_reduce in a run of several processes, no host sync. A 0-d float32 tensor."""
    r, e = returns.double().reshape(-1), (returns - values).double().reshape(-1)
    sums = torch.stack([torch.ones_like(r).sum(), r.sum(), r.square().sum(), e.sum(), e.square().sum()])
    if dist is not None:
        dist.sum_([sums])
    n, r1, r2, e1, e2 = sums.unbind()
    var_r, var_e = (r2 - r1 * r1 / n) / (n - 1), (e2 - e1 * e1 / n) / (n - 1)
    return (1 - var_e / var_r.clamp(min=1e-8)).float()


def _silence_stdout() -> None:
    """Send this process's standard output (Python's and C libraries' alike) to /dev/null: in a run of several
    processes rank 0 alone prints progress; errors still reach stderr."""
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


# ----------------------------------------------------------------------------------------------------------------
# Progress, faults and the training guard
# ----------------------------------------------------------------------------------------------------------------
def duration(seconds: float) -> str:
    """12.3 s, 4m05s or 1h02m: for progress lines."""
    if not np.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(seconds // 60)
    return f"{minutes}m{int(seconds % 60):02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def fault_note(stats: dict) -> str:
    """The iteration line's mention of simulation faults, only when there were any."""
    n, o = int(stats.get("nonfinite_resets", 0)), int(stats.get("overflows", 0))
    return f" | reset {n} blown-up, {o} overflowed" if n or o else ""


def wilson_interval(successes: float, trials: float, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (Wilson 1927; Brown, Cai and DasGupta 2001 recommend it
    for small counts): (low, high), the 95% interval with z = 1.96. (nan, nan) for no trials."""
    if trials <= 0:
        return float("nan"), float("nan")
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def run_main(main, args, args_cls, script: str, task_fields: tuple[str, ...]) -> None:
    """Adopt a checkpoint's arguments (adopt_checkpoint_args) and run main(args), turning bad input into one `error:`
    line on stderr and exit code 2 (UserError, or the device running out of memory), the loss of another process of
    the run into one line and exit code 4 (LostProcess), and processes that diverged into exit code 3; any other
    exception is a bug and shows its traceback. The process group, if any, is left at the end (Distributed.stop)."""
    dist = distributed()
    try:
        args = adopt_checkpoint_args(args, args_cls, script, task_fields)
        main(args)
    except UserError as e:
        if dist.is_main or isinstance(e, RankError):  # the others met the same input
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except LostProcess as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(4)
    except ProcessesDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    except Exception as e:
        if not out_of_memory(e):
            raise
        rank = f"rank {dist.rank}: " if dist.world_size > 1 else ""  # a device of its own: each says so
        print(
            f"error: {rank}out of memory with --num-envs {args.num_envs} ({str(e).splitlines()[0][:120]}): use a "
            "smaller --num-envs, e.g. half",
            file=sys.stderr,
        )
        sys.exit(2)
    finally:
        dist.stop()


def nonfinite_tensors(modules: dict[str, torch.nn.Module]) -> torch.Tensor:
    """A device bool: whether any parameter or buffer of these modules holds a NaN or an infinity (no host sync)."""
    flags = [
        ~torch.isfinite(t).all()
        for m in modules.values()
        for t in [*m.parameters(), *m.buffers()]
        if t.is_floating_point()
    ]
    return torch.stack(flags).any()


def nonfinite_names(modules: dict[str, torch.nn.Module]) -> list[str]:
    """The names of the parameters and buffers holding NaN or infinity (host side, for the error message)."""
    return [
        f"{name}.{n}"
        for name, m in modules.items()
        for n, t in [*m.named_parameters(), *m.named_buffers()]
        if t.is_floating_point() and not torch.isfinite(t).all()
    ]


def note_gpu_only_flags(args, device: torch.device) -> None:
    """Every printed line true for what was run: say that the GPU-only speed switches change nothing on the CPU."""
    if device.type == "cpu":
        off = [flag(f"no_{n}") for n in SPEED_FLAGS if not getattr(args, n)]
        if off:
            print(
                f"note: {', '.join(off)} change nothing on the CPU, which always runs plain eager float32", flush=True
            )


SPEED_FLAGS = ("compile", "cudagraphs", "tf32", "bf16")


def gpu_speed_flags(args, device: torch.device) -> dict[str, bool]:
    """Turn the GPU-only switches off on the CPU, so that args (and config.json) say what runs. Returns the switches
    as asked for: checkpoints keep those, so that a CPU run resumed on a GPU runs fast there."""
    requested = {name: getattr(args, name) for name in SPEED_FLAGS}
    if device.type != "cuda":
        for name in SPEED_FLAGS:
            setattr(args, name, False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    return requested


# ----------------------------------------------------------------------------------------------------------------
# Export: the policy with its normalizer, as TorchScript and ONNX, with the contract a robot's code needs to run it
# ----------------------------------------------------------------------------------------------------------------
CONTRACT_FORMAT = "isaac-ppo-policy/1"  # the contract's layout; changes when its keys or their meanings do


def deployed_policy(normalizer, actor, clip: float):
    """Raw observation (batch, num_obs) -> action (batch, num_actions): the normalizer folded in, the actor's mean
    (no sampling), clipped to [-clip, clip] as the environment clips it. A torch.nn.Module, for export_policy."""

    class DeployedPolicy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.normalizer, self.actor = normalizer, actor

        def forward(self, obs):
            return self.actor(self.normalizer(obs)).clamp(-clip, clip)

    return DeployedPolicy()


def launcher(dist) -> str:
    """The command that starts a run like this one: `python`, or torchrun with this run's number of processes (an
    exact resume needs as many)."""
    if dist.world_size == 1:
        return "python"
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1)  # torchrun's number of machines (agents)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
    if nodes > 1:
        return f"torchrun --nnodes {nodes} --node-rank <R> --rdzv-endpoint <HOST:PORT> --nproc-per-node {per_node}"
    return f"torchrun --standalone --nproc-per-node {per_node}"


def contract_io(observation_table, num_obs: int, nu: int, obs_clip: float) -> dict:
    """The part of an exported policy's contract that every task shares: its input and output tensors, the
    observation layout of `observation_table` (see observation_contract) and the folded-in normalizer."""
    return {
        "inputs": {"obs": {"shape": ["batch", num_obs], "dtype": "float32", "is": "the raw observation"}},
        "outputs": {"actions": {"shape": ["batch", nu], "dtype": "float32"}},
        "observation": observation_contract(observation_table, nu),
        "normalizer": {
            "folded_in": True,
            "clip": obs_clip,
            "is": "inside the network: feed raw observations; it subtracts the training mean, divides by the "
            "standard deviation and clips to +-clip",
        },
    }


def contract_provenance(checkpoint: str, script: str) -> dict:
    """Where an exported policy came from (checkpoint_source), the versions that made it, and when."""
    return {
        "source": checkpoint_source(checkpoint, script),
        "versions": versions(("torch", "mujoco", "mujoco-warp", "warp-lang", "onnx")),
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def observation_contract(layout, num_actions: int) -> list[dict]:
    """A script's observation table as the contract states it, in order: each term's name, its slice [start, stop)
    of the observation vector, size, units and meaning. `layout` holds (name, size, units, meaning) rows, a size of
    "nu" meaning one value per actuator (num_actions)."""
    entries, start = [], 0
    for name, size, units, meaning in layout:
        n = num_actions if size == "nu" else int(size)
        entries.append({"name": name, "slice": [start, start + n], "size": n, "units": units, "meaning": meaning})
        start += n
    return entries


def observation_size(layout, num_actions: int) -> int:
    """The length of the observation vector a table (see observation_contract) describes."""
    return observation_contract(layout, num_actions)[-1]["slice"][1]


def actuator_contract(mjm: mujoco.MjModel) -> dict:
    """The actuators in action order, read from the compiled model as it is simulated: each one's name, the joint it
    drives (name, index in qpos and in qvel), and its force law. MuJoCo's actuators with a fixed gain and an affine
    bias apply force = gear * clamp(gain * ctrl + bias[0] + bias[1] * q + bias[2] * qdot, force range), with ctrl
    clamped to its range first (MuJoCo documentation, "Actuation model"); a position servo (bias (0, -kp, -kd))
    is also stated by its kp (N m/rad) and kd (N m s/rad). Raises UserError for an actuator that drives no joint or
    whose gain or bias is not of that form."""
    t = mujoco.mjtTrn
    out = {k: [] for k in ("actuators", "joints", "qpos_index", "qvel_index", "kind", "gear", "gain", "bias")}
    out.update(joint_range=[], kp=[], kd=[], ctrl_range=[], force_range=[])
    for i in range(mjm.nu):
        name = mujoco.mj_id2name(mjm, mujoco.mjtObj.mjOBJ_ACTUATOR, i) or f"actuator{i}"
        fixed_gain = mjm.actuator_gaintype[i] == mujoco.mjtGain.mjGAIN_FIXED
        affine = int(mjm.actuator_biastype[i]) in (int(mujoco.mjtBias.mjBIAS_NONE), int(mujoco.mjtBias.mjBIAS_AFFINE))
        if mjm.actuator_trntype[i] != t.mjTRN_JOINT or not (fixed_gain and affine):
            raise UserError(f"actuator {name!r}: the export describes joint actuators of fixed gain and affine bias")
        joint = int(mjm.actuator_trnid[i, 0])
        gain, bias = float(mjm.actuator_gainprm[i, 0]), [float(b) for b in mjm.actuator_biasprm[i, :3]]
        servo = bias[0] == 0.0 and bias[1] == -gain != 0.0
        out["actuators"].append(name)
        out["joints"].append(mujoco.mj_id2name(mjm, mujoco.mjtObj.mjOBJ_JOINT, joint))
        out["qpos_index"].append(int(mjm.jnt_qposadr[joint]))
        out["qvel_index"].append(int(mjm.jnt_dofadr[joint]))
        out["joint_range"].append(mjm.jnt_range[joint].tolist() if mjm.jnt_limited[joint] else None)
        out["kind"].append("position servo" if servo else "motor" if bias[:2] == [0.0, 0.0] else "affine")
        out["gear"].append(float(mjm.actuator_gear[i, 0]))
        out["gain"].append(gain)
        out["bias"].append(bias)
        out["kp"].append(gain if servo else 0.0)
        out["kd"].append(-bias[2])
        out["ctrl_range"].append(mjm.actuator_ctrlrange[i].tolist() if mjm.actuator_ctrllimited[i] else None)
        out["force_range"].append(mjm.actuator_forcerange[i].tolist() if mjm.actuator_forcelimited[i] else None)
    out["force_law"] = (
        "force = gear * clamp(gain * ctrl + bias[0] + bias[1] * q + bias[2] * qdot, force_range), ctrl clamped to "
        "ctrl_range first; a position servo: force = kp * (ctrl - q) - kd * qdot, computed at every physics step"
    )
    return out


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoint_source(path: str, script: str) -> dict:
    """Where an exported policy comes from: the checkpoint's absolute path, its SHA-256, iteration and step, and the
    arguments it was trained with. UserError as load_checkpoint."""
    ckpt = load_checkpoint(path, torch.device("cpu"), script)
    return {
        "checkpoint": str(Path(path).resolve()),
        "sha256": file_sha256(path),
        "iteration": ckpt.get("iteration"),
        "global_step": ckpt.get("global_step"),
        "args": ckpt.get("args", {}),
    }


def export_policy(policy: torch.nn.Module, num_obs: int, out_dir: Path, contract: dict | None = None) -> list[Path]:
    """Write `policy` (on the CPU, in eval mode) to out_dir/policy.pt (TorchScript) and out_dir/policy.onnx (input
    "obs" (batch, num_obs) float32, output "actions"), and its `contract` (a JSON-able dict of sections) into the
    ONNX file's metadata_props (one entry per section, its value a JSON string) and beside it as policy.json. Each
    file is written to a temporary name, then renamed. Returns the paths written."""
    import copy

    out_dir.mkdir(parents=True, exist_ok=True)
    policy = copy.deepcopy(policy).cpu().eval()  # a copy: the caller's networks stay on their device
    example = torch.zeros(1, num_obs)
    written = [out_dir / "policy.pt"]
    tmp = out_dir / "policy.pt.tmp"
    torch.jit.trace(policy, example).save(str(tmp))
    os.replace(tmp, written[0])
    try:
        import onnx

        tmp = out_dir / "policy.onnx.tmp"
        torch.onnx.export(
            policy,
            (example,),
            str(tmp),
            input_names=["obs"],
            output_names=["actions"],
            dynamic_axes={"obs": {0: "batch"}},
            dynamo=False,
        )
        if contract is not None:
            model = onnx.load(str(tmp))
            for key, value in contract.items():
                model.metadata_props.add(key=key, value=json.dumps(finite_or_none(value)))
            onnx.save(model, str(tmp))
        os.replace(tmp, out_dir / "policy.onnx")
        written.append(out_dir / "policy.onnx")
    except Exception as e:  # noqa: BLE001 - ONNX is optional: TorchScript was written
        print(f"note: ONNX export skipped ({type(e).__name__}: {e}); pip install onnx to enable it")
    if contract is not None:
        write_json(out_dir / "policy.json", contract)
        written.append(out_dir / "policy.json")
    return written


class OnnxPolicy:
    """An exported policy run by onnxruntime from its .onnx file alone. `contract` is the dict stored in the file's
    metadata (the same as the policy.json beside it); calling the policy maps raw observations (N, num_obs) to
    actions (N, num_actions), torch tensors on the observations' device. One thread: the networks are small, and
    onnxruntime's spinning worker threads would take the cores the physics runs on. Raises UserError when the file
    is missing or unreadable, or carries no contract."""

    def __init__(self, path: str | os.PathLike):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - missing, truncated or not ONNX: one message
            raise UserError(f"cannot load the exported policy {path} ({type(e).__name__}): export it again") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "observation" not in meta:
            raise UserError(f"{path} carries no policy contract in its metadata: export it again with --export")
        self.contract = {k: json.loads(v) for k, v in meta.items()}

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        actions = self.session.run(["actions"], {"obs": obs.detach().to("cpu", torch.float32).numpy()})[0]
        return torch.from_numpy(actions).to(obs.device)


# ----------------------------------------------------------------------------------------------------------------
# A second simulator: MuJoCo's C engine behind BatchedSim's interface (sim-to-sim checks, the interactive viewer)
# ----------------------------------------------------------------------------------------------------------------
class CEngineSim:
    """The part of BatchedSim's interface that a task reads, over MuJoCo's C engine: one mujoco.MjData per world,
    stepped in turn on the CPU by mujoco.mj_step in float64, with the model's own solver settings. MuJoCo Warp plays
    no part: this is the independent simulator of sim-to-sim checks, and the viewer's (it steps the MjData the viewer
    draws). It is not fast: about 30 us per physics step of the Go1 on one core.

    qpos (N, nq), qvel (N, nv), ctrl (N, nu), act_force (N, nu) and contact_force (N, nbody, 3) mean what they mean in
    BatchedSim, as float32 tensors on `device`, but they are copies, not views: step() copies ctrl into every MjData,
    steps, and copies the new state back; reset() writes the worlds it resets. `datas[i]` is world i's MjData.
    MuJoCo's C engine would quietly reset a world whose accelerations blow up: that is turned off in `mjm`
    (mjDSBL_AUTORESET), so such a world turns non-finite and nonfinite() flags it, as in MuJoCo Warp. A world whose
    contact or constraint arena filled up (MuJoCo warns and drops what does not fit) is flagged by overflowed(). No
    exact body poses (poses must be False; xpos below) and no get_state()/set_state(). `nconmax` and `njmax` are
    MuJoCo Warp's buffer sizes, accepted and unused (the C engine sizes its own).

    xpos (N, nbody, 3): body positions after step(), one physics step behind qpos as mj_step leaves them (BatchedSim's
    with poses=False); stale after reset() until the next step().

    `models[i]` is world i's model (at first `mjm` for all): set_model() gives a world another one of the same
    bodies and joints, e.g. with its own terrain tile (place_tile), before the world's next reset.
    """

    def __init__(
        self,
        mjm: mujoco.MjModel,
        num_envs: int,
        device: torch.device | str,
        decimation: int = 1,
        nconmax: int | None = None,
        njmax: int | None = None,
        contact_forces: bool = False,
        poses: bool = False,
    ):
        if poses:
            raise ValueError("CEngineSim refreshes no body poses after a step (xpos lags one): pass poses=False")
        if int(num_envs) < 1:
            raise UserError(f"the number of environments must be at least 1, got {num_envs}")
        self.mjm, self.num_envs, self.decimation = mjm, int(num_envs), int(decimation)
        mjm.opt.disableflags |= mujoco.mjtDisableBit.mjDSBL_AUTORESET
        self.device = resolve_device(str(device))
        self.contact_forces = contact_forces
        self.models = [mjm] * self.num_envs
        self.datas = [mujoco.MjData(mjm) for _ in range(self.num_envs)]
        key = 0 if mjm.nkey else None
        qpos0 = mjm.key_qpos[key] if key is not None else mjm.qpos0
        ctrl0 = mjm.key_ctrl[key] if key is not None else np.zeros(mjm.nu)
        self.default_qpos = torch.tensor(qpos0, dtype=torch.float32, device=self.device)
        self.default_ctrl = torch.tensor(ctrl0, dtype=torch.float32, device=self.device)
        sizes = {"qpos": (mjm.nq,), "qvel": (mjm.nv,), "ctrl": (mjm.nu,), "act_force": (mjm.nu,)}
        sizes["contact_force"] = sizes["xpos"] = (mjm.nbody, 3)
        for name, shape in sizes.items():
            setattr(self, name, torch.zeros(self.num_envs, *shape, device=self.device))
        self._host = {name: np.zeros((self.num_envs, *shape)) for name, shape in sizes.items() if name != "ctrl"}
        self._full = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        self._full_warnings = (int(mujoco.mjtWarning.mjWARN_CONTACTFULL), int(mujoco.mjtWarning.mjWARN_CNSTRFULL))
        self._fill_counts = np.zeros(self.num_envs, dtype=np.int64)  # each world's _fills() after its last step
        all_envs = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        self.reset(
            all_envs, self.default_qpos.expand(self.num_envs, -1), ctrl=self.default_ctrl.expand(self.num_envs, -1)
        )

    def set_model(self, env_id: int, mjm: mujoco.MjModel) -> None:
        """World env_id steps `mjm` from its next reset on (a model of the same sizes nq, nv, nu, nbody)."""
        m = self.models[env_id]
        if (mjm.nq, mjm.nv, mjm.nu, mjm.nbody) != (m.nq, m.nv, m.nu, m.nbody):
            raise ValueError("set_model needs a model of the same bodies, joints and actuators")
        mjm.opt.disableflags |= mujoco.mjtDisableBit.mjDSBL_AUTORESET
        self.models[env_id] = mjm
        self.datas[env_id] = mujoco.MjData(mjm)

    def rays(self, pnt: torch.Tensor, vec: torch.Tensor, group: int) -> torch.Tensor:
        """BatchedSim.rays over MuJoCo's C engine: mujoco.mj_ray for each of the P rays of each world (N, P)."""
        mask = np.zeros(6, dtype=np.uint8)
        mask[group] = 1
        pnt, vec = pnt.to("cpu", torch.float64).numpy(), vec.to("cpu", torch.float64).numpy()
        dist, geomid = np.zeros(pnt.shape[:2]), np.zeros(1, dtype=np.int32)
        for i, (m, d) in enumerate(zip(self.models, self.datas)):
            for j in range(pnt.shape[1]):
                dist[i, j] = mujoco.mj_ray(m, d, pnt[i, j], vec[i, j], mask, 1, -1, geomid)
        return torch.tensor(dist, dtype=torch.float32, device=self.device)

    def _fills(self, d) -> int:
        """How often world d's contact or constraint arena was full so far."""
        contacts, constraints = self._full_warnings
        return d.warning[contacts].number + d.warning[constraints].number

    def step(self) -> None:
        """Advance every world by `decimation` physics steps (mj_step) with the current `ctrl`, held."""
        h = self._host
        ctrl = self.ctrl.to("cpu", torch.float64).numpy()
        full = np.zeros(self.num_envs, dtype=bool)
        for i, (m, d) in enumerate(zip(self.models, self.datas)):
            d.ctrl[:] = ctrl[i]
            mujoco.mj_step(m, d, nstep=self.decimation)
            if self.contact_forces:  # cfrc_ext of the last physics step, as MuJoCo Warp's run_rne_postconstraint
                mujoco.mj_rnePostConstraint(m, d)
                h["contact_force"][i] = d.cfrc_ext[:, 3:6]  # (torque, force) at the body's centre of mass
            fills = self._fills(d)
            full[i], self._fill_counts[i] = fills > self._fill_counts[i], fills
            h["qpos"][i], h["qvel"][i], h["act_force"][i], h["xpos"][i] = d.qpos, d.qvel, d.actuator_force, d.xpos
        for name, values in h.items():
            getattr(self, name).copy_(torch.from_numpy(values))
        self._full |= torch.from_numpy(full).to(self.device)

    def reset(
        self, envs: torch.Tensor, qpos: torch.Tensor, qvel: torch.Tensor | None = None, ctrl: torch.Tensor | None = None
    ) -> None:
        """Put the worlds in `envs` at (qpos, qvel) with `ctrl`, as BatchedSim.reset (a bool mask (N,) with full-size
        rows, or a long tensor of ids with one row each); each such world's MjData starts afresh (mj_resetData:
        no warm start, no applied forces), then mj_forward computes its poses for a viewer."""
        if envs.dtype != torch.bool:
            mask = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device).index_fill_(0, envs, True)
            qpos = self.qpos.clone().index_copy_(0, envs, qpos.float())
            qvel = None if qvel is None else self.qvel.clone().index_copy_(0, envs, qvel.float())
            ctrl = None if ctrl is None else self.ctrl.clone().index_copy_(0, envs, ctrl.float())
        else:
            mask = envs
        rows = mask.unsqueeze(-1)
        self.qpos.copy_(torch.where(rows, qpos, self.qpos))
        self.qvel.copy_(torch.where(rows, 0.0 if qvel is None else qvel, self.qvel))
        if ctrl is not None:
            self.ctrl.copy_(torch.where(rows, ctrl, self.ctrl))
        self._full.masked_fill_(mask, False)
        host = [t.to("cpu", torch.float64).numpy() for t in (self.qpos, self.qvel, self.ctrl)]
        for i in mask.nonzero()[:, 0].tolist():
            m, d = self.models[i], self.datas[i]
            mujoco.mj_resetData(m, d)  # warnings too
            self._fill_counts[i] = 0
            d.qpos[:], d.qvel[:], d.ctrl[:] = host[0][i], host[1][i], host[2][i]
            mujoco.mj_forward(m, d)  # computes no warm start: the next mj_step is as without it

    nonfinite = BatchedSim.nonfinite  # (N,) bool: worlds whose state holds a NaN or an infinity

    def overflowed(self) -> torch.Tensor:
        """(N,) bool: worlds whose contact or constraint arena filled up since their last reset."""
        return self._full.clone()

    body_id, site_id, geom_id, _id = BatchedSim.body_id, BatchedSim.site_id, BatchedSim.geom_id, BatchedSim._id


# ----------------------------------------------------------------------------------------------------------------
# MuJoCo's interactive viewer, passive: the script steps the physics, the viewer draws it
# ----------------------------------------------------------------------------------------------------------------
def check_display(flag_name: str) -> None:
    """UserError when no window can open because no display is set (Linux without DISPLAY or WAYLAND_DISPLAY)."""
    if platform.system() == "Linux" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise UserError(
            f"{flag_name} opens a window, but there is no display here (neither DISPLAY nor WAYLAND_DISPLAY is set): "
            "run it on a desktop or over `ssh -X`, or record a video instead with --eval --capture-video"
        )


@contextlib.contextmanager
def viewer_window(mjm: mujoco.MjModel, data: mujoco.MjData, key_callback=None):
    """MuJoCo's viewer (mujoco.viewer.launch_passive) on (mjm, data) for the duration of a `with` block, its side
    panels hidden (Tab and Shift-Tab show them). Yields the viewer's Handle: step `data` inside `handle.lock()`, then
    call `handle.sync()` to draw; `handle.is_running()` turns False when the window is closed. key_callback(keycode)
    gets every key press (GLFW key codes), on the viewer's thread. Raises UserError when no window can open: GLFW is
    started here first, because launch_passive opens the window in a thread of its own and, if that fails, waits for
    it forever. On leaving, the window is closed and its thread joined (a process that exits while that thread still
    draws dies of an X error)."""
    import glfw
    import mujoco.viewer

    check_display("--viewer")
    reporting, glfw.ERROR_REPORTING = glfw.ERROR_REPORTING, "ignore"  # the failure is reported below, in one line
    try:
        started, (_, why) = glfw.init(), glfw.get_error()
    finally:
        glfw.ERROR_REPORTING = reporting
    if not started:
        reason = why.decode(errors="replace") if why else "GLFW could not start"
        raise UserError(f"--viewer cannot open a window ({reason}): check DISPLAY, or use --eval --capture-video")
    before = set(threading.enumerate())
    try:
        handle = mujoco.viewer.launch_passive(
            mjm, data, key_callback=key_callback, show_left_ui=False, show_right_ui=False
        )
    except RuntimeError as e:  # macOS: the passive viewer needs the mjpython launcher
        raise UserError(f"--viewer: {e}") from None
    threads = [t for t in threading.enumerate() if t not in before]
    if (mjm.geom_group == TERRAIN_GROUP).any():  # a terrain's boxes: MuJoCo shows groups 0-2 only by default
        with handle.lock():
            handle.opt.geomgroup[TERRAIN_GROUP] = 1
    try:
        yield handle
    finally:
        handle.close()
        for thread in threads:
            thread.join(timeout=10)


# ----------------------------------------------------------------------------------------------------------------
# Forking safety: carried state written in place (a CUDA graph replays the buffers it recorded)
# ----------------------------------------------------------------------------------------------------------------
def tensor_storages(obj) -> dict[str, int]:
    """{attribute path: data pointer} of every tensor an object holds (directly, or in dicts and lists of them)."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            out[prefix] = value.untyped_storage().data_ptr()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}[{k!r}]", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)

    for name, value in vars(obj).items():
        walk(name, value)
    return out


def rebound_state(obj, step) -> list[str]:
    """Run `step()` twice and list the tensors of `obj` whose storage changed or that appeared: state that a step
    rebinds (`self.x = ...`) instead of writing in place (`self.x.copy_(...)`). Inside a recorded CUDA graph such a
    tensor is never updated and the next step reads a stale buffer, with no error."""
    step()  # the first call may create lazily allocated state
    before = tensor_storages(obj)
    step()
    after = tensor_storages(obj)
    return sorted(k for k in after if before.get(k) != after[k])
