"""The DeepSpeed engine over a megatron-core model: ZeRO, mixed precision, gradient clipping, the optimizer.

The engine's configuration is derived here, in one place, from gptscale's typed configs; nothing else
builds or passes DeepSpeed JSON. The optimizer (``optim.name``, built by ``gptscale.optim``) is a torch
optimizer handed to DeepSpeed, so no C++ op is compiled at start-up (DeepSpeed's FusedAdam and FusedLion
JIT-build for minutes on CPU and need a matching CUDA toolchain on GPU).
"""

from __future__ import annotations

import functools
import os
import types
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from gptscale.config.layout import Layout
from gptscale.config.schema import OptimConfig, Precision, TrainConfig
from gptscale.optim import build as build_optimizer


class MegatronMpu:
    """The process-group interface DeepSpeed asks for (``mpu=``), answered by megatron-core's parallel_state.

    DeepSpeed reduces gradients over the data-parallel group with its context-parallel ranks (each holds part
    of every sequence, so their gradients are partial sums too), sums gradient norms over the model-parallel
    (TP x PP) group, and counts a parameter replicated over TP ranks on the rank whose "model-parallel rank"
    is 0: as in Megatron-DeepSpeed, that rank is the tensor-parallel rank, so each pipeline stage counts its
    own replicated parameters.
    """

    get_data_parallel_group = staticmethod(functools.partial(parallel_state.get_data_parallel_group,
                                                             with_context_parallel=True))
    get_data_parallel_rank = staticmethod(functools.partial(parallel_state.get_data_parallel_rank,
                                                            with_context_parallel=True))
    get_data_parallel_world_size = staticmethod(functools.partial(parallel_state.get_data_parallel_world_size,
                                                                  with_context_parallel=True))
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(parallel_state.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_model_parallel_group)

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(group=parallel_state.get_model_parallel_group())


class ExpertParallelMpu(MegatronMpu):
    """The process groups DeepSpeed gets under expert parallelism (``parallel.ep`` > 1).

    DeepSpeed reduces gradients over the expert-data-parallel group (the ranks holding the same experts,
    context-parallel ones included: megatron-core folds them into it);
    ``register_expert_parallel_hooks`` first sums dense gradients over the expert-parallel group, so dense
    weights still see the whole data-parallel batch. Norms are summed over tensor x expert x pipeline ranks,
    where each expert-parallel rank holds other experts.
    """

    get_data_parallel_group = staticmethod(parallel_state.get_expert_data_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_expert_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_expert_data_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_expert_tensor_model_pipeline_parallel_group)

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())


def engine_config(layout: Layout, zero: int, optim: OptimConfig, train: TrainConfig) -> dict:
    """DeepSpeed's JSON for this run.

    Without pipelining the engine runs the gradient-accumulation loop itself. With pipelining megatron-core's
    schedule runs every micro-batch, so the engine sees one (large) micro-batch per step.
    """
    accumulation = layout.num_microbatches if layout.pp == 1 else 1
    micro = layout.micro_batch * (layout.num_microbatches // accumulation)
    bf16 = train.precision == Precision.bf16
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * layout.expert_dp,
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": zero,
            "contiguous_gradients": layout.pp == 1,
            "overlap_comm": False,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device at every forward and step by default, which
        # stops the host from queueing work ahead; gptscale measures throughput itself (train/metrics.py).
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if bf16 and zero >= 1:
        # Sum micro-batch gradients in fp32 under bf16 weights (DeepSpeed's default sums in bf16). DeepSpeed
        # offers this only with ZeRO; without it, bf16 gradients accumulate in bf16.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and norm scales keep their scale (GPT-2/Megatron practice)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_engine(model: torch.nn.Module, layout: Layout, zero: int, optim: OptimConfig, train: TrainConfig):
    """Wrap ``model`` in a DeepSpeed engine with the optimizer ``optim.name``; returns the engine."""
    optimizer = build_optimizer(optim, parameter_groups(model, optim.weight_decay))
    _hide_megatron_expert_marks(model)
    mpu = ExpertParallelMpu() if layout.ep > 1 else MegatronMpu()
    start_only = _lend_local_rank(zero)
    try:
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=engine_config(layout, zero, optim, train),
            mpu=mpu,
            dist_init_required=False,
        )
    finally:
        if start_only:
            release_local_rank()
    engine.clip_fp32_gradients = types.MethodType(_clip_and_record_norm, engine)
    engine.update_gate = UpdateGate(engine, optimizer)
    return engine


def _hide_megatron_expert_marks(model: torch.nn.Module) -> None:
    """megatron-core marks expert weights ``allreduce=False`` (its own optimizer reduces them apart). DeepSpeed
    reads that mark as "one of my MoE layers" and looks for expert groups of its own; gptscale instead gives
    the engine the expert-data-parallel group (``ExpertParallelMpu``), so the mark is removed."""
    for param in model.parameters():
        if hasattr(param, "allreduce"):
            del param.allreduce


@dataclass(frozen=True)
class UpdateLimits:
    """Above which loss and gradient norm a step is a spike and skipped (``SpikeDetector.update_limits``)."""

    loss: float = float("inf")
    norm: float = float("inf")
    require_both: bool = False  # a spike needs both above their limits; false: either


class UpdateGate:
    """The one place that decides whether a step updates anything: not when the loss or gradient norm is not
    finite, nor when it is a loss spike (``train/guard.py``): a value above its limit (both values with
    ``require_both``).

    It sits in front of the torch optimizer's step, which every DeepSpeed path (ZeRO 0-3, bf16) calls after
    the global gradient norm is known, and hands the decision over as ``found_inf`` (the attribute torch's
    GradScaler sets on optimizers that declare ``_step_supports_amp_scaling``): weights, optimizer state and
    the step count stay as they were, and the host never waits for the device to decide. An optimizer that
    would ignore ``found_inf`` is refused.
    """

    def __init__(self, engine, optimizer: torch.optim.Optimizer):
        self.engine = engine
        # Set by ``train.step.train_step`` alone, for the step it runs: its global loss (before the update) and
        # limits; the decision it reads back (1.0 when the update was skipped; None: DeepSpeed skipped first).
        self.loss: torch.Tensor | None = None
        self.limits = UpdateLimits()
        self.skipped: torch.Tensor | None = None
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            raise TypeError(f"{type(optimizer).__name__} does not read found_inf (_step_supports_amp_scaling): "
                            "a skipped step would still update the weights")
        step = optimizer.step

        def gated_step(*args, **kwargs):
            optimizer.found_inf = self.decide()
            return step(*args, **kwargs)

        optimizer.step = gated_step

    def grad_norm(self):
        wrapper = self.engine.optimizer
        norm = getattr(wrapper, "_global_grad_norm", None)
        return norm if norm is not None else self.engine._global_grad_norm

    def decide(self) -> torch.Tensor:
        skip = torch.zeros((), dtype=torch.bool, device=self.engine.device)
        high = []  # which of the loss and the gradient norm are above their spike limits
        if self.loss is not None:
            loss = self.loss.to(skip.device)
            skip = skip | ~torch.isfinite(loss)
            high.append(loss > self.limits.loss)
        norm = self.grad_norm()
        if norm is not None:
            norm = torch.as_tensor(norm, dtype=torch.float32, device=skip.device)
            skip = skip | ~torch.isfinite(norm)
            high.append(norm > self.limits.norm)
        if high:
            spike = torch.stack(high).all() if self.limits.require_both else torch.stack(high).any()
            skip = skip | spike
        self.skipped = skip.float()
        return self.skipped


_LENT_LOCAL_RANK = False


def _lend_local_rank(zero: int) -> bool:
    """DeepSpeed's engine insists on LOCAL_RANK, which launchers set: a lone process is local rank 0 while the
    engine starts and, under ZeRO-3 (which reads it at every step for its gather buffers), until
    ``release_local_rank`` (the trainer calls it when it closes); processes started later must not inherit
    it. Returns whether the variable was lent for the engine's start only."""
    global _LENT_LOCAL_RANK
    if "LOCAL_RANK" in os.environ:
        return False
    os.environ["LOCAL_RANK"] = "0"
    _LENT_LOCAL_RANK = True
    return zero != 3


def release_local_rank() -> None:
    global _LENT_LOCAL_RANK
    if _LENT_LOCAL_RANK:
        os.environ.pop("LOCAL_RANK", None)
        _LENT_LOCAL_RANK = False


def reduce_gradients_outside_engine(engine) -> None:
    """What ``engine.backward`` does after autograd, for gradients that megatron-core's pipeline schedule made.

    As in DeepSpeed's own pipeline engine: the bf16 optimizer first folds the bf16 gradients into its fp32
    accumulators, then gradients are reduced over data-parallel ranks (ZeRO-1 partitions them there).
    """
    if hasattr(engine.optimizer, "update_hp_grads"):
        engine.optimizer.update_hp_grads()
    engine.allreduce_gradients()


def _counted_in_norm(param: torch.nn.Parameter) -> bool:
    """Whether this rank adds ``param`` to the global norm, so that each weight counts exactly once."""
    if getattr(param, "ds_pipe_replicated", False):
        return False
    return getattr(param, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_rank() == 0


def _clip_and_record_norm(engine) -> None:
    """Clipping for fp32 without ZeRO, recording the global norm (which DeepSpeed's version drops).

    ZeRO and bf16 optimizers record the norm themselves. DeepSpeed's fp32 path also counts the last pipeline
    stage's copy of a tied embedding a second time; this one does not. A non-finite norm skips the update
    through ``UpdateGate``, without waiting for the device.
    """
    params = [p for p in engine.module.parameters() if p.grad is not None]
    squares = [p.grad.detach().float().pow(2).sum() for p in params if _counted_in_norm(p)]
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=params[0].device)
    dist.all_reduce(total, group=engine.mpu.get_model_parallel_group())
    norm = total.sqrt()
    engine._global_grad_norm = norm
    torch.nn.utils.clip_grads_with_norm_(params, engine.gradient_clipping(), norm)
