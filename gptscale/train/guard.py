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


class SpikeDetector:
    """Rolling mean and std of the loss and gradient norm over the last ``window`` updated steps.

    ``limits()`` gives the values above which the next step is a spike (mean + zscore * std; infinite until
    the window is full or when detection is off); ``parallel/deepspeed.py``'s ``UpdateGate`` compares on
    the device, so a spike is skipped exactly like a non-finite step. Skipped steps stay out of the window.
    """

    def __init__(self, zscore: Optional[float], window: int):
        self.zscore = zscore or 0.0
        self.window = window
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.skipped = 0  # steps skipped as spikes in the whole run

    def _limit(self, values: list[float]) -> float:
        if not self.zscore or len(values) < self.window:
            return math.inf
        mean, std = _mean_std(values)
        return mean + self.zscore * std

    def limits(self) -> tuple[float, float]:
        """(loss limit, gradient-norm limit) for the next step."""
        return self._limit(self.losses), self._limit(self.norms)

    def zscores(self, loss: float, grad_norm: Optional[float]) -> tuple[Optional[float], Optional[float]]:
        """How many standard deviations above the window's mean these values are (None before it is full)."""
        def score(value, values):
            if value is None or len(values) < self.window or not math.isfinite(value):
                return None
            mean, std = _mean_std(values)
            return (value - mean) / std if std > 0 else (0.0 if value == mean else math.inf)
        return score(loss, self.losses), score(grad_norm, self.norms)

    def add(self, loss: float, grad_norm: Optional[float]) -> None:
        """Add an updated (not skipped) step."""
        self.losses = (self.losses + [loss])[-self.window:]
        if grad_norm is not None:
            self.norms = (self.norms + [grad_norm])[-self.window:]

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "norms": list(self.norms), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.losses = [float(v) for v in state["losses"]][-self.window:]
        self.norms = [float(v) for v in state["norms"]][-self.window:]
        self.skipped = int(state["skipped"])


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
