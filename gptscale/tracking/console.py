"""What a person reads: every command's logging setup, and the log line
``step N | loss X | lr ... | grad_norm ... | tokens/s ... | TFLOP/s ... | MFU ...``."""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

log = logging.getLogger("gptscale")

_FORMATS = {
    "loss": ("loss", "{:.4f}"),
    "eval_loss": ("eval_loss", "{:.4f}"),
    "lr": ("lr", "{:.3e}"),
    "grad_norm": ("grad_norm", "{:.3f}"),
    "tokens_per_s": ("tokens/s", "{:,.0f}"),
    "tflops_per_device": ("TFLOP/s", "{:.2f}"),
    "mfu": ("MFU", "{:.1%}"),
    "peak_memory_gib": ("mem", "{:.2f} GiB"),
    "moe/load_balancing_loss": ("lb_loss", "{:.4f}"),
    "moe/max_load": ("max_load", "{:.2f}"),
}


def setup_logging(level: str) -> None:
    """Rank 0 logs at ``level``; other ranks only warnings and errors, prefixed with their rank."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO) if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s" if rank == 0 else f"%(asctime)s rank {rank} %(message)s",
        datefmt="%H:%M:%S",
    )
    for chatty in ("megatron", "DeepSpeed"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def format_line(step: int, metrics: dict, total_steps: Optional[int] = None) -> str:
    parts = [f"step {step}" if total_steps is None else f"step {step}/{total_steps}"]
    for key, (label, fmt) in _FORMATS.items():
        if key in metrics:
            value = metrics[key]
            parts.append(f"{label} {'n/a' if value is None else fmt.format(value)}")
    parts += [
        f"{key.split('/')[1]} acc {value:.3f}"
        for key, value in metrics.items()
        if key.startswith("eval/") and key.endswith("/acc")
    ]
    return " | ".join(parts)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


class ConsoleSink:
    """The log line of each logged step, with the elapsed time and an estimate of the time left; a summary of
    the run when it closes."""

    def __init__(self, total_steps: Optional[int] = None):
        self.total_steps = total_steps
        self.start: Optional[tuple[int, float]] = None  # the first step seen and when
        self.last: dict = {}  # the newest value of each metric
        self.step = 0

    def log(self, step: int, metrics: dict) -> None:
        self.last.update({key: value for key, value in metrics.items() if value is not None})
        self.step = step
        if not any(key in metrics for key in _FORMATS) and not any(key.startswith("eval/") for key in metrics):
            return  # e.g. the step of a checkpoint, which the checkpointer reports itself
        line = format_line(step, metrics, self.total_steps)
        if self.start is None:
            self.start = (step, time.monotonic())
        elif "loss" in metrics:
            first, began = self.start
            elapsed = time.monotonic() - began
            line += f" | elapsed {duration(elapsed)}"
            if self.total_steps and step > first:
                line += f" | eta {duration(elapsed / (step - first) * max(self.total_steps - step, 0))}"
        log.info(line)

    def close(self) -> None:
        if "loss" not in self.last or self.start is None:
            return
        first, began = self.start
        parts = [
            f"run ended at step {self.step}" + (f"/{self.total_steps}" if self.total_steps else ""),
            f"{duration(time.monotonic() - began)} since step {first}",
            f"loss {self.last['loss']:.4f}",
        ]
        if "eval_loss" in self.last:
            parts.append(f"eval_loss {self.last['eval_loss']:.4f}")
        parts += [
            f"{key.split('/')[1]} acc {value:.3f}"
            for key, value in self.last.items()
            if key.startswith("eval/") and key.endswith("/acc")
        ]
        if "consumed_tokens" in self.last:
            parts.append(f"{self.last['consumed_tokens']:,} tokens")
        if "goodput" in self.last:
            parts.append(f"goodput {self.last['goodput']:.1%}")
        if "checkpoint_step" in self.last:
            parts.append(f"newest checkpoint: step {self.last['checkpoint_step']}")
        log.info(" | ".join(parts))
