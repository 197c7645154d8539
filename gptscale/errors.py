"""The errors gptscale raises on purpose, and how a command reports them.

Such an error's message already says what is wrong and what to do, so a command prints it as one line
(once per node, however many ranks raised it) and exits non-zero, without a traceback unless
``GPTSCALE_DEBUG=1`` asks for one. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import traceback

DEBUG_ENV = "GPTSCALE_DEBUG"

# Exit codes of a rank (and of the launch it fails) that say what happened (docs/faults.md).
HANG_EXIT_CODE = 75  # the watchdog found a hang: restarting from the newest checkpoint may well succeed
NO_PROGRESS_EXIT_CODE = 76  # restarts in a row made no new checkpoint: the launchers stop, they do not requeue


class GptscaleError(Exception):
    """Base of every error gptscale raises on purpose (configuration, data, checkpoints, conversion, runs)."""

    exit_code = 1


def _first_on_this_node(message: str) -> bool:
    """Whether this process is the first of its launch attempt on this node to report ``message``: a marker file
    per message in the attempt's directory of torchrun's logs, which holds the ranks' error files (the gptscale
    launcher removes it at the end). A process outside torchrun, or whose torchrun keeps no logs, always reports."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return True
    attempt = os.path.dirname(os.path.dirname(error_file))  # <log dir>/<run>/attempt_<n>/<local rank>/error.json
    digest = hashlib.sha256(message.encode()).hexdigest()[:16]
    try:
        os.close(os.open(os.path.join(attempt, f"gptscale-error-{digest}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # no such directory: report rather than stay silent
        return True
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
