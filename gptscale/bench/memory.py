"""Peak memory of one benchmark config: allocated device memory on GPU, resident set size on CPU.

The two are different quantities, so every figure carries its kind. Linux lets a process reset its RSS
high-water mark (``/proc/self/clear_refs``), so each config of a ``--compare`` run gets its own peak;
where that is refused the peak counts from process start and the kind says so.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "max allocated" if device.type == "cuda" else "peak RSS"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            self.kind = "peak RSS since start"

    def read_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        for line in _STATUS.read_text().splitlines() if _STATUS.exists() else []:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
        self.kind = "peak RSS since start"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
