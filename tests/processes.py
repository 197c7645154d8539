"""The processes a test session started, found by a marker in their environment (which reparented orphans
keep), so that a test that leaves one running fails."""

from __future__ import annotations

import os
import signal
import time
import uuid

MARKER = "GPTSCALE_TEST_SESSION"
_long_lived: set[int] = set()  # started on purpose to outlive a test (the test SLURM cluster's daemons)


def mark_session() -> None:
    """Every process started from now on (and its descendants) carries this session's marker."""
    os.environ.setdefault(MARKER, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")


def keep_running(pid: int) -> None:
    """Exempt ``pid`` (not its descendants) from the check: it lives on past the test that started it."""
    _long_lived.add(pid)


def session_processes(marker: str | None = None) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries ``marker`` (this session's)."""
    entry = f"{MARKER}={marker or os.environ[MARKER]}".encode()
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if entry not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone, or a zombie
            continue
        if command:
            found[int(name)] = command
    return found


def left_behind(before: set[int], grace: float = 10.0) -> dict[int, str]:
    """Processes of this session started since ``before`` that are still alive after ``grace`` seconds
    (given to let ending processes exit); each is then killed."""
    deadline = time.monotonic() + grace
    while True:
        left = {
            pid: command for pid, command in session_processes().items() if pid not in before and pid not in _long_lived
        }
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left
