"""``gptscale-plot RUN_DIR [RUN_DIR ...] [--out FILE.png] [--smooth N]``: loss, gradient norm, learning rate,
tokens/s and task accuracy of one run or several side by side (a sweep), from their metrics.jsonl, and where
their wall time went, from their goodput.jsonl (``gptscale-goodput``).

Steps skipped as loss spikes are marked on the loss curve (red x at the loss they had), rewinds as dashed
lines at the step they went back to."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from matplotlib.figure import Figure

from gptscale.tracking.goodput import GOODPUT, PARTS, replay
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
    rewinds = [
        (record["rewind/from_step"], record["step"]) for record in records if record.get("rewind/from_step") is not None
    ]
    return skipped, rewinds


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (1: the values as logged)."""
    if window <= 1:
        return values
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def plot(
    runs: dict[str, list[dict]],
    out: Path,
    title: str,
    smooth: int = 1,
    goodputs: Optional[dict[str, dict[str, float]]] = None,
) -> None:
    """Draw every run on the same axes (one colour each), and below them where each run's wall time went when
    ``goodputs`` has the runs' parts; write the PNG under a temporary name, then rename it into place, so a
    reader never sees half a file."""
    accuracies = sorted(
        {
            key
            for records in runs.values()
            for record in records
            for key in record
            if key.startswith("eval/") and key.endswith("/acc")
        }
    )
    rows = 5 if accuracies else 4
    bars = 1 + len(goodputs) // 2 if goodputs else 0
    figure = Figure(figsize=(8, 3 * rows + bars), layout="constrained")
    every_axes = figure.subplots(rows + (1 if bars else 0), 1, height_ratios=[3] * rows + ([bars] if bars else []))
    panels = every_axes[:rows]
    for axes in panels[1:]:
        axes.sharex(panels[0])
    for axes in panels[:-1]:
        axes.tick_params(labelbottom=False)
    if goodputs:
        draw_goodput(every_axes[rows], goodputs)
    loss_axes, norm_axes, lr_axes, speed_axes = panels[:4]
    several = len(runs) > 1
    for index, (name, records) in enumerate(runs.items()):
        colour = f"C{index % 10}"
        label = f"{name} " if several else ""
        steps, losses = _series(records, "loss")
        loss_axes.plot(steps, smoothed(losses, smooth), color=colour, label=f"{label}train")
        if any("eval_loss" in record for record in records):
            loss_axes.plot(
                *_series(records, "eval_loss"), color=colour, marker="o", linestyle=":", label=f"{label}eval"
            )
        skipped, rewinds = spike_marks(records)
        if skipped[0]:
            loss_axes.scatter(
                *skipped, marker="x", color="red", zorder=3, label=f"{label}skipped spike ({len(skipped[0])})"
            )
        for number, (from_step, to_step) in enumerate(rewinds):
            loss_axes.axvline(
                to_step,
                color=colour,
                linestyle="--",
                alpha=0.7,
                label=f"{label}rewind (from step → to here)" if number == 0 else None,
            )
            loss_axes.annotate(
                f"{from_step}→{to_step}",
                (to_step, 1.0),
                xycoords=("data", "axes fraction"),
                va="top",
                fontsize=8,
                color=colour,
            )
        steps, norms = _series(records, "grad_norm")
        norm_axes.plot(steps, smoothed(norms, smooth), color=colour, label=name)
        lr_axes.plot(*_series(records, "lr"), color=colour, label=name)
        speed_axes.plot(*_series(records, "tokens_per_s"), color=colour, label=name)
        for key_index, key in enumerate(accuracies):
            panels[4].plot(
                *_series(records, key),
                marker="o",
                color=colour,
                linestyle=["-", "--", ":", "-."][key_index % 4],
                label=f"{label}{key.split('/')[1]}",
            )
    loss_axes.set_ylabel("loss" + (f" (mean of {smooth})" if smooth > 1 else ""))
    loss_axes.legend(fontsize=8)
    norm_axes.set_ylabel("gradient norm")
    norm_axes.set_yscale("log")
    lr_axes.set_ylabel("learning rate")
    speed_axes.set_ylabel("tokens/s")
    if accuracies:
        panels[4].set_ylabel("accuracy")
        panels[4].set_ylim(0, 1)
        panels[4].legend(fontsize=8)
    panels[-1].set_xlabel("step")
    for axes in panels:
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    partial = out.with_name(f".{out.name}.partial")
    figure.savefig(partial, format="png", dpi=100)
    os.replace(partial, out)


PART_COLOURS = {
    "productive": "tab:green",
    "lost": "tab:red",
    "startup": "tab:gray",
    "checkpoint": "tab:blue",
    "eval": "tab:purple",
    "hang": "black",
    "down": "lightgray",
}


def draw_goodput(axes, goodputs: dict[str, dict[str, float]]) -> None:
    """One horizontal bar per run: its wall time split into the parts of ``gptscale-goodput``, and its goodput."""
    names = list(goodputs)
    left = [0.0] * len(names)
    for part, label in PARTS.items():
        seconds = [goodputs[name][part] for name in names]
        axes.barh(names, seconds, left=left, color=PART_COLOURS[part], label=label)
        left = [start + width for start, width in zip(left, seconds)]
    for name, wall in zip(names, left):
        if wall > 0:
            axes.annotate(f" goodput {goodputs[name]['productive'] / wall:.0%}", (wall, name), va="center", fontsize=8)
    axes.set_xlabel("wall time (s)")
    axes.set_title("where the wall time went (gptscale-goodput)", fontsize=10)
    axes.legend(fontsize=7, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.35))


def run_dirs(paths: list[Path]) -> list[Path]:
    """The runs named: a run directory itself, or a directory of runs (a sweep's multirun/) for each run in it."""
    found = []
    for path in paths:
        if (path / METRICS).is_file():
            found.append(path)
        else:
            found += sorted(sub for sub in path.glob("*") if (sub / METRICS).is_file()) if path.is_dir() else []
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gptscale-plot", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument(
        "run_dir",
        type=Path,
        nargs="+",
        help="gptscale run directories (each holds metrics.jsonl), or a sweep's directory of runs",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="the PNG to write (default: metrics.png in the run directory, or in the directory the runs share)",
    )
    parser.add_argument(
        "--smooth",
        type=int,
        default=1,
        metavar="N",
        help="draw loss and gradient norm as the mean of the last N logged points",
    )
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth must be at least 1, got {args.smooth}")
    found = run_dirs(args.run_dir)
    if not found:
        parser.error(
            f"no {METRICS} in {', '.join(map(str, args.run_dir))}: give the run_dir of a gptscale run "
            "(or a directory of runs)"
        )
    shared = Path(os.path.commonpath([str(run) for run in found]))
    runs, goodputs = {}, {}
    for run in found:
        records = read_metrics(run / METRICS)
        if not any(record.get("loss") is not None for record in records):
            parser.error(f"{run / METRICS} has no training steps yet")
        name = str(run.relative_to(shared)) if len(found) > 1 else str(run)
        runs[name] = records
        if (run / GOODPUT).is_file():
            goodputs[name] = replay(run).parts()
    out = args.out or shared / "metrics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    title = str(found[0]) if len(found) == 1 else f"{len(found)} runs in {shared}"
    plot(runs, out, title, smooth=args.smooth, goodputs=goodputs)
    print(out)


if __name__ == "__main__":
    main()
