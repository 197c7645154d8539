"""The process groups DeepSpeed asks for (``mpu=``), answered by megatron-core's parallel_state."""

from __future__ import annotations

import functools

import torch.distributed as dist
from megatron.core import parallel_state


class MegatronMpu:
    """The process-group interface DeepSpeed asks for (``mpu=``), answered by megatron-core's parallel_state.

    DeepSpeed reduces gradients over the data-parallel group with its context-parallel ranks (each holds part
    of every sequence, so their gradients are partial sums too), sums gradient norms over the model-parallel
    (TP x PP) group, and counts a parameter replicated over TP ranks on the rank whose "model-parallel rank"
    is 0: as in Megatron-DeepSpeed, that rank is the tensor-parallel rank, so each pipeline stage counts its
    own replicated parameters.
    """

    get_data_parallel_group = staticmethod(
        functools.partial(parallel_state.get_data_parallel_group, with_context_parallel=True)
    )
    get_data_parallel_rank = staticmethod(
        functools.partial(parallel_state.get_data_parallel_rank, with_context_parallel=True)
    )
    get_data_parallel_world_size = staticmethod(
        functools.partial(parallel_state.get_data_parallel_world_size, with_context_parallel=True)
    )
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
