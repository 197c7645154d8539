"""RUN_DIR/.lock in one process: refused from another process while held, handed over inside this one (a
trainer whose setup failed never reached close()), emptied on release."""

import os
import socket
import subprocess
import sys

from gptscale.checkpoint.run_lock import RunLock
from tests.helpers import REPO

TAKE = "import sys; from gptscale.checkpoint.run_lock import RunLock; RunLock.take(sys.argv[1], True, 1)"


def test_held_lock_refuses_another_process_and_passes_within_this_one(tmp_path):
    lock = RunLock.take(tmp_path, True, 1)
    other = subprocess.run(
        [sys.executable, "-c", TAKE, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert other.returncode != 0
    assert f"is in use by another training run: pid {os.getpid()} on host {socket.gethostname()}" in other.stderr

    again = RunLock.take(tmp_path, True, 1)  # the first lock's trainer is gone without close()
    assert lock.file is None and again.file is not None
    again.release()
    assert (tmp_path / ".lock").read_text() == ""
    assert subprocess.run([sys.executable, "-c", TAKE, str(tmp_path)], cwd=REPO, timeout=120).returncode == 0


def test_other_ranks_hold_nothing(tmp_path):
    lock = RunLock.take(tmp_path, False, 1)
    assert lock.file is None and not (tmp_path / ".lock").exists()
    lock.release()
