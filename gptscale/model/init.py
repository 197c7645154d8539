"""Weight initialisation that gives every parallel layout the same model.

megatron-core initialises each rank's shard from a shared RNG stream, so the weights depend on the TP/PP
layout. Here every tensor is drawn from its own generator, seeded by the run seed and the tensor's global
name in megatron-core's sharded state dict (the names distributed checkpoints use, with layers numbered
globally). Each rank draws the full tensor of one layer and keeps its slice, so TP=2 x PP=2 starts from
exactly the weights of one rank, and a run can change layout without changing its model.
"""

from __future__ import annotations

import hashlib
import math

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from gptscale.model.build import ModelChunks

_ONES = ("layer_norm_weight", "layernorm.weight", "norm.weight")
_RESIDUAL_OUTPUTS = ("linear_proj.weight", "linear_fc2.weight")


def sharded_tensors(model: ModelChunks) -> list[ShardedTensor]:
    """Every parameter shard of ``model`` with its global name, shape and offset."""
    tensors = []
    for chunk in model.chunks:
        for item in nested_values(chunk.sharded_state_dict()):
            if isinstance(item, ShardedTensorFactory):
                tensors.extend(item.build())
            elif isinstance(item, ShardedTensor):
                tensors.append(item)
    return tensors


def _generator(seed: int, key: str, layer_index: tuple[int, ...], device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{key}/{layer_index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _fill(tensor: ShardedTensor, seed: int, std: float, residual_std: float) -> None:
    key, data = tensor.key, tensor.data
    if key.endswith(_ONES):
        data.fill_(1.0)
        return
    if key.endswith("bias"):
        data.zero_()
        return
    prepended = tensor.prepend_axis_num
    layer_index = tuple(tensor.global_offset[:prepended])  # stacked-layer axes: one draw per layer
    shape = tensor.global_shape[prepended:]
    offsets = tensor.global_offset[prepended:]
    generator = _generator(seed, key, layer_index, data.device)
    full = torch.empty(shape, dtype=torch.float32, device=data.device)
    full.normal_(0.0, residual_std if key.endswith(_RESIDUAL_OUTPUTS) else std, generator=generator)
    local = full[tuple(slice(off, off + size) for off, size in zip(offsets, data.shape))]
    data.copy_(local)


@torch.no_grad()
def initialize(model: ModelChunks, seed: int, std: float, num_layers: int) -> None:
    """Normal(0, std) weights, GPT-2's 1/sqrt(2L)-scaled residual projections, unit norms, zero biases."""
    residual_std = std / math.sqrt(2.0 * num_layers)
    covered = set()
    for tensor in sharded_tensors(model):
        _fill(tensor, seed, std, residual_std)
        covered.add(tensor.data.untyped_storage().data_ptr())
    missing = [name for name, p in model.named_parameters() if p.untyped_storage().data_ptr() not in covered]
    if missing:
        raise RuntimeError(f"no sharded-state-dict entry initialises these parameters: {missing}")
