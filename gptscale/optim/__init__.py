"""The optimizers a run chooses by ``optim.name``, and what each declares so the rest of the house needs no
knowledge of any one optimizer: how it is built, its per-parameter state (checkpointed and resharded by
name, counted by the planner) and the ZeRO stages at which DeepSpeed runs it correctly.

This room imports torch only. Adding an optimizer is one file declaring an ``OptimizerKind`` and one line
in ``OPTIMIZERS``, plus its ``conf/optim/<name>.yaml``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from gptscale.optim import adamw, lion
from gptscale.optim.kind import GatedStep, OptimizerKind

OPTIMIZERS: dict[str, OptimizerKind] = {kind.name: kind for kind in (adamw.KIND, lion.KIND)}

# Names users will try that the installed DeepSpeed (0.19) would run wrongly without saying so.
REFUSED = {
    "muon": "DeepSpeed releases ran Muon silently as plain SGD at ZeRO-0 (DeepSpeed issue 8441) and under bf16 "
    "ZeRO-1 with fp32 gradient accumulation, gptscale's bf16 setting (PR 8442), and silently on its "
    "AdamW branch under ZeRO-3 (PR 8438); it is not offered until the installed DeepSpeed is verified "
    "at every stage",
    "adafactor": "Adafactor factors each matrix's second moment into row and column statistics, but ZeRO >= 1 "
    "hands the optimizer flat 1-D partitions (the factored moment silently becomes unfactored) "
    "and a tensor-parallel shard's statistics are not the whole matrix's, so results would "
    "depend on the layout",
}


def build(optim: Any, param_groups: list[dict], decide: Callable[[], Optional[torch.Tensor]]) -> GatedStep:
    """The optimizer ``optim.name`` names (``optim``: the run's OptimConfig) over ``param_groups``, skipping
    each update ``decide()`` says to skip."""
    return OPTIMIZERS[optim.name].build(optim, param_groups, decide=decide)


__all__ = ["OPTIMIZERS", "REFUSED", "GatedStep", "OptimizerKind", "build"]
