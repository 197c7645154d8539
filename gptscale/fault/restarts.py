"""In-job restarts: torchrun brings the ranks back after a failure (launch/torchrun.sh, ``--max_restarts``) and
they resume from the newest complete checkpoint (``checkpoint.resume=auto``). Each start of a run is recorded
in ``RUN_DIR/faults/starts.jsonl``; a restart that follows more than ``fault.max_restarts_without_progress``
restarts in a row without a new checkpoint stops the job (NoProgress, exit code 76, which the launchers
neither restart nor requeue): a job that fails the same way again and again must not loop.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from gptscale.errors import NO_PROGRESS_EXIT_CODE, GptscaleError

STARTS = "starts.jsonl"


class NoProgress(GptscaleError):
    """Restarts in a row brought no new checkpoint: restarting again would only loop."""

    exit_code = NO_PROGRESS_EXIT_CODE


def restart_count() -> int:
    """Which restart of this launch this is (torchrun's count; 0: the launch's first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def read_starts(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def restarts_without_progress(starts: list[dict]) -> int:
    """Restarts in a row, newest last, each of which found the newest checkpoint its previous start found."""
    count = 0
    for previous, start in reversed(list(zip(starts, starts[1:]))):
        if start["restart"] == 0 or start["checkpoint"] != previous["checkpoint"]:
            break
        count += 1
    return count


def record_start(faults_dir: Path, checkpoint: Optional[str], limit: int) -> Optional[str]:
    """Append this start (rank 0); returns why the job must stop (None: go on)."""
    faults_dir.mkdir(parents=True, exist_ok=True)
    path = faults_dir / STARTS
    start = {
        "at": time.time(),
        "restart": restart_count(),
        "checkpoint": checkpoint,
        "host": socket.gethostname(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
    }
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(start) + "\n")
    stalled = restarts_without_progress(read_starts(path))
    if stalled <= limit:
        return None
    return (
        f"stopping: {stalled} restarts in a row found no new checkpoint (newest: {checkpoint or 'none'}; "
        f"fault.max_restarts_without_progress={limit}); the run fails the same way again and again: see the "
        f"log of its first failure and {faults_dir}"
    )
