"""What an optimizer declares to the house (``gptscale.optim.OPTIMIZERS``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


class GatedStep:
    """What every optimizer offered derives from: before each update it asks ``decide`` (the engine's update
    gate, given at build) whether to skip, and hands the answer, a device tensor, to the update as torch's
    ``found_inf`` (the amp protocol, ``_step_supports_amp_scaling``). Without ``decide`` it steps as its base."""

    _step_supports_amp_scaling = True

    def __init__(self, *args, decide: Optional[Callable[[], Optional[torch.Tensor]]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.decide = decide

    def step(self, closure=None):
        if self.decide is not None:
            self.found_inf = self.decide()
        return super().step(closure)  # type: ignore[misc]


@dataclass(frozen=True)
class OptimizerKind:
    """One optimizer the run may choose.

    Every optimizer built here keeps, per tensor it updates, a ``step`` count (a tensor on that tensor's
    device) and ``state`` tensors of the tensor's shape in fp32, created lazily at its first step; its
    ``step`` honours ``found_inf`` (torch's amp protocol, ``_step_supports_amp_scaling``) without reading
    it on the host, so the update gate can skip a step on the device.
    """

    name: str
    build: Callable[..., GatedStep]  # (OptimConfig, parameter groups, decide=the engine's update gate)
    state: tuple[str, ...]  # per-parameter state tensors, besides the step count
    zero_stages: tuple[int, ...]  # DeepSpeed ZeRO stages at which it computes what one rank computes

    @property
    def state_bytes_per_parameter(self) -> int:
        """fp32 optimizer state per trained parameter (the planner's count)."""
        return 4 * len(self.state)
