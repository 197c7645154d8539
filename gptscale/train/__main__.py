"""``gptscale-train`` / ``torchrun -m gptscale.train``: a Hydra app over conf/."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from gptscale.config import CONFIG_DIR, check, register_schema, to_config
from gptscale.errors import GptscaleError, report
from gptscale.tracking.console import setup_logging


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _export_submitit_ranks() -> None:
    """A rank started as one SLURM task of ``hydra/launcher=slurm`` learns its place from submitit (torchrun sets it)."""
    if "RANK" not in os.environ and "SUBMITIT_EXECUTOR" in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def _run(dict_cfg: DictConfig) -> None:
    _export_submitit_ranks()
    setup_logging(dict_cfg.logging.level)
    from torch.distributed.elastic.multiprocessing.errors import record

    record(_train_reporting)(dict_cfg)  # an unexpected error is also written where torchrun reads it, naming
    # the rank that failed first; gptscale's own errors are reported here, once


def _train_reporting(dict_cfg: DictConfig) -> None:
    log = logging.getLogger("gptscale")
    try:
        train(dict_cfg)
    except GptscaleError as error:  # configuration, data, checkpoint: one clear line, no traceback
        sys.exit(report(error, log))
    except KeyboardInterrupt:  # a second Ctrl-C (the first saves and stops)
        log.error("stopped by a second Ctrl-C without saving: the run resumes from its newest complete checkpoint")
        sys.exit(130)


def train(dict_cfg: DictConfig) -> None:
    from gptscale.checkpoint.adopt import adopt_model

    cfg = adopt_model(to_config(dict_cfg), list(HydraConfig.get().overrides.task))
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.run_dir = HydraConfig.get().runtime.output_dir  # each run of a sweep writes into its own directory
    check(cfg, world_size_from_env())
    from gptscale.train.trainer import Trainer  # heavy imports only once the config is known to be valid

    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()


def main() -> None:
    if {"--help", "-h"} & set(sys.argv[1:]):
        from gptscale.config import load_config
        from gptscale.config.help import help_page

        print(help_page(load_config([])))
        return
    register_schema()
    _run()


if __name__ == "__main__":
    main()
