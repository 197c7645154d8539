"""``gptscale-eval --checkpoint CKPT [key=value ...]``: held-out loss and multiple-choice accuracy of a checkpoint.

Prints one JSON line per task: ``{"task": "heldout", "loss", "perplexity"}`` for the validation split of the
checkpoint's dataset (``train.eval_batches`` global batches, the figure training logs as ``eval_loss``), then
``{"task", "examples", "acc", "acc_norm"}`` for each file of ``eval.tasks``. Runs in one process or under
torchrun at any layout: the run's configuration is the checkpoint's, with the layout (``parallel.tp``,
``pp``, ``vpp``, ``sp``, ``ep``, ``zero``) starting from one rank's and the command line's ``key=value``
overrides on top (``eval.tasks=[arc.jsonl]``, ``parallel.tp=2``, ``data.path=...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import cast

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gptscale.checkpoint.files import CONFIG, saved_config
from gptscale.checkpoint.publish import resolve
from gptscale.config.schema import Config, ParallelConfig, WandbMode
from gptscale.config.validate import ConfigError, check
from gptscale.errors import GptscaleError, report
from gptscale.files import replace_text
from gptscale.parallel.groups import world_size_from_env
from gptscale.tracking.console import setup_logging

log = logging.getLogger("gptscale")
LAYOUT_FIELDS = ("tp", "pp", "vpp", "sp", "ep", "zero")


def eval_config(checkpoint: str, overrides: list[str], run_dir: str) -> Config:
    """The checkpoint's configuration, made into an evaluation run that loads its weights and writes nothing."""
    root = resolve(checkpoint, Path(checkpoint))
    if root is None or not (root / CONFIG).is_file():
        raise ConfigError(f"--checkpoint {checkpoint}: no checkpoint with a {CONFIG} there")
    saved = OmegaConf.merge(OmegaConf.structured(Config), saved_config(root))
    for name in LAYOUT_FIELDS:
        saved.parallel[name] = getattr(ParallelConfig(), name)
    try:
        cfg = cast(Config, OmegaConf.to_object(OmegaConf.merge(saved, OmegaConf.from_dotlist(overrides))))
    except OmegaConfBaseException as error:
        raise ConfigError(f"gptscale-eval: bad override ({error})") from None
    cfg.run_dir = run_dir
    cfg.task = dataclasses.replace(cfg.task, init=str(root))
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, resume="none", interval=0, save_final=False)
    cfg.logging.wandb.mode = WandbMode.disabled
    cfg.logging.tensorboard = False
    return cfg


def evaluate(cfg: Config, log_likelihoods: bool = False) -> list[dict]:
    """Every task's result line (a collective call: every rank runs it and gets the same lines)."""
    from gptscale.train.trainer import Trainer

    level = log.level
    log.setLevel(logging.WARNING)  # the trainer's setup speaks of training (resuming, optimizer memory)
    try:
        trainer = Trainer(cfg)
    finally:
        log.setLevel(level)
    log.info("evaluating %s (%s) at %d rank(s)", cfg.task.init, cfg.model.name, trainer.layout.world_size)
    try:
        loss, results = trainer.evaluate()
        lines = []
        if loss is not None:
            lines.append(
                {
                    "task": "heldout",
                    "loss": loss,
                    "perplexity": math.exp(loss),
                    "tokens": trainer.tokens_per_step * cfg.train.eval_batches,
                }
            )
        for result in results:
            line = result.summary()
            if log_likelihoods:
                line["log_likelihoods"] = result.log_likelihoods
            lines.append(line)
        return lines
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gptscale-eval", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--checkpoint", required=True, help="a checkpoint, or a run or checkpoints directory")
    parser.add_argument("--output", type=Path, help="also write the JSON lines to this file")
    parser.add_argument("--log-likelihoods", action="store_true", help="add each choice's log-likelihood")
    parser.add_argument("overrides", nargs="*", help="key=value configuration overrides")
    args = parser.parse_intermixed_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    with tempfile.TemporaryDirectory(prefix="gptscale-eval-") as run_dir:
        try:
            cfg = eval_config(args.checkpoint, args.overrides, run_dir)
            setup_logging(cfg.logging.level)
            check(cfg, world_size_from_env())
            lines = evaluate(cfg, args.log_likelihoods)
        except GptscaleError as error:
            sys.exit(report(error, log))
    if rank == 0:
        text = "".join(json.dumps(line) + "\n" for line in lines)
        sys.stdout.write(text)
        if args.output is not None:
            replace_text(args.output, text)


if __name__ == "__main__":
    main()
