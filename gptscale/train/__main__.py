"""``gptscale-train`` / ``torchrun -m gptscale.train``: a Hydra app over conf/."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from gptscale.config import CONFIG_DIR, ConfigError, check, register_schema, to_config


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _export_submitit_ranks() -> None:
    """A rank started as one SLURM task of ``hydra/launcher=slurm`` learns its place from submitit (torchrun sets it)."""
    if "RANK" not in os.environ and "SUBMITIT_EXECUTOR" in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def setup_logging(level: str) -> None:
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
    _export_submitit_ranks()
    cfg = to_config(dict_cfg)
    from gptscale.checkpoint.adopt import adopt_model

    try:
        cfg = adopt_model(cfg, list(HydraConfig.get().overrides.task))
    except ConfigError as error:
        logging.getLogger("gptscale").error("%s", error)
        sys.exit(2)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.run_dir = HydraConfig.get().runtime.output_dir  # each run of a sweep writes into its own directory
    setup_logging(cfg.logging.level)
    log = logging.getLogger("gptscale")
    try:
        check(cfg, world_size_from_env())
    except ConfigError as error:
        log.error("%s", error)
        sys.exit(2)
    # Heavy imports only once the config is known to be valid.
    from torch.distributed.elastic.multiprocessing.errors import record

    from gptscale.checkpoint import CheckpointError
    from gptscale.train.guard import TooManyBadSteps

    try:
        record(_train)(cfg)  # an error is also written where torchrun reads it, to name the rank that failed first
    except ConfigError as error:  # what only the device can tell (FP8 hardware)
        log.error("%s", error)
        sys.exit(2)
    except (CheckpointError, TooManyBadSteps) as error:
        log.error("%s", error)
        sys.exit(1)


def _train(cfg) -> None:
    from gptscale.train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()


def main() -> None:
    register_schema()
    _run()


if __name__ == "__main__":
    main()
