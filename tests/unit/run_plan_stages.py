"""Compares each stage's parameters as gptscale.plan composes them with the stage megatron-core builds.

Runs in a process of its own (the planner's fake process group needs torch.distributed unused); prints
one JSON line per (model, layout, stage): whether they are equal.
"""

import json

import torch

from gptscale.config import check, load_config
from gptscale.config.schema import Backend
from gptscale.model.build import build_model
from gptscale.plan.counts import fake_groups, from_module, rank_parameters
from gptscale.plan.meta import on_meta

CASES = [
    ("gpt2-tiny", ["parallel.pp=2", "parallel.vpp=2"], 2),
    ("llama-tiny", ["parallel.pp=4"], 4),
    ("moe-tiny", ["parallel.pp=2", "parallel.vpp=2", "model.moe.layer_freq=2"], 2),
    ("llama-tiny", ["parallel.tp=2", "parallel.pp=2"], 4),
]

for model, overrides, world in CASES:
    cfg = load_config([f"model={model}", *overrides])
    layout = check(cfg, world)
    for stage in range(layout.pp):
        composed = rank_parameters(cfg, layout, 300, stage)
        with fake_groups(layout, layout.tp * stage), on_meta():
            built = from_module(
                build_model(cfg.model, cfg.parallel, cfg.train, 300, Backend.local, torch.device("meta"))
            )
        print(
            json.dumps({"case": [model, *overrides], "stage": stage, "equal": composed == built, "numel": built.total})
        )
