"""Weights & Biases: the resolved config, every logged metric at its step, and a run id that survives a resume.

The W&B run starts at the first ``log``, not at construction, so that a checkpoint restored in between
(``load_state_dict``) makes the resumed job continue the run it was saved from.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any, Optional

import wandb

from gptscale.config.schema import WandbConfig, WandbMode

log = logging.getLogger("gptscale")


def choose_mode(requested: WandbMode, run_dir: Path) -> str:
    """``online`` needs an API key (WANDB_API_KEY, ~/.netrc, ``wandb login``); without one, log offline."""
    if requested is WandbMode.online and not wandb.login(verify=False, prompt=False):
        log.warning(
            "logging.wandb.mode=online but no W&B API key is set (WANDB_API_KEY or `wandb login`): "
            "logging offline under %s; upload it later with `wandb sync`",
            run_dir / "wandb",
        )
        return WandbMode.offline.value
    return requested.value


class WandbSink:
    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict):
        self.cfg = cfg
        self.run_dir = run_dir
        self.config = config
        self.mode = choose_mode(cfg.mode, run_dir)
        self.run_id = secrets.token_hex(4)
        self.run: Optional[Any] = None  # wandb.Run once the first metrics arrive

    def _start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            group=self.cfg.group,
            name=self.cfg.name,
            tags=list(self.cfg.tags),
            mode=self.mode,  # type: ignore[arg-type]
            id=self.run_id,
            resume="allow",
            dir=self.run_dir,
            config=self.config,
        )

    def log(self, step: int, metrics: dict) -> None:
        if self.run is None:
            self._start()
        scalars = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
        assert self.run is not None
        self.run.log(scalars, step=step)  # lists (tokens per expert) go to metrics.jsonl only

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        if self.run is not None:
            raise RuntimeError(f"W&B run {self.run_id} has already started: restore the tracker before it logs")
        self.run_id = state["run_id"]

    def close(self) -> None:
        """Finish the run and wait until W&B has written it: ``finish`` returns before its files are complete."""
        if self.run is not None:
            self.run.finish()
            self.run = None
            wandb.teardown()
