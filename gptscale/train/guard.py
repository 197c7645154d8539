"""The loss guard: a step whose loss or gradient norm is not finite is skipped and counted; too many stop the run.

Such a step changes nothing: a non-finite loss makes non-finite gradients, and DeepSpeed leaves the weights
and Adam's state alone when the gradient norm is not finite (its ZeRO and bf16 optimizers skip the step;
``parallel/deepspeed.py`` does the same for fp32 without ZeRO). Only its batch is consumed. More than
``train.max_bad_steps`` such steps within the last ``train.bad_step_window`` steps stop the run.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch


class TooManyBadSteps(RuntimeError):
    """The run produced too many non-finite steps in a row of steps to go on."""


class LossGuard:
    def __init__(self, max_bad_steps: int, window: int):
        self.max_bad_steps = max_bad_steps
        self.window = window
        self.recent: list[int] = []  # skipped steps within the window
        self.skipped = 0  # skipped steps of the whole run

    def record(self, step: int, loss: float, grad_norm: Optional[float]) -> bool:
        """Count ``step`` if it was skipped; returns whether it was."""
        self.recent = [s for s in self.recent if s > step - self.window]
        bad = not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))
        if bad:
            self.recent.append(step)
            self.skipped += 1
        return bad

    def exceeded(self) -> bool:
        return len(self.recent) > self.max_bad_steps

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.recent, self.skipped = [int(s) for s in state["recent"]], int(state["skipped"])


def with_nan_loss(batches: Iterator[dict]) -> Iterator[dict]:
    """Test hook (``train.inject_nan_steps``): a NaN loss mask makes the step's loss and gradients NaN."""
    for batch in batches:
        yield {**batch, "loss_mask": torch.full_like(batch["loss_mask"], math.nan)}
