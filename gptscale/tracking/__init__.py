"""Where metrics go: the console line, RUN_DIR/metrics.jsonl, and experiment trackers. Only global rank 0 logs."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from gptscale.tracking.console import ConsoleSink
from gptscale.tracking.jsonl import JsonlSink


class Sink(Protocol):
    def log(self, step: int, metrics: dict) -> None: ...

    def close(self) -> None: ...


class Tracker:
    """Fans each step's metrics out to every sink; a no-op on ranks other than 0."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def log(self, step: int, metrics: dict) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_tracker(run_dir: Path, is_logging_rank: bool) -> Tracker:
    if not is_logging_rank:
        return Tracker([])
    return Tracker([ConsoleSink(), JsonlSink(run_dir / "metrics.jsonl")])
