"""Tracking error and falls against wall-clock seconds from a locomotion run's TensorBoard events (a tool run by
hand; pytest does not collect it).

    python tests/plot_learning_curve.py runs/<run> assets/locomotion_curve.png

The title names the run's script, its number of environments and its device: from runs/<run>/config.json when the
run wrote one, else from the arguments the run logged to TensorBoard, else the folder's name. A resumed run's clock
starts again at its own start-up; its curve goes on from where the interrupted one stopped (stitch_wall_time).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def stitch_wall_time(wall: dict[int, float]) -> dict[int, float]:
    """Wall-clock seconds by global step, made continuous across resumes.

    Each process logs the seconds since its own start, so where a resumed run takes over, the time goes back. From
    that step on, its times are shifted by the time reached at the step before: the resumed process's start-up
    and iterations come after the interrupted one's, and the x axis only goes forward."""
    stitched, offset, last_raw, last = {}, 0.0, None, 0.0
    for step in sorted(wall):
        if last_raw is not None and wall[step] < last_raw:  # a new process: its clock restarted
            offset = last
        stitched[step] = last = wall[step] + offset
        last_raw = wall[step]
    return stitched


def shift_like(times: dict[int, float], raw: dict[int, float], stitched: dict[int, float]) -> dict[int, float]:
    """Apply to other wall-clock scalars (the evaluations') the shift that stitch_wall_time gave the latest
    training step at or before each of their steps: both were measured by the same process."""
    steps = sorted(stitched)
    out = {}
    for step, t in times.items():
        before = [s for s in steps if s <= step]
        out[step] = t + (stitched[before[-1]] - raw[before[-1]] if before else 0.0)
    return out


def logged_hyperparameters(accumulator) -> dict[str, str]:
    """The last "hyperparameters" table the run logged (the scripts log `|param|value|` rows at each start)."""
    tags = [t for t in accumulator.Tags().get("tensors", []) if t.startswith("hyperparameters")]
    if not tags:
        return {}
    text = accumulator.Tensors(tags[0])[-1].tensor_proto.string_val[0].decode()
    rows = [line.strip().strip("|").split("|", 1) for line in text.splitlines()]
    return {k.strip(): v.strip() for k, v in (r for r in rows if len(r) == 2) if k.strip() not in ("param", "-")}


def run_title(run_dir: Path, hyperparameters: dict[str, str]) -> str:
    """The title "<script>.py, <N> envs, <device>": from config.json, else the logged arguments, else the folder."""
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    args = config.get("args", {})
    script = config.get("script") or args.get("exp_name") or hyperparameters.get("exp_name")
    num_envs = args.get("num_envs") or hyperparameters.get("num_envs")
    device = config.get("device_name") or config.get("device")
    if not device and hyperparameters.get("device"):
        device = f"--device {hyperparameters['device']}"  # what was asked for: 'auto' is the GPU if there was one
    if script and num_envs and device:
        return f"{str(script).removesuffix('.py')}.py, {num_envs} envs, {device}"
    return run_dir.name


def main(argv: list[str] | None = None) -> None:
    """Read the run's events and write the plot."""
    parser = argparse.ArgumentParser(
        description="Plot a locomotion run's tracking error and falls (and, on rough terrain, the curriculum's mean "
        "level) against wall-clock seconds (resumed runs stitched into one curve)."
    )
    parser.add_argument("run", type=Path, help="the run folder, runs/<run>")
    parser.add_argument("out", type=Path, help="the image to write, e.g. assets/locomotion_curve.png")
    args = parser.parse_args(argv)
    if not args.run.is_dir():
        parser.error(f"{args.run} is not a run folder")

    import matplotlib  # only now: the usage message needs neither matplotlib nor TensorBoard

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(args.run), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    s = {t: {e.step: e.value for e in ea.Scalars(t)} for t in ea.Tags()["scalars"]}
    needed = ["perf/wall_time", "metrics/lin_vel_error"]
    if any(tag not in s for tag in needed):
        parser.error(
            f"{args.run} has no {' or '.join(t for t in needed if t not in s)} scalars: this plots the "
            "TensorBoard events of a ppo_isaac_locomotion.py run"
        )
    wall = stitch_wall_time(s["perf/wall_time"])
    steps = sorted(set(wall) & set(s["metrics/lin_vel_error"]))
    eval_wall = shift_like(s.get("eval/wall_time", {}), s["perf/wall_time"], wall)
    ev = sorted(set(eval_wall) & set(s.get("eval/lin_vel_error", {})))

    rough = "curriculum/mean_level" in s  # --terrain rough: the curriculum's mean level in a second panel
    if rough:
        fig, (ax, level_ax) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, height_ratios=(3, 2))
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        [wall[k] for k in steps],
        [s["metrics/lin_vel_error"][k] for k in steps],
        lw=1,
        alpha=0.6,
        label="training rollouts (stochastic policy)",
    )
    ax.plot(
        [eval_wall[k] for k in ev],
        [s["eval/lin_vel_error"][k] for k in ev],
        "o-",
        label="evaluation (deterministic, fresh commands)",
    )
    ax.axhline(0.2, color="gray", ls="--", lw=1, label="bar: 0.2 m/s and 2% falls")
    ax.set_xlabel("wall-clock seconds since start-up (a resumed run goes on from where it stopped)")
    ax.set_ylabel("linear velocity tracking error (m/s)")
    title = run_title(args.run, logged_hyperparameters(ea))
    ax.set_title(title)
    lines = ax.get_legend_handles_labels()[0]
    if "eval/fall_rate" in s:
        falls = ax.twinx()  # the fall rate of the same evaluations, on its own scale
        fall_steps = [k for k in ev if k in s["eval/fall_rate"]]
        falls.plot(
            [eval_wall[k] for k in fall_steps],
            [100 * s["eval/fall_rate"][k] for k in fall_steps],
            "s:",
            color="tab:red",
            ms=4,
            label="evaluation falls (%)",
        )
        falls.axhline(2.0, color="tab:red", ls="--", lw=0.8)
        falls.set_ylabel("falls in evaluation (% of episodes)", color="tab:red")
        falls.set_ylim(0, 10)
        lines += falls.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines])
    if rough:
        level_steps = sorted(set(wall) & set(s["curriculum/mean_level"]))
        level_ax.plot([wall[k] for k in level_steps], [s["curriculum/mean_level"][k] for k in level_steps], lw=1.2)
        top = max(int(k.rsplit("/", 1)[1]) for k in s if k.startswith("curriculum/level_fraction/"))
        level_ax.axhline(0.6 * top, color="gray", ls="--", lw=1, label=f"bar: 60% of the top level ({top})")
        level_ax.set_ylim(0, top)
        level_ax.set_ylabel("curriculum: mean level")
        level_ax.set_xlabel(ax.get_xlabel())
        level_ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110, metadata={"Title": title})  # in a PNG's text too, where tests can read it
    print(f"wrote {args.out}: {title}, {len(steps)} iterations, {len(ev)} evaluations")


if __name__ == "__main__":
    main()
