"""The errors gptscale raises on purpose, and how a command reports them.

Such an error's message already says what is wrong and what to do, so a command prints it as one line
(once per node, however many ranks raised it) and exits non-zero, without a traceback unless
``GPTSCALE_DEBUG=1`` asks for one. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import traceback

DEBUG_ENV = "GPTSCALE_DEBUG"

# Exit codes of a rank (and of the launch it fails) that say what happened (docs/faults.md).
HANG_EXIT_CODE = 75  # the watchdog found a hang: restarting from the newest checkpoint may well succeed
NO_PROGRESS_EXIT_CODE = 76  # restarts in a row made no new checkpoint: the launchers stop, they do not requeue


class GptscaleError(Exception):
    """Base of every error gptscale raises on purpose (configuration, data, checkpoints, conversion, runs)."""

    exit_code = 1


def _first_on_this_node(message: str) -> bool:
    """Whether this process is the first of its launch on this node to report ``message`` (a marker file per
    torchrun launch and message; a process outside torchrun always reports)."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if not job:
        return True
    # The run id is "none" for every plain launch: the agent's pid and restart count tell this launch apart.
    launch = f"{job}-{os.getppid()}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    digest = hashlib.sha256(f"{launch}\0{message}".encode()).hexdigest()[:16]
    try:
        os.close(
            os.open(
                os.path.join(tempfile.gettempdir(), f"gptscale-error-{digest}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY
            )
        )
    except FileExistsError:
        return False
    return True


def report(error: GptscaleError, log: logging.Logger) -> int:
    """Log ``error`` as one clear message (the traceback too with GPTSCALE_DEBUG=1); returns the exit code."""
    message = str(error)
    if os.environ.get(DEBUG_ENV) == "1":
        log.error("%s\n%s", message, "".join(traceback.format_exception(error)))
    elif _first_on_this_node(message):
        rank = os.environ.get("RANK")
        log.error("%s%s", message, f" (rank {rank})" if rank not in (None, "0") else "")
    return error.exit_code
