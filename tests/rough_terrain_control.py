"""The rough-terrain control run (a tool run by hand, not collected): ppo_isaac_locomotion.py --terrain rough on a
terrain whose every tile is flat, stepped on a MuJoCo heightfield ("hfield") or, with the same code, observations and
curriculum, on go1.xml's plane ("plane"). README: Rough terrain.

    python tests/rough_terrain_control.py plane --terrain rough --no-compile --num-iterations 600
    python tests/rough_terrain_control.py hfield --terrain rough --no-compile --num-iterations 600
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if len(sys.argv) < 2 or sys.argv[1] not in ("plane", "hfield"):
    sys.exit("usage: python tests/rough_terrain_control.py plane|hfield [ppo_isaac_locomotion.py's arguments]")
mode = sys.argv.pop(1)
sys.argv[0] = "ppo_isaac_locomotion.py"
import envs_common as ec  # noqa: E402
import ppo_isaac_locomotion as loco  # noqa: E402

loco.terrain_tile = lambda kind, difficulty, shape, hscale, rng: np.zeros(shape, np.float32)  # every tile flat
if mode == "plane":
    ec.add_terrain = lambda path, terrain: ec.load_model(path)  # go1.xml's plane instead of the heightfield
args = ec.read_command_line(loco.Args, loco.check_args)
if args.terrain != "rough":
    sys.exit("error: the control run compares terrains: add --terrain rough")
ec.run_main(loco.main, args, loco.Args, loco.SCRIPT, loco.TASK_ARGS)
