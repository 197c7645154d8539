"""Whether a step updates anything, decided on the device where the gradient norm is known."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class UpdateLimits:
    """Above which loss and gradient norm a step is a spike and skipped (``SpikeDetector.limits``)."""

    loss: float = float("inf")
    norm: float = float("inf")
    require_both: bool = False  # a spike needs both above their limits; false: either


def skip_update(
    loss: Optional[torch.Tensor], norm: Optional[torch.Tensor], limits: UpdateLimits, device: torch.device
) -> torch.Tensor:
    """1.0 when the update must be skipped: the loss or gradient norm is not finite, or the step is a spike (a
    value above its limit; both values with ``require_both``); else 0.0. The host never waits for it."""
    skip = torch.zeros((), dtype=torch.bool, device=device)
    high = []  # which of the loss and the gradient norm are above their spike limits
    if loss is not None:
        loss = loss.to(device)
        skip = skip | ~torch.isfinite(loss)
        high.append(loss > limits.loss)
    if norm is not None:
        norm = torch.as_tensor(norm, dtype=torch.float32, device=device)
        skip = skip | ~torch.isfinite(norm)
        high.append(norm > limits.norm)
    if high:
        spike = torch.stack(high).all() if limits.require_both else torch.stack(high).any()
        skip = skip | spike
    return skip.float()
