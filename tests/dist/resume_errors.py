"""Tries each resume in turn in one torchrun launch and records why it was refused.

Usage: torchrun --nproc_per_node=N tests/dist/resume_errors.py JOBS.json RESULTS.json
JOBS.json holds a list of override lists; rank 0 writes, per job, the CheckpointError message (null when the
resume went through).
"""

import json
import sys

import torch.distributed as dist

from gptscale.checkpoint import CheckpointError
from gptscale.config import load_config
from gptscale.parallel.groups import destroy_model_parallel
from gptscale.train.trainer import Trainer


def main(jobs_path: str, results_path: str) -> None:
    results = []
    for overrides in json.load(open(jobs_path)):
        try:
            Trainer(load_config(overrides)).close()
            results.append(None)
        except CheckpointError as error:
            destroy_model_parallel()
            results.append(str(error))
    if dist.get_rank() == 0:
        json.dump(results, open(results_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
