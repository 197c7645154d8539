"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends before a time limit or a preemption) end the run cleanly.

The current step finishes, a checkpoint is written and the process exits 0, so the job can be requeued and
resume. Ranks may get the signal at different moments; ``agreed()`` all-reduces the flag after every step,
so all ranks stop at the same one.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, device: torch.device):
        self.device = device
        self.received: Optional[int] = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (collective)."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
