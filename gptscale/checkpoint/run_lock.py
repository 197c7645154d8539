"""One training run at a time in a run directory: ``RUN_DIR/.lock``, held by global rank 0 for the run's life.

Two runs in one run_dir overwrote each other's checkpoints and metrics.jsonl without a word. Rank 0 takes the
file's ``FileLock`` (``gptscale/files.py``: an exclusive ``flock`` with the holder written inside, a dead run's
lock taken over with a warning). The outcome is broadcast, so every rank of a refused run stops with the same
message before any of them reads or writes the run.
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path

import torch.distributed as dist

from gptscale.checkpoint.manifest import CheckpointError
from gptscale.files import FileLock

log = logging.getLogger("gptscale")
LOCK = ".lock"

# Files this process holds locked, by path. One process runs one trainer at a time (megatron-core's groups
# are per process), so a lock found here is a trainer's whose setup failed before it could release it.
_held: dict[Path, "RunLock"] = {}


class RunDirInUse(CheckpointError):
    """Another live run holds the run directory."""


class RunLock(FileLock):
    """The run directory's lock on rank 0 (nothing on other ranks); ``release()`` at the end of the run."""

    @classmethod
    def take(cls, run_dir: Path, is_rank_zero: bool, world_size: int) -> "RunLock":
        """Lock ``run_dir`` for this run on rank 0 and agree on the outcome (collective): raises RunDirInUse
        naming the holder on every rank when another live run has it."""
        path = Path(run_dir).resolve() / LOCK
        lock, refusal = cls(path), None
        if is_rank_zero:
            try:
                lock = cls._lock(path)
            except RunDirInUse as error:
                refusal = str(error)
        if world_size > 1:
            outcome = [refusal]
            dist.broadcast_object_list(outcome, src=0)
            refusal = outcome[0]
        if refusal is not None:
            raise RunDirInUse(refusal)
        return lock

    @classmethod
    def _lock(cls, path: Path) -> "RunLock":
        if path in _held:
            _held.pop(path).release()
        lock = cls.acquire(
            path,
            lambda holder: RunDirInUse(
                f"run_dir {path.parent} is in use by another training run: {holder} (holds {path}); give this run "
                "another run_dir, or stop that run first"
            ),
            f"run_dir {path.parent}: taking over {path} from a run that ended without releasing it",
        )
        _held[path] = lock
        atexit.register(lock.release)  # a run that stops on an error releases too; only a killed one cannot
        return lock

    def release(self) -> None:
        """Empty the file (a clean end leaves no holder) and drop the lock; nothing on ranks other than 0."""
        if self.file is not None:
            _held.pop(self.path, None)
        super().release()
