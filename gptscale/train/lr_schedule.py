"""Learning rate as a function of the optimizer step: linear warm-up, then cosine, linear or warmup-stable-decay.

The schedule is a pure function of the step, so its state is the step alone.
"""

from __future__ import annotations

import math

from gptscale.config.schema import LrSchedule, OptimConfig


class LearningRateSchedule:
    def __init__(self, optim: OptimConfig, total_steps: int):
        self.kind = optim.schedule
        self.peak, self.floor = optim.lr, optim.min_lr
        self.warmup = optim.warmup_steps
        self.decay = optim.decay_steps if optim.decay_steps is not None else max(total_steps - self.warmup, 1)
        self.wsd_decay = max(int(round(optim.wsd_decay_fraction * (self.warmup + self.decay))), 1)
        self.step = 0

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.kind == LrSchedule.constant:
            return self.peak
        progress = step - self.warmup
        if self.kind == LrSchedule.wsd:
            stable = self.decay - self.wsd_decay
            if progress < stable:
                return self.peak
            progress, span = progress - stable, self.wsd_decay
        else:
            span = self.decay
        fraction = min(progress / span, 1.0)
        if self.kind == LrSchedule.cosine:
            return self.floor + 0.5 * (self.peak - self.floor) * (1.0 + math.cos(math.pi * fraction))
        return self.peak + (self.floor - self.peak) * fraction

    def apply(self, optimizer) -> float:
        """Set the learning rate of ``optimizer``'s parameter groups for the current step and return it."""
        lr = self.lr_at(self.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def advance(self) -> None:
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
