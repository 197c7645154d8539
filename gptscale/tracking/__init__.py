"""Where metrics go: the console line, RUN_DIR/metrics.jsonl, W&B and TensorBoard. Only global rank 0 logs.

Every sink takes ``log(step, metrics)``; whatever logs a number (the loop, evaluation, the checkpointer with
``{"checkpoint_step": step}``) goes through the tracker. The tracker is a trainer component: its
``state_dict()`` (the W&B run id) is saved with each checkpoint so that a resumed run continues the same W&B run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from omegaconf import OmegaConf

from gptscale.config.schema import Config, WandbMode
from gptscale.tracking.console import ConsoleSink
from gptscale.tracking.jsonl import METRICS, JsonlSink


class Sink(Protocol):
    def log(self, step: int, metrics: dict) -> None: ...

    def close(self) -> None: ...


class Tracker:
    """Fans each step's metrics out to every sink; has no sinks on ranks other than 0."""

    def __init__(self, sinks: dict[str, Sink]):
        self.sinks = sinks

    def log(self, step: int, metrics: dict) -> None:
        for sink in self.sinks.values():
            sink.log(step, metrics)

    def state_dict(self) -> dict:
        return {name: sink.state_dict() for name, sink in self.sinks.items() if hasattr(sink, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        """Restore the sinks this run has; state of a sink it has not (W&B turned off since) is dropped."""
        for name, sink_state in state.items():
            sink = self.sinks.get(name)
            if sink is not None and hasattr(sink, "load_state_dict"):
                sink.load_state_dict(sink_state)

    def close(self) -> None:
        for sink in self.sinks.values():
            sink.close()


def config_dict(cfg: Config) -> dict:
    """The resolved configuration as plain types (enums as their names), the way trackers store it."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def build_tracker(cfg: Config, is_logging_rank: bool) -> Tracker:
    if not is_logging_rank:
        return Tracker({})
    run_dir = Path(cfg.run_dir)
    sinks: dict[str, Sink] = {"console": ConsoleSink(cfg.train.steps), "jsonl": JsonlSink(run_dir / METRICS)}
    if cfg.logging.wandb.mode is not WandbMode.disabled:
        from gptscale.tracking.wandb import WandbSink  # wandb is slow to import; only runs that use it pay

        sinks["wandb"] = WandbSink(cfg.logging.wandb, run_dir, config_dict(cfg))
    if cfg.logging.tensorboard:
        from gptscale.tracking.tensorboard import TensorBoardSink

        sinks["tensorboard"] = TensorBoardSink(run_dir / "tensorboard", config_dict(cfg))
    return Tracker(sinks)
