"""Helper processes that neither die of the job's stop signals nor outlive the process that started them.

torchrun and SLURM send SIGTERM / SIGUSR1 to a rank's whole process group, helpers included; a rank answers
by saving a checkpoint, which its helpers (megatron-core's checkpoint writers) must live to write. Processes
started inside ``shielded()`` start with those signals blocked, and get SIGKILL when their parent ends
(Linux's parent-death signal), so that a rank killed with SIGKILL leaves none of them behind. This module is
light on purpose: a spawned helper imports it to run ``helper_starts``.
"""

from __future__ import annotations

import ctypes
import os
import signal
from contextlib import contextmanager
from typing import Optional

SHIELDED_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}
_PR_SET_PDEATHSIG = 1
_forking = {"parent": None}  # the pid that forks, while inside ``shielded``; a forked child inherits the copy


def die_with_parent(parent: Optional[int] = None) -> None:
    """Get SIGKILL when the parent process ends, however it ends (and exit now if it has already ended)."""
    parent = os.getppid() if parent is None else parent
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def helper_starts() -> None:
    """The start of a helper spawned inside ``shielded`` (a multiprocessing initializer): stop signals stay
    blocked and it ends with its parent."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SHIELDED_SIGNALS)
    die_with_parent()


def _before_fork() -> None:
    if _forking["parent"] is not None:
        _forking["parent"] = os.getpid()


def _after_fork_in_child() -> None:
    if _forking["parent"] is not None:
        die_with_parent(_forking["parent"])


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


@contextmanager
def shielded():
    """Processes forked or spawned inside start with the stop signals blocked, and forked ones die with
    their parent (a spawned one runs ``helper_starts``). Here the signals wait, pending, until the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SHIELDED_SIGNALS)
    _forking["parent"] = os.getpid()
    try:
        yield
    finally:
        _forking["parent"] = None
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
