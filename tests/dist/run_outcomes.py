"""Runs several jobs one after another in one torchrun launch, recording how each ended.

Usage: torchrun --nproc_per_node=N tests/dist/run_outcomes.py JOBS.json RESULTS.json
JOBS.json maps names to override lists (``test.nan_steps=[...]`` plants NaN losses: tests/faults); rank 0 writes,
per name, what ``Trainer.fit`` returns (every step's loss and gradient norm) for a job that trained to the end,
or ``{"error": "..."}`` for one refused by a checkpoint check or stopped by the loss guard.
"""

import json
import sys

import torch.distributed as dist

from gptscale.checkpoint import CheckpointError
from gptscale.config import load_config
from gptscale.parallel.groups import destroy_model_parallel
from gptscale.train.guard import TooManyBadSteps
from gptscale.train.trainer import Trainer
from tests.faults import injected, split_overrides
from tests.helpers import Curves


def main(jobs_path: str, results_path: str) -> None:
    results = {}
    for name, overrides in json.load(open(jobs_path)).items():
        overrides, nan_steps = split_overrides(overrides)
        trainer = None
        try:
            trainer, curves = Trainer(load_config(overrides)), Curves()
            with injected(nan_steps=nan_steps):
                trainer.fit(on_step=curves)
            results[name] = curves.lists()
        except (CheckpointError, TooManyBadSteps) as error:
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        finally:
            if trainer is not None:
                trainer.close()
            destroy_model_parallel()
    if dist.get_rank() == 0:
        json.dump(results, open(results_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
