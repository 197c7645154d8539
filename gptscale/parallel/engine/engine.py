"""The engine adapter: forward, backward, the update (with its skip decision and gradient norm), optimizer state.

Without pipelining DeepSpeed runs the loop it is built for: ``backward`` per micro-batch, reducing gradients
over data-parallel ranks at the last one (partitioning them under ZeRO-2/3), then ``update``. With pipelining
megatron-core's schedule has already run every backward, so ``update`` first does what DeepSpeed's own
pipeline engine does after autograd: the bf16 optimizer folds bf16 gradients into its fp32 accumulators, and
gradients are reduced over data-parallel ranks (ZeRO-1 partitions them there).

The update is skipped, on the device, when the loss or gradient norm is not finite or the step is a spike
(``gate.skip_update``): the optimizers offered (``gptscale.optim``) ask the adapter at each step, through the
``decide`` they were built with, after DeepSpeed has computed the global norm and before they change anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import deepspeed
import torch

from gptscale.config.layout import Layout
from gptscale.config.schema import OptimConfig, TrainConfig
from gptscale.optim import OPTIMIZERS
from gptscale.optim import build as build_optimizer
from gptscale.parallel.engine.config import engine_config, owns_clipping, parameter_groups
from gptscale.parallel.engine.gate import UpdateLimits, skip_update
from gptscale.parallel.engine.mpu import ExpertParallelMpu, MegatronMpu
from gptscale.parallel.engine.norm import clip_with_norm
from gptscale.parallel.engine.state import OptimizerState


@dataclass(frozen=True)
class Update:
    """What one optimizer update did: device tensors, read by the host only where a decision needs them."""

    skipped: Optional[torch.Tensor]  # 1.0 when the gate skipped it; None: DeepSpeed skipped before asking
    grad_norm: Optional[torch.Tensor]  # global, before clipping


class Engine:
    """A megatron-core model (its chunks on this rank) in a DeepSpeed engine with the optimizer ``optim.name``."""

    def __init__(self, model: torch.nn.Module, layout: Layout, optim: OptimConfig, train: TrainConfig):
        self.layout = layout
        self.owns_clipping = owns_clipping(layout, train)
        self.grad_clip = optim.grad_clip
        self._pending: Optional[tuple[torch.Tensor, UpdateLimits]] = None  # the update in progress
        self._decision: Optional[torch.Tensor] = None
        self._norm: Optional[torch.Tensor] = None
        self._before_update: list[Callable[[], None]] = []
        optimizer = build_optimizer(optim, parameter_groups(model, optim.weight_decay), decide=self._decide)
        _hide_megatron_expert_marks(model)
        self.lent_local_rank = "LOCAL_RANK" not in os.environ
        if self.lent_local_rank:
            # DeepSpeed insists on LOCAL_RANK, which launchers set; a lone process is local rank 0 while the
            # engine starts and, under ZeRO-3 (which reads it at every step for its gather buffers), until
            # close(): processes started later must not inherit it.
            os.environ["LOCAL_RANK"] = "0"
        try:
            self.deepspeed, *_ = deepspeed.initialize(
                model=model,
                optimizer=optimizer,
                config=engine_config(layout, optim, train),
                mpu=ExpertParallelMpu() if layout.ep > 1 else MegatronMpu(),
                dist_init_required=False,
            )
        finally:
            if self.lent_local_rank and layout.zero != 3:
                self._return_local_rank()
        self.state = OptimizerState(self.deepspeed, OPTIMIZERS[optim.name].state)

    @property
    def optimizer(self):
        """DeepSpeed's optimizer (the torch optimizer itself for fp32 without ZeRO): its param_groups hold the lr."""
        return self.deepspeed.optimizer

    @property
    def device(self) -> torch.device:
        return self.deepspeed.device

    def __call__(self, *args, **kwargs):
        """The model's forward through DeepSpeed (ZeRO-3 gathers partitioned weights there)."""
        return self.deepspeed(*args, **kwargs)

    def train(self) -> None:
        self.deepspeed.train()

    def eval(self) -> None:
        self.deepspeed.eval()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch without pipelining; ``update`` follows the last one."""
        self.deepspeed.backward(loss)
        if not self.deepspeed.is_gradient_accumulation_boundary():
            self.deepspeed.step()  # counts the micro-batch; DeepSpeed updates only at the boundary

    def update(self, loss: torch.Tensor, limits: UpdateLimits) -> Update:
        """The optimizer update of the step whose global ``loss`` is given, unless the gate skips it."""
        if self.layout.pp > 1:
            if hasattr(self.optimizer, "update_hp_grads"):
                self.optimizer.update_hp_grads()
            self.deepspeed.allreduce_gradients()
        self._norm = None
        if self.owns_clipping:
            self._norm = clip_with_norm(
                self.deepspeed.module, self.grad_clip, self.deepspeed.mpu.get_model_parallel_group()
            )
        while self._before_update:
            self._before_update.pop(0)()
        self._pending, self._decision = (loss, limits), None
        self.deepspeed.step()
        self._pending = None
        norm = self._norm if self.owns_clipping else self.deepspeed.get_global_grad_norm()
        return Update(self._decision, None if norm is None else torch.as_tensor(norm, dtype=torch.float32))

    def before_next_update(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` once, in the next update, when gradients are reduced and clipped and DeepSpeed's step has
        not begun (gptscale-plan's check records the gradient buffers then)."""
        self._before_update.append(hook)

    def _decide(self) -> Optional[torch.Tensor]:
        """Asked by the optimizer at each of its steps (``gptscale.optim.GatedStep``); None outside ``update``
        (DeepSpeed's bf16 optimizer steps once at its start, with zero gradients, to create the state)."""
        if self._pending is None:
            return None
        loss, limits = self._pending
        norm = self._norm if self.owns_clipping else getattr(self.optimizer, "_global_grad_norm", None)
        self._decision = skip_update(loss, norm, limits, self.device)
        return self._decision

    def _return_local_rank(self) -> None:
        if self.lent_local_rank:
            os.environ.pop("LOCAL_RANK", None)
            self.lent_local_rank = False

    def close(self) -> None:
        self._return_local_rank()


def _hide_megatron_expert_marks(model: torch.nn.Module) -> None:
    """megatron-core marks expert weights ``allreduce=False`` (its own optimizer reduces them apart). DeepSpeed
    reads that mark as "one of my MoE layers" and looks for expert groups of its own; gptscale instead gives
    the engine the expert-data-parallel group (``ExpertParallelMpu``), so the mark is removed."""
    for param in model.parameters():
        if hasattr(param, "allreduce"):
            del param.allreduce
