"""TensorBoard: every logged metric as a scalar at its step, and the resolved config as text."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter


class TensorBoardSink:
    def __init__(self, log_dir: Path, config: dict):
        self.writer = SummaryWriter(log_dir=str(log_dir))
        yaml = OmegaConf.to_yaml(OmegaConf.create(config))
        self.writer.add_text("config", "".join(f"    {line}\n" for line in yaml.splitlines()), 0)

    def log(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):  # lists (tokens per expert) go to metrics.jsonl only
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
