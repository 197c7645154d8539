"""What a person reads: every command's logging setup, and the log line
``step N | loss X | lr ... | grad_norm ... | tokens/s ... | TFLOP/s ... | MFU ...``."""

from __future__ import annotations

import logging
import os

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


def format_line(step: int, metrics: dict) -> str:
    parts = [f"step {step}"]
    for key, (label, fmt) in _FORMATS.items():
        if key in metrics:
            value = metrics[key]
            parts.append(f"{label} {'n/a' if value is None else fmt.format(value)}")
    parts += [f"{key.split('/')[1]} acc {value:.3f}" for key, value in metrics.items()
              if key.startswith("eval/") and key.endswith("/acc")]
    return " | ".join(parts)


class ConsoleSink:
    def log(self, step: int, metrics: dict) -> None:
        log.info(format_line(step, metrics))

    def close(self) -> None:
        pass
