"""Gradient sums across model-parallel ranks that DeepSpeed's data-parallel reduction does not do.

- Sequence parallel: parameters applied to sequence-split activations (norms, row-parallel biases) get a
  partial gradient on each tensor-parallel rank. A hook all-reduces it as autograd produces it, before
  DeepSpeed sees it, so it composes with every ZeRO stage.
- Expert parallelism: DeepSpeed reduces over the expert-data-parallel group only, so the gradients of
  dense (non-expert) weights are first summed over the expert-parallel ranks by the same kind of hook; their
  copies on expert-parallel ranks other than 0 are left out of the gradient norm.
- Tied embeddings under pipelining: the first stage's input embedding and the last stage's output layer
  are the same weight held twice; their gradients are summed over megatron-core's embedding group after
  the pipeline schedule.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _sum_over(group):
    """A gradient hook that all-reduces (sums) the gradient over ``group`` as autograd produces it."""

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)
        return grad

    return all_reduce


def register_sequence_parallel_hooks(model: torch.nn.Module) -> int:
    """All-reduce over TP the gradients of parameters marked ``sequence_parallel``; returns how many."""
    all_reduce = _sum_over(parallel_state.get_tensor_model_parallel_group())
    count = 0
    for param in model.parameters():
        if getattr(param, "sequence_parallel", False):
            param.register_hook(all_reduce)
            count += 1
    return count


def register_expert_parallel_hooks(model: torch.nn.Module, expert_params: list[torch.nn.Parameter]) -> int:
    """Sum dense gradients over the expert-parallel group and count them once in the norm; returns how many.

    Nothing to do without expert parallelism (DeepSpeed then reduces over the whole data-parallel group).
    """
    if parallel_state.get_expert_model_parallel_world_size() == 1:
        return 0
    all_reduce = _sum_over(parallel_state.get_expert_model_parallel_group())
    replica = parallel_state.get_expert_model_parallel_rank() > 0
    experts = {id(param) for param in expert_params}
    count = 0
    for param in model.parameters():
        if id(param) not in experts and param.requires_grad:
            param.register_hook(all_reduce)
            if replica:
                param.ds_pipe_replicated = True
            count += 1
    return count


def tied_embedding_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The copies of a tied embedding this rank holds when pipelining splits them over stages."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return []
    weights = []
    for chunk in model.chunks:
        if chunk.share_embeddings_and_output_weights and (chunk.pre_process or chunk.post_process):
            weights.append(chunk.shared_embedding_or_output_weight())
    return weights


def mark_pipeline_replicas(model: torch.nn.Module) -> None:
    """Tell DeepSpeed's norm computation to count the last stage's copy of a tied embedding once, not twice."""
    for chunk in model.chunks:
        if chunk.share_embeddings_and_output_weights and chunk.post_process and not chunk.pre_process:
            chunk.shared_embedding_or_output_weight().ds_pipe_replicated = True


def all_reduce_tied_embedding_grads(model: torch.nn.Module) -> None:
    weights = tied_embedding_weights(model)
    if not weights:
        return
    group = parallel_state.get_embedding_group()
    for weight in weights:
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=group)
