"""Small files of a job: written whole or not at all, through a temporary name beside the target, then renamed,
so a reader (a resumed run, a relaunched job, a user) never takes half a file for the file; and lock files that
let one job at a time work in a directory."""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Callable, Optional, TextIO, TypeVar

from gptscale.errors import GptscaleError

log = logging.getLogger("gptscale")


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8), replacing what was there in one rename."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


Lock = TypeVar("Lock", bound="FileLock")


class FileLock:
    """An exclusive ``flock`` on a file with its holder (host, pid, start time) written inside, for a job's life.

    The kernel drops the lock when the process dies, however it dies, so a file with a holder but a free lock
    is a dead job's, and is taken over with a warning. The file is emptied on release, never deleted: a process
    could still lock the unlinked file while another creates a new one, and both would hold "the" lock."""

    def __init__(self, path: Path, file: Optional[TextIO] = None):
        self.path, self.file = path, file

    @classmethod
    def acquire(cls: type[Lock], path: Path, refusal: Callable[[str], GptscaleError], takeover: str) -> Lock:
        """Lock ``path`` (created if missing) for this process. A live holder: raises ``refusal(holder in
        words)``; a dead one's lock: logs ``takeover`` followed by the dead holder."""
        path.parent.mkdir(parents=True, exist_ok=True)
        file = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(file)
            file.close()
            raise refusal(holder) from None
        if file.tell():
            log.warning("%s: %s", takeover, _read_holder(file))
        file.seek(0)
        file.truncate()
        file.write(
            json.dumps(
                {
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                }
            )
            + "\n"
        )
        file.flush()
        os.fsync(file.fileno())
        return cls(path, file)

    def release(self) -> None:
        """Empty the file (a clean end leaves no holder) and drop the lock."""
        if self.file is None:
            return
        self.file.truncate(0)
        self.file.flush()
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(file: TextIO) -> str:
    """The holder written in the lock file, in words."""
    file.seek(0)
    text = file.read().strip()
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return f"holder unknown ({text[:200]!r} in the lock file)" if text else "holder not yet written"
