"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends before a time limit or a preemption) and a first Ctrl-C
(SIGINT) end the run cleanly.

The current step finishes, a checkpoint is written and the process exits 0, so the job can be requeued and
resume. Ranks may get the signal at different moments; ``agreed()`` all-reduces the flag after every step,
so all ranks stop at the same one. A second Ctrl-C stops at once, without saving.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    def __init__(self, device: torch.device):
        self.device = device
        self.received: Optional[int] = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if signum == signal.SIGINT and os.environ.get("RANK", "0") == "0":
            os.write(
                2,
                b"Ctrl-C: finishing this step, saving a checkpoint and stopping (Ctrl-C again: stop at once, "
                b"without saving)\n",
            )
        self.received = signum

    def agreed(self, save_due: bool = False) -> tuple[bool, bool]:
        """Whether any rank was asked to stop, and whether any rank finds a timed save due (collective: one
        all-reduce carries both, so ranks whose clocks differ still save at the same step)."""
        flags = torch.tensor([self.received is not None, save_due], dtype=torch.int32, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, save = flags.tolist()
        return bool(stop), bool(save)

    def close(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
