"""Trains one step per layout and writes, per rank, predicted and held bytes of model states.

Usage: torchrun --nproc_per_node=N tests/dist/run_plan.py JOBS.json RESULTS_PREFIX
"""

import json
import sys

import torch.distributed as dist

from gptscale.config import load_config
from gptscale.config.schema import Precision
from gptscale.parallel.deepspeed import parameter_groups
from gptscale.plan.held import gradient_storages, held_bytes
from gptscale.plan.states import state_bytes
from gptscale.train.trainer import Trainer


def measure(overrides: list[str]) -> dict:
    cfg = load_config(overrides)
    trainer = Trainer(cfg)
    try:
        optimizer, recorded = trainer.engine.optimizer, {}
        update = optimizer.step

        def step(*args, **kwargs):
            recorded.update(gradient_storages(trainer.model, optimizer))
            return update(*args, **kwargs)

        optimizer.step = step
        trainer.fit()
        groups = [[p.numel() for p in group["params"]] for group in parameter_groups(trainer.model, 0.1)]
        predicted = state_bytes(groups, trainer.layout.dp, cfg.parallel.zero, cfg.train.precision == Precision.bf16)
        held = held_bytes(trainer.model, optimizer, recorded)
        return {"overrides": overrides, "predicted": vars(predicted), "held": vars(held)}
    finally:
        trainer.close()


def main(jobs_path: str, results_prefix: str) -> None:
    results = [measure(overrides) for overrides in json.load(open(jobs_path))]
    json.dump(results, open(f"{results_prefix}.{dist.get_rank()}.json", "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
