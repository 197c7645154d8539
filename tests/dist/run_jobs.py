"""Runs several training jobs one after another in one torchrun launch (imports cost more than tiny runs).

Usage: torchrun --nproc_per_node=N tests/dist/run_jobs.py JOBS.json RESULTS.json
JOBS.json holds a list of override lists (``test.nan_steps=[...]`` among them plants NaN losses: tests/faults);
rank 0 writes, per job, every step's loss and gradient norm.
"""

import json
import sys

import torch.distributed as dist

from gptscale.config import load_config
from gptscale.train.trainer import Trainer
from tests.faults import injected, split_overrides
from tests.helpers import Curves


def main(jobs_path: str, results_path: str) -> None:
    jobs = json.load(open(jobs_path))
    results = []
    for overrides in jobs:
        overrides, nan_steps = split_overrides(overrides)
        trainer, curves = Trainer(load_config(overrides)), Curves()
        try:
            with injected(nan_steps=nan_steps):
                trainer.fit(on_step=curves)
            results.append(curves.lists())
        finally:
            trainer.close()
    if dist.get_rank() == 0:
        json.dump(results, open(results_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
