"""Tracking error against wall-clock seconds from a run's TensorBoard events (run by hand, not collected by pytest).

    python tests/plot_learning_curve.py runs/<run> assets/locomotion_curve.png
"""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

run, out = sys.argv[1], sys.argv[2]
ea = EventAccumulator(run, size_guidance={"scalars": 0})
ea.Reload()
s = {t: {e.step: e.value for e in ea.Scalars(t)} for t in ea.Tags()["scalars"]}
wall = s["perf/wall_time"]
steps = sorted(set(wall) & set(s["metrics/lin_vel_error"]))
ev = sorted(s["eval/wall_time"])
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot([wall[k] for k in steps], [s["metrics/lin_vel_error"][k] for k in steps], lw=1, alpha=0.6,
        label="training rollouts (stochastic policy)")
ax.plot([s["eval/wall_time"][k] for k in ev], [s["eval/lin_vel_error"][k] for k in ev], "o-",
        label="evaluation (deterministic, fresh commands)")
ax.axhline(0.2, color="gray", ls="--", lw=1, label="bar: 0.2 m/s and 2% falls")
ax.set_xlabel("wall-clock seconds since process start (start-up included)")
ax.set_ylabel("linear velocity tracking error (m/s)")
ax.set_title("ppo_isaac_locomotion.py, 4096 envs, one H100")
falls = ax.twinx()  # the fall rate of the same evaluations, on its own scale
falls.plot([s["eval/wall_time"][k] for k in ev], [100 * s["eval/fall_rate"][k] for k in ev], "s:", color="tab:red",
           ms=4, label="evaluation falls (%)")
falls.axhline(2.0, color="tab:red", ls="--", lw=0.8)
falls.set_ylabel("falls in evaluation (% of episodes)", color="tab:red")
falls.set_ylim(0, 10)
lines = ax.get_legend_handles_labels()[0] + falls.get_legend_handles_labels()[0]
ax.legend(lines, [h.get_label() for h in lines])
fig.tight_layout()
fig.savefig(out, dpi=110)
print(f"wrote {out}")
