"""Learning rate as a function of the optimizer step: linear warm-up, then cosine, linear or warmup-stable-decay.

The schedule is a pure function of the step and its shape (where the warm-up starts, how long the decay
runs, an optional constant tail added on resume), so its state is the step and that shape. A run resumed
with another ``train.steps`` changes the shape only as ``optim.on_new_steps`` says.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch.distributed as dist

from gptscale.config.schema import LrSchedule, OptimConfig, ScheduleOnResume
from gptscale.config.validate import ConfigError

log = logging.getLogger("gptscale")


@dataclass
class Tail:
    """``extend``: from ``start`` hold ``lr``, then decay linearly to min_lr between ``decay_start`` and ``end``."""

    start: int
    lr: float
    decay_start: int
    end: int


class LearningRateSchedule:
    def __init__(self, optim: OptimConfig, total_steps: int):
        self.kind = optim.schedule
        self.peak, self.floor = optim.lr, optim.min_lr
        self.warmup = optim.warmup_steps
        self.follows_steps = optim.decay_steps is None  # the decay's length comes from train.steps
        self.decay = optim.decay_steps if optim.decay_steps is not None else max(total_steps - self.warmup, 1)
        self.wsd_fraction = optim.wsd_decay_fraction
        self.on_new_steps = optim.on_new_steps
        self.total_steps = total_steps
        self.origin = 0  # the step the warm-up starts at (``restart`` moves it)
        self.tail: Optional[Tail] = None
        self.reshaped = False  # on_new_steps changed the shape: later resumes at this length keep it
        self.step = 0

    @property
    def wsd_decay(self) -> int:
        return max(int(round(self.wsd_fraction * (self.warmup + self.decay))), 1)

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if self.tail is not None and step >= self.tail.start:
            fraction = min(max(step - self.tail.decay_start, 0) / max(self.tail.end - self.tail.decay_start, 1), 1.0)
            return self.tail.lr + (self.floor - self.tail.lr) * fraction
        step -= self.origin
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
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "warmup": self.warmup,
            "decay": self.decay,
            "origin": self.origin,
            "tail": None if self.tail is None else asdict(self.tail),
            "reshaped": self.reshaped,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        saved_total = state.get("total_steps")  # absent in checkpoints older than on_new_steps
        if saved_total is None:
            return
        if saved_total != self.total_steps and self.follows_steps:
            self._resize(saved_total, state)
        elif state["reshaped"]:
            self._take_shape(state)

    def _resize(self, saved_total: int, state: dict) -> None:
        """The run resumed with another ``train.steps``: reshape as ``optim.on_new_steps`` says."""
        choice = self.on_new_steps
        if choice is None:
            raise ConfigError(
                f"train.steps is {self.total_steps}, but the checkpoint's schedule was made for {saved_total} steps: "
                f"set optim.on_new_steps to keep (follow the old schedule), stretch (the new length's schedule; "
                f"the lr jumps), restart (a new warm-up and decay from step {self.step}) or extend (hold today's lr, "
                f"then decay to optim.min_lr)"
            )
        saved = copy.copy(self)  # the saved shape, to read the lr the run had at this step
        saved._take_shape(state)
        current_lr = saved.lr_at(self.step)
        self.reshaped = choice != ScheduleOnResume.stretch
        if choice in (ScheduleOnResume.keep, ScheduleOnResume.extend):
            self._take_shape(state)
        if choice == ScheduleOnResume.restart:
            self.origin = self.step
            self.decay = max(self.total_steps - self.step - self.warmup, 1)
        elif choice == ScheduleOnResume.extend:
            decay = max(int(round(self.wsd_fraction * (self.total_steps - self.step))), 1)
            self.tail = Tail(self.step, current_lr, self.total_steps - decay, self.total_steps)
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.warning(
                "train.steps changed from %d to %d on resume: optim.on_new_steps=%s, the lr at step %d "
                "goes from %.3g to %.3g",
                saved_total,
                self.total_steps,
                choice.value,
                self.step,
                current_lr,
                self.lr_at(self.step),
            )

    def _take_shape(self, state: dict) -> None:
        self.warmup, self.decay, self.origin = state["warmup"], state["decay"], state["origin"]
        self.tail = None if state["tail"] is None else Tail(**state["tail"])
