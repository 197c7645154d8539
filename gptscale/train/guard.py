"""The loss guard: a step whose loss or gradient norm is not finite is skipped and counted; too many stop the run.

Such a step changes nothing: a non-finite loss makes non-finite gradients, and DeepSpeed leaves the weights
and Adam's state alone when the gradient norm is not finite (its ZeRO and bf16 optimizers skip the step;
the engine adapter does the same for fp32 without ZeRO). Only its batch is consumed. More than
``train.max_bad_steps`` such steps within the last ``train.bad_step_window`` steps stop the run.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

from gptscale.errors import GptscaleError


class TooManyBadSteps(GptscaleError, RuntimeError):
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


class SpikeDetector:
    """Robust rolling statistics of the loss and gradient norm over the last ``window`` updated steps.

    Values are compared in log space (spikes are multiplicative) against the window's median, in units of
    1.4826 x the median absolute deviation (the std of normal data, unmoved by the outliers it looks for),
    floored at ``min_relative_std`` so a calm window does not turn ordinary noise into spikes. A step is a
    spike when its loss is more than ``zscore`` such units above the median (``signal="loss"``; "both": its
    gradient norm too, "either": one of them). The gradient norm does not decide by default: in a healthy
    run it alone jumps several-fold now and then (clipping bounds such an update), while a bad batch shows
    in the loss. ``limits()`` gives the values above which the next step is a spike;
    the engine adapter's ``skip_update`` compares on the device, so a spike is skipped exactly like a
    non-finite step. Skipped steps stay out of the window; ``consecutive`` counts the current
    run of skipped spikes, so the trainer can end a cascade (``train.spike.max_consecutive``): by a rewind,
    or, where none is possible, by ``restart`` (the loss level is the model's, not a batch's).
    """

    def __init__(self, zscore: Optional[float], window: int, min_relative_std: float = 0.01, signal: str = "loss"):
        self.zscore = zscore or 0.0
        self.window = window
        self.min_relative_std = min_relative_std
        self.signal = getattr(signal, "value", signal)
        self.require_both = self.signal == "both"  # for the update gate
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.skipped = 0  # steps skipped as spikes in the whole run
        self.consecutive = 0  # spikes skipped since the last updated step
        self.streak_start: Optional[int] = None  # the first step of that run of spikes

    def _center_scale(self, values: list[float]) -> Optional[tuple[float, float]]:
        if len(values) < self.window:
            return None
        logs = [_log(v) for v in values]
        center = statistics.median(logs)
        spread = 1.4826 * statistics.median([abs(v - center) for v in logs])
        return center, max(spread, math.log1p(self.min_relative_std))

    def _limit(self, values: list[float]) -> float:
        stats = self._center_scale(values) if self.zscore else None
        if stats is None:
            return math.inf
        center, scale = stats
        return math.exp(min(center + self.zscore * scale, 700.0))

    def limits(self) -> tuple[float, float]:
        """(loss limit, gradient-norm limit) for the next step."""
        return self._limit(self.losses), math.inf if self.signal == "loss" else self._limit(self.norms)

    def deciding(self, loss_z: float, norm_z: float) -> float:
        """The score compared with ``zscore``, from a step's two z-scores."""
        return {"loss": loss_z, "both": min(loss_z, norm_z), "either": max(loss_z, norm_z)}[self.signal]

    def zscores(self, loss: float, grad_norm: Optional[float]) -> tuple[Optional[float], Optional[float]]:
        """How many robust standard deviations above the window's median these values are (None before the
        window is full)."""

        def score(value, values):
            stats = self._center_scale(values)
            if value is None or stats is None or not math.isfinite(value):
                return None
            return (_log(value) - stats[0]) / stats[1]

        return score(loss, self.losses), score(grad_norm, self.norms)

    def add(self, loss: float, grad_norm: Optional[float]) -> None:
        """Add an updated (not skipped) step; it ends a run of spikes."""
        self.losses = (self.losses + [loss])[-self.window :]
        if grad_norm is not None:
            self.norms = (self.norms + [grad_norm])[-self.window :]
        self.consecutive, self.streak_start = 0, None

    def restart(self) -> None:
        """Take the current loss level as the new normal: the window empties and detection starts again once
        the next ``window`` updated steps fill it. Skipping cannot repair weights that an earlier update
        damaged, so spikes that persist must not stop the model from training its way back."""
        self.losses, self.norms = [], []
        self.consecutive, self.streak_start = 0, None

    def count_skip(self, step: int) -> None:
        self.skipped += 1
        self.consecutive += 1
        if self.streak_start is None:
            self.streak_start = step

    def state_dict(self) -> dict:
        return {
            "losses": list(self.losses),
            "norms": list(self.norms),
            "skipped": self.skipped,
            "consecutive": self.consecutive,
            "streak_start": self.streak_start,
        }

    def load_state_dict(self, state: dict) -> None:
        self.losses = [float(v) for v in state["losses"]][-self.window :]
        self.norms = [float(v) for v in state["norms"]][-self.window :]
        self.skipped = int(state["skipped"])
        self.consecutive = int(state.get("consecutive", 0))
        self.streak_start = state.get("streak_start")


def _log(value: float) -> float:
    return math.log(max(value, 1e-30))
