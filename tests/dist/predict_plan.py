"""Predicts, in a process of its own (the planner's fake process group needs torch.distributed unused), the
model-state and activation bytes of the ranks a real run reported.

Usage: python tests/dist/predict_plan.py HELD.json PREDICTED.json
"""

import json
import sys
from dataclasses import asdict

from gptscale.config import check, load_config
from gptscale.plan.activations import stage_activation_bytes
from gptscale.plan.memory import rank_states


def predict(result: dict) -> dict:
    cfg = load_config(result["overrides"])
    layout = check(cfg, result["world_size"])
    states = rank_states(cfg, layout, result["vocab_size"], result["pp_rank"], result["ep_rank"], result["dp_rank"])
    one_microbatch, in_flight = stage_activation_bytes(cfg, layout, result["vocab_size"], result["pp_rank"])
    return {"states": asdict(states), "activations": one_microbatch, "in_flight": in_flight}


if __name__ == "__main__":
    results = json.load(open(sys.argv[1]))
    json.dump([predict(result) for result in results], open(sys.argv[2], "w"))
