"""Where a run's wall time went: RUN_DIR/goodput.jsonl, kept across restarts and requeues.

Rank 0 of each attempt (each start of the training processes) appends one record per phase it finishes: the
process start, set-up (checkpoint loading included), each step, each evaluation, each checkpoint stall. A
record holds when its phase ended, so the records of an attempt tile its time from the process start to its
last record. Replaying them (``Goodput``) splits the wall time, first start to last record, into ``PARTS``:

- a step trained again (a restart or a spike rewind went back to an older checkpoint) moves its earlier
  time from productive to lost; which steps those are, only the next attempt's resume step says, so
  the records, not any checkpoint, are the source;
- the time between one attempt's last record and the next start is either a hang before its detection (the
  span ``last_progress_at`` to ``detected_at`` of RUN_DIR/faults/hang-*.json reports) or down time.

Every second of the wall time is in exactly one part. A line cut short by a killed process is skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import psutil

from gptscale.tracking.console import duration

log = logging.getLogger("gptscale")

GOODPUT = "goodput.jsonl"
HANG_REPORTS = "faults/hang-*.json"
PHASES = ("step", "eval", "checkpoint")  # what ``GoodputLog.mark`` records, besides the start and set-up
PARTS = {
    "productive": "productive training",
    "lost": "lost: steps trained again",
    "startup": "start-up and checkpoint loading",
    "checkpoint": "checkpoint stalls",
    "eval": "evaluation",
    "hang": "hangs before detection",
    "down": "down: between attempts",
}


def read_records(path: Path) -> list[dict]:
    """The records of ``path`` in order; a line that is not a whole record (a killed writer's) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if _whole(record):
            records.append(record)
    return records


def _whole(record) -> bool:
    if not isinstance(record, dict) or record.get("phase") not in ("start", "startup", *PHASES):
        return False
    when = record.get("at" if record["phase"] == "start" else "end")
    return isinstance(when, (int, float)) and (record["phase"] != "step" or isinstance(record.get("step"), int))


def hang_spans(run_dir: Path) -> list[tuple[float, float]]:
    """(last progress, detection) of every hang report in the run, in time order, overlapping ones merged."""
    spans = []
    for path in sorted(run_dir.glob(HANG_REPORTS)):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            spans.append((float(report["last_progress_at"]), float(report["detected_at"])))
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("goodput: ignoring hang report %s (%s)", path, error)
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@dataclass
class Attempt:
    started_at: float
    host: str
    resumed_from: Optional[int] = None  # the checkpoint step it resumed from; None: from scratch
    first_step: Optional[int] = None
    last_step: Optional[int] = None
    ended_at: float = 0.0
    finished: bool = False  # reached the end of training (its final checkpoint saved)


@dataclass
class Goodput:
    """The replay of a run's records: seconds per part, and the attempts. Feed records in order to ``add``."""

    hangs: list[tuple[float, float]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    attempts: list[Attempt] = field(default_factory=list)
    lost_steps: int = 0
    first_kept: int = 1  # the kept steps' times, first_kept onwards: the last training of each step
    kept: array = field(default_factory=lambda: array("d"))

    def add(self, record: dict) -> None:
        phase = record["phase"]
        if phase == "start":
            if self.attempts:
                self._between(self.attempts[-1].ended_at, record["at"])
            self.attempts.append(Attempt(record["at"], record.get("host", "?"), ended_at=record["at"]))
            return
        if not self.attempts:
            return
        attempt = self.attempts[-1]
        seconds = record["end"] - attempt.ended_at
        attempt.ended_at = record["end"]
        if phase == "step":
            self._step(record["step"], seconds)
            attempt.first_step = attempt.first_step or record["step"]
            attempt.last_step = record["step"]
            return
        self.seconds[phase] += seconds
        if phase == "startup":
            attempt.resumed_from = record.get("resumed")
            self._resume(attempt.resumed_from or 0)
        attempt.finished = bool(record.get("finished"))

    def _between(self, start: float, end: float) -> None:
        """Time no process recorded: hangs before their detection, the rest down time."""
        hung = sum(max(0.0, min(end, detected) - max(start, progress)) for progress, detected in self.hangs)
        self.seconds["hang"] += hung
        self.seconds["down"] += max(end - start, 0.0) - hung

    def _resume(self, step: int) -> None:
        """Training goes on from ``step``: the time of kept steps after it is lost."""
        keep = max(step - self.first_kept + 1, 0)
        dropped = self.kept[keep:]
        self.lost_steps += len(dropped)
        self.seconds["lost"] += sum(dropped)
        self.seconds["productive"] -= sum(dropped)
        del self.kept[keep:]
        if not self.kept:
            self.first_kept = step + 1

    def _step(self, step: int, seconds: float) -> None:
        if step < self.first_kept + len(self.kept):  # trained before: a rewind inside an attempt
            self._resume(step - 1)
        if not self.kept:
            self.first_kept = step
        self.kept.extend([0.0] * (step - self.first_kept - len(self.kept)))  # resumed where no record was
        self.kept.append(seconds)
        self.seconds["productive"] += seconds

    @property
    def started_at(self) -> float:
        return self.attempts[0].started_at if self.attempts else 0.0

    @property
    def ended_at(self) -> float:
        """The last record, or a hang detected after it."""
        last = self.attempts[-1].ended_at if self.attempts else 0.0
        return max([last] + [detected for _, detected in self.hangs])

    def parts(self) -> dict[str, float]:
        """Seconds per part, up to ``ended_at`` (a hang detected after the last record included)."""
        parts = dict(self.seconds)
        if self.attempts and self.ended_at > self.attempts[-1].ended_at:
            tail = Goodput(self.hangs)
            tail._between(self.attempts[-1].ended_at, self.ended_at)
            for name in ("hang", "down"):
                parts[name] += tail.seconds[name]
        return parts

    @property
    def wall(self) -> float:
        return self.ended_at - self.started_at

    def metrics(self) -> dict:
        """``goodput/<part>_s`` for each part, the wall time and ``goodput``: productive / wall time."""
        parts = self.parts()
        wall = self.wall
        return {
            **{f"goodput/{name}_s": seconds for name, seconds in parts.items()},
            "goodput/wall_s": wall,
            "goodput": parts["productive"] / wall if wall > 0 else None,
        }


def replay(run_dir: Path) -> Goodput:
    goodput = Goodput(hang_spans(run_dir))
    for record in read_records(run_dir / GOODPUT):
        goodput.add(record)
    return goodput


_process_start_counted = False


def _attempt_start() -> float:
    """The process start for its first run (imports count as start-up); now for a later one in the same process
    (a local sweep, gptscale-bench's configurations), whose start-up the runs before it are not."""
    global _process_start_counted
    if _process_start_counted:
        return time.time()
    _process_start_counted = True
    return _process_started_at()


def _process_started_at() -> float:
    """This process's start on the wall clock. psutil's ``create_time`` adds the process's start on the boot clock
    to the boot time, which Linux gives in whole seconds: up to a second early or late. Its age on the boot
    clock, taken from now, is exact to a clock tick."""
    if not sys.platform.startswith("linux"):
        return psutil.Process().create_time()
    with open("/proc/self/stat", encoding="ascii") as stat:
        started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after the name
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


class GoodputLog:
    """This attempt's records, appended to RUN_DIR/goodput.jsonl by rank 0 (other ranks keep nothing).

    Each record is one ``write`` of a whole line, flushed; a line left unfinished by a killed process is ended
    before this attempt appends, so the two never merge into one unreadable line. The replay of every
    attempt so far is kept up to date for the metrics."""

    def __init__(self, run_dir: Path, writes: bool):
        self.file = None
        if not writes:
            return
        path = Path(run_dir) / GOODPUT
        self.goodput = replay(run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a+b")
        self.file.seek(0, os.SEEK_END)
        if self.file.tell():
            self.file.seek(-1, os.SEEK_END)
            if self.file.read(1) != b"\n":
                self.file.write(b"\n")
        self._append(
            {
                "phase": "start",
                "at": _attempt_start(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            }
        )

    def started(self, resumed: Optional[int]) -> None:
        """Set-up is over; training goes on after checkpoint step ``resumed`` (None: from scratch)."""
        self._append({"phase": "startup", "end": time.time(), "resumed": resumed})

    def mark(self, phase: str, step: int, finished: bool = False) -> None:
        """``phase`` (step, eval or checkpoint) of ``step`` ends now; ``finished``: the run's last record."""
        record = {"phase": phase, "step": step, "end": time.time()}
        self._append({**record, "finished": True} if finished else record)

    def metrics(self) -> dict:
        return {} if self.file is None else self.goodput.metrics()

    def _append(self, record: dict) -> None:
        if self.file is None:
            return
        self.goodput.add(record)
        self.file.write((json.dumps(record) + "\n").encode())
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def summary(goodput: Goodput, run_dir: Path) -> str:
    """The report ``gptscale-goodput`` prints: each part's seconds and share of the wall time, then each attempt."""
    wall, parts = goodput.wall, goodput.parts()
    share = (lambda seconds: seconds / wall) if wall > 0 else (lambda seconds: 0.0)
    lines = [
        f"{run_dir}: wall time {duration(wall)} over {len(goodput.attempts)} attempt(s), "
        f"goodput {share(parts['productive']):.1%} (productive training / wall time)"
    ]
    notes = {"productive": f"{len(goodput.kept)} steps", "lost": f"{goodput.lost_steps} steps"}
    for name, label in PARTS.items():
        lines.append(
            f"  {label:<34}{parts[name]:>10.1f} s {share(parts[name]):>7.1%}"
            + (f"   {notes[name]}" if name in notes else "")
        )
    for number, attempt in enumerate(goodput.attempts, start=1):
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(attempt.started_at))
        origin = "from scratch" if attempt.resumed_from is None else f"resumed from step {attempt.resumed_from}"
        steps = f"steps {attempt.first_step}-{attempt.last_step}" if attempt.first_step else "no step"
        end = "finished" if attempt.finished else "ended without finishing"
        lines.append(
            f"  attempt {number}: started {start} on {attempt.host}, {origin}, {steps}, {end} after "
            f"{duration(attempt.ended_at - attempt.started_at)}"
        )
    return "\n".join(lines)


def as_json(goodput: Goodput) -> dict:
    return {
        "wall_s": goodput.wall,
        "parts_s": goodput.parts(),
        "goodput": goodput.metrics()["goodput"],
        "kept_steps": len(goodput.kept),
        "lost_steps": goodput.lost_steps,
        "attempts": [asdict(attempt) for attempt in goodput.attempts],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="gptscale-goodput",
        description="Where a gptscale run's wall time went, "
        f"from RUN_DIR/{GOODPUT} and RUN_DIR/{HANG_REPORTS} (docs/goodput.md).",
    )
    parser.add_argument("run_dir", type=Path, help="the run directory of a gptscale run")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    if not (args.run_dir / GOODPUT).is_file():
        parser.error(f"no {GOODPUT} in {args.run_dir}: give the run_dir of a gptscale run")
    goodput = replay(args.run_dir)
    print(json.dumps(as_json(goodput)) if args.json else summary(goodput, args.run_dir))


if __name__ == "__main__":
    main()
