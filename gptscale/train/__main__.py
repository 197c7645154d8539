"""``gptscale-train`` / ``torchrun -m gptscale.train``: a Hydra app over conf/."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from gptscale.config import CONFIG_DIR, ConfigError, check, register_schema, to_config


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _setup_logging(level: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO) if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s" if rank == 0 else f"%(asctime)s rank {rank} %(message)s",
        datefmt="%H:%M:%S",
    )
    for chatty in ("megatron", "DeepSpeed"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def _run(dict_cfg: DictConfig) -> None:
    cfg = to_config(dict_cfg)
    _setup_logging(cfg.logging.level)
    try:
        check(cfg, world_size_from_env())
        from gptscale.train.trainer import Trainer  # heavy imports only once the config is known to be valid

        trainer = Trainer(cfg)  # checks what needs the device too (FP8 hardware)
    except ConfigError as error:
        logging.getLogger("gptscale").error("%s", error)
        sys.exit(2)
    try:
        trainer.fit()
    finally:
        trainer.close()


def main() -> None:
    register_schema()
    _run()


if __name__ == "__main__":
    main()
