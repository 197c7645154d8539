"""What an optimizer declares to the house (``gptscale.optim.OPTIMIZERS``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class OptimizerKind:
    """One optimizer the run may choose.

    Every optimizer built here keeps, per tensor it updates, a ``step`` count (a tensor on that tensor's
    device) and ``state`` tensors of the tensor's shape in fp32, created lazily at its first step; its
    ``step`` honours ``found_inf`` (torch's amp protocol, ``_step_supports_amp_scaling``) without reading
    it on the host, so the update gate can skip a step on the device.
    """

    name: str
    build: Callable[[Any, list[dict]], torch.optim.Optimizer]  # (OptimConfig, parameter groups)
    state: tuple[str, ...]  # per-parameter state tensors, besides the step count
    zero_stages: tuple[int, ...]  # DeepSpeed ZeRO stages at which it computes what one rank computes

    @property
    def state_bytes_per_parameter(self) -> int:
        """fp32 optimizer state per trained parameter (the planner's count)."""
        return 4 * len(self.state)
