"""``gptscale-plot RUN_DIR [--out FILE.png]``: loss, learning rate, tokens/s and task accuracy of a run, from its
metrics.jsonl.

Steps skipped as loss spikes are marked on the loss curve (red x at the loss they had), rewinds as dashed
lines at the step they went back to."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from matplotlib.figure import Figure

from gptscale.tracking.jsonl import METRICS


def read_metrics(path: Path) -> list[dict]:
    """One merged record per step, in step order.

    A step can have several lines (its training metrics, then its eval loss) and a resumed run logs again the
    steps after its checkpoint; the line written last wins. A line cut short by a killed run is skipped.
    """
    by_step: dict[int, dict] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"gptscale-plot: skipping line {number} of {path}: not JSON", file=sys.stderr)
            continue
        by_step.setdefault(record["step"], {}).update(record)
    return [by_step[step] for step in sorted(by_step)]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(record["step"], record[key]) for record in records if record.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


def spike_marks(records: list[dict]) -> tuple[tuple[list[int], list[float]], list[tuple[int, int]]]:
    """Steps skipped as spikes with the loss they had, and rewinds as (from step, step resumed at)."""
    skipped = _series([record for record in records if record.get("spike/skipped_step")], "spike/loss")
    rewinds = [(record["rewind/from_step"], record["step"]) for record in records
               if record.get("rewind/from_step") is not None]
    return skipped, rewinds


def plot(records: list[dict], out: Path, title: str) -> None:
    """Write the PNG next to ``out`` and rename it into place, so a reader never sees half a file."""
    accuracies = sorted({key for record in records for key in record if key.startswith("eval/") and key.endswith("/acc")})
    figure = Figure(figsize=(8, 12 if accuracies else 9), layout="constrained")
    panels = figure.subplots(4 if accuracies else 3, 1, sharex=True)
    loss_axes, lr_axes, speed_axes = panels[:3]
    loss_axes.plot(*_series(records, "loss"), label="train")
    if any("eval_loss" in record for record in records):
        loss_axes.plot(*_series(records, "eval_loss"), marker="o", label="eval")
    skipped, rewinds = spike_marks(records)
    if skipped[0]:
        loss_axes.scatter(*skipped, marker="x", color="red", zorder=3, label=f"skipped spike ({len(skipped[0])})")
    for index, (from_step, to_step) in enumerate(rewinds):
        loss_axes.axvline(to_step, color="purple", linestyle="--", alpha=0.7,
                          label="rewind (from step → to here)" if index == 0 else None)
        loss_axes.annotate(f"{from_step}→{to_step}", (to_step, 1.0), xycoords=("data", "axes fraction"), va="top",
                           fontsize=8, color="purple")
    loss_axes.set_ylabel("loss")
    loss_axes.legend()
    lr_axes.plot(*_series(records, "lr"))
    lr_axes.set_ylabel("learning rate")
    speed_axes.plot(*_series(records, "tokens_per_s"))
    speed_axes.set_ylabel("tokens/s")
    if accuracies:
        for key in accuracies:
            panels[3].plot(*_series(records, key), marker="o", label=key.split("/")[1])
        panels[3].set_ylabel("accuracy")
        panels[3].set_ylim(0, 1)
        panels[3].legend()
    panels[-1].set_xlabel("step")
    for axes in panels:
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    partial = out.with_name(f".{out.name}.partial")
    figure.savefig(partial, format="png", dpi=100)
    os.replace(partial, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gptscale-plot", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("run_dir", type=Path, help="a gptscale run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="the PNG to write (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    metrics = args.run_dir / METRICS
    if not metrics.is_file():
        parser.error(f"{metrics} does not exist: RUN_DIR must be the run_dir of a gptscale run")
    records = read_metrics(metrics)
    if not any(record.get("loss") is not None for record in records):
        parser.error(f"{metrics} has no training steps yet")
    out = args.out or args.run_dir / "metrics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(records, out, title=str(args.run_dir))
    print(out)


if __name__ == "__main__":
    main()
