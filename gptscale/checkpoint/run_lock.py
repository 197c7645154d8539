"""One training run at a time in a run directory: ``RUN_DIR/.lock``, held by global rank 0 for the run's life.

Two runs in one run_dir overwrote each other's checkpoints and metrics.jsonl without a word. Rank 0 takes an
exclusive ``flock`` on the file and writes its holder (host, pid, start time) inside; the kernel drops the
lock when the process dies, however it dies, so a file with a holder but a free lock is a dead run's and is
taken over with a warning. The outcome is broadcast, so every rank of a refused run stops with the same
message before any of them reads or writes the run. The file is emptied on release, never deleted: a
process could still lock the unlinked file while another creates a new one, and both would hold "the" lock.
"""

from __future__ import annotations

import atexit
import datetime
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

import torch.distributed as dist

from gptscale.checkpoint.manifest import CheckpointError

log = logging.getLogger("gptscale")
LOCK = ".lock"

# Files this process holds locked, by path. One process runs one trainer at a time (megatron-core's groups
# are per process), so a lock found here is a trainer's whose setup failed before it could release it.
_held: dict[Path, "RunLock"] = {}


class RunDirInUse(CheckpointError):
    """Another live run holds the run directory."""


class RunLock:
    """The run directory's lock on rank 0 (nothing on other ranks); ``release()`` at the end of the run."""

    def __init__(self, path: Path, file=None):
        self.path = path
        self.file = file

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
        path.parent.mkdir(parents=True, exist_ok=True)
        file = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(file)
            file.close()
            raise RunDirInUse(f"run_dir {path.parent} is in use by another training run: {holder} (holds {path}); "
                              "give this run another run_dir, or stop that run first") from None
        previous = _read_holder(file) if file.tell() else None
        if previous is not None:
            log.warning("run_dir %s: taking over %s from a run that ended without releasing it: %s", path.parent,
                        path, previous)
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                               "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}) + "\n")
        file.flush()
        os.fsync(file.fileno())
        lock = _held[path] = cls(path, file)
        atexit.register(lock.release)  # a run that stops on an error releases too; only a killed one cannot
        return lock

    def release(self) -> None:
        """Empty the file (a clean end leaves no holder) and drop the lock; nothing on ranks other than 0."""
        if self.file is None:
            return
        _held.pop(self.path, None)
        self.file.truncate(0)
        self.file.flush()
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        self.file = None


def _read_holder(file) -> str:
    """The holder written in the lock file, in words."""
    file.seek(0)
    text = file.read().strip()
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return f"holder unknown ({text[:200]!r} in the lock file)" if text else "holder not yet written"
