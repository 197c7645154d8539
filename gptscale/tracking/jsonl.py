"""RUN_DIR/metrics.jsonl: one JSON object per logged step, appended and flushed, readable while the run goes."""

from __future__ import annotations

import json
from pathlib import Path

METRICS = "metrics.jsonl"


class JsonlSink:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
