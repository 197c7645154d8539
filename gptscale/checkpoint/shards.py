"""Model weights and optimizer state as megatron-core ShardedTensors under global, layout-independent keys.

megatron-core's ``sharded_state_dict()`` describes each parameter shard a rank holds by its global key
(layers stacked on a leading axis: ``decoder.layers.mlp.linear_fc1.weight``), global shape, offset and
replica id. Under those descriptions the checkpoint stores the fp32 master weight (what the optimizer
updates: the full-precision model) and the optimizer's per-parameter state under its names (Adam:
``optimizer.exp_avg.<key>`` and ``optimizer.exp_avg_sq.<key>``; Lion: ``optimizer.exp_avg.<key>``). A load
at any TP/PP/DP/ZeRO layout asks for its own shards and torch.distributed.checkpoint reads the overlapping
pieces. Replica ids (data-parallel copies, the last pipeline stage's copy of a tied embedding) make exactly
one rank write each piece.

Persistent buffers that training changes (the MoE router's expert bias) are model state too: they are
saved and restored beside the weights under their own keys, with no optimizer moments.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Union

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from gptscale.checkpoint.files import OPTIMIZER, moment_key
from gptscale.model.build import ModelChunks
from gptscale.parallel.engine import OptimizerState

Description = Union[ShardedTensor, ShardedTensorFactory]
MODEL = "model"


@dataclasses.dataclass
class ParameterShard:
    param: torch.Tensor  # a parameter, or a persistent buffer when ``buffer`` is set
    description: Description  # megatron-core's: global key, shape, offset, replica id (a factory for SwiGLU)
    buffer: bool = False  # not trained by the optimizer: saved and restored as it is

    @property
    def local_shape(self) -> torch.Size:
        """The rank's full tensor-parallel shard (ZeRO-3 partitions it further; DeepSpeed assembles it)."""
        return getattr(self.param, "ds_shape", self.param.shape)


@contextmanager
def _full_shapes_visible(params: list[torch.nn.Parameter]):
    """Let ZeRO-3 parameters show their full shape for a moment.

    ZeRO-3 leaves a parameter's ``data`` empty (its partition lives elsewhere) and megatron-core reads
    shapes from the data, so each partitioned parameter shows its full shape through a zero-stride view
    (no memory, no communication) while the descriptions are taken.
    """
    hidden = [(p, p.data) for p in params if hasattr(p, "ds_shape") and p.data.shape != p.ds_shape]
    for param, data in hidden:
        param.data = data.new_empty(1).expand(param.ds_shape)
    try:
        yield
    finally:
        for param, data in hidden:
            param.data = data


def _persistent_buffers(model: ModelChunks, params: dict[int, torch.nn.Parameter]) -> dict[int, torch.Tensor]:
    """The tensors of the model's state dict that are not parameters: its persistent buffers."""
    return {
        id(value): value
        for chunk in model.chunks
        for value in chunk.state_dict(keep_vars=True).values()
        if torch.is_tensor(value) and id(value) not in params
    }


def parameter_shards(model: ModelChunks) -> list[ParameterShard]:
    """Every parameter (and persistent buffer) of ``model`` with megatron-core's description, in the same
    order on every rank."""
    params = {id(p): p for p in model.parameters()}
    buffers = _persistent_buffers(model, params)
    shards = []
    with _full_shapes_visible(list(params.values())):
        for chunk in model.chunks:
            for item in nested_values(chunk.sharded_state_dict()):
                if not isinstance(item, (ShardedTensor, ShardedTensorFactory)):
                    continue
                description = dataclasses.replace(item, data=None) if isinstance(item, ShardedTensor) else item
                if id(item.data) in params:
                    shards.append(ParameterShard(params[id(item.data)], description))
                elif id(item.data) in buffers and item.data.is_floating_point():
                    shards.append(ParameterShard(buffers[id(item.data)], description, buffer=True))
    covered = [id(shard.param) for shard in shards if not shard.buffer]
    missing = [name for name, p in model.named_parameters() if id(p) not in covered]
    if missing or len(covered) != len(set(covered)):
        raise RuntimeError(f"megatron-core's sharded state dict does not describe each parameter once: {missing}")
    return shards


def _describe(description: Description, data: torch.Tensor, key: str) -> Description:
    """``description`` for other data under another key (same shard geometry and replica id)."""
    if isinstance(description, ShardedTensorFactory):
        return dataclasses.replace(description, key=key, data=data)
    return dataclasses.replace(description, key=key, data=data, dtype=data.dtype)


class HostCopies:
    """Reusable host buffers for snapshots (pinned on GPU, so the copy is fast and the write can be async).

    Saves never overlap (a save first waits for the previous one), so a buffer is free again at the next.
    """

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def copy(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=tensor.is_cuda)
            self.buffers[name] = buffer
        buffer.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
        return buffer


def snapshot(shards: list[ParameterShard], optimizer: OptimizerState, host: HostCopies) -> dict:
    """The sharded state dict to save: host copies of every master weight and state tensor, and the step count.

    A collective over data-parallel ranks under ZeRO (DeepSpeed assembles the partitions).
    """
    optimizer.ensure_state()
    state = {MODEL: {}, OPTIMIZER: {moment: {} for moment in optimizer.state_names}}
    for index, shard in enumerate(shards):
        key = shard.description.key
        weight = shard.param if shard.buffer else optimizer.get(shard.param)
        state[MODEL][str(index)] = _describe(shard.description, host.copy(f"{index}", weight), key)
        if shard.buffer:
            continue
        for moment in optimizer.state_names:
            copy = host.copy(f"{index}.{moment}", optimizer.get(shard.param, moment))
            state[OPTIMIZER][moment][str(index)] = _describe(shard.description, copy, moment_key(moment, key))
    state[OPTIMIZER]["step"] = optimizer.step_count()
    if torch.cuda.is_available() and any(b.is_pinned() for b in host.buffers.values()):
        torch.cuda.synchronize()
    return state


def load_request(shards: list[ParameterShard], state_names: tuple[str, ...]) -> dict:
    """The sharded state dict to load into: fp32 host tensors of this rank's shapes, for the weights and the
    optimizer state tensors ``state_names`` (none: weights only)."""

    def empty(shard: ParameterShard) -> torch.Tensor:
        return torch.empty(shard.local_shape, dtype=torch.float32)

    request = {MODEL: {str(i): _describe(s.description, empty(s), s.description.key) for i, s in enumerate(shards)}}
    if state_names:
        request[OPTIMIZER] = {
            moment: {
                str(i): _describe(s.description, empty(s), moment_key(moment, s.description.key))
                for i, s in enumerate(shards)
                if not s.buffer
            }
            for moment in state_names
        }
    return request


@torch.no_grad()
def restore(shards: list[ParameterShard], loaded: dict, optimizer: OptimizerState, with_optimizer: bool) -> None:
    """Write loaded master weights (and optimizer state and step count) into DeepSpeed, then refresh the model
    weights.

    A collective over data-parallel ranks under ZeRO.
    """
    optimizer.before_weights_set()
    if with_optimizer:
        optimizer.ensure_state()
    for index, shard in enumerate(shards):
        if shard.buffer:
            shard.param.copy_(loaded[MODEL][str(index)])
            continue
        optimizer.set(shard.param, loaded[MODEL][str(index)])
        if with_optimizer:
            for moment in optimizer.state_names:
                optimizer.set(shard.param, loaded[OPTIMIZER][moment][str(index)], moment)
    optimizer.refresh_model_weights([shard.param for shard in shards if not shard.buffer])
    if with_optimizer:
        optimizer.set_step_count(int(loaded[OPTIMIZER]["step"]))


def global_shapes(shards: list[ParameterShard]) -> dict[str, tuple[int, ...]]:
    """Global shape of every model key this run expects in a checkpoint."""
    shapes = {}
    for shard in shards:
        description = _describe(shard.description, torch.empty(shard.local_shape, device="meta"), shard.description.key)
        built = description.build() if isinstance(description, ShardedTensorFactory) else description
        for tensor in nested_values(built) if isinstance(built, (dict, list)) else [built]:
            shapes[tensor.key] = tuple(tensor.global_shape)
    return shapes
