"""Bytes of parameters, gradients and optimizer states one rank holds, as DeepSpeed 0.19 lays them out.

The counts come from the model itself (``gptscale.plan.counts``: its parameters in module order and in the
optimizer's groups); the sizes DeepSpeed picks come from its own config class, filled from the engine
configuration gptscale hands it (``engine_config``). What a rank holds between steps, with ``w`` the
weight's bytes (4 fp32, 2 bf16) and ``m`` the optimizer's state bytes per parameter (``gptscale.optim``:
AdamW's two fp32 moments 8, Lion's one 4):

- no ZeRO, fp32: the torch optimizer over the model's weights: weights, ``.grad``, ``m`` and a step count
  (a 4-byte tensor) per parameter tensor.
- no ZeRO, bf16: DeepSpeed's unfused mixed-precision optimizer: bf16 weights and gradients, fp32 masters
  and optimizer state per tensor.
- ZeRO-1/2: each group flattened and padded to a multiple of 2 * dp elements (the weights become views of
  it); fp32 master and optimizer state hold this rank's 1/dp of it, plus one step count per group.
  Gradients, fp32: with contiguous gradients (no pipelining) a buffer the size of every parameter that
  reaches into this rank's partition (whole tensors, not their overlap) plus zeros for the padding; else
  the partition.
  bf16 (fp32 accumulation), ZeRO-1: DeepSpeed's BF16 optimizer, bf16 gradients of the weights plus an fp32
  accumulator of the flat group; ZeRO-2: an fp32 buffer of the partition.
- ZeRO-3: each tensor split into dp parts of ceil(numel / dp); tensors of at most
  ``param_persistence_threshold`` elements stay whole on every rank. The rank holds its flat partition in
  the weights' dtype, an fp32 master and the optimizer state of it, one step count per sub-group of
  ``sub_group_size`` elements, an fp32 gradient partition, and the reduce bucket of
  ``reduce_bucket_size`` elements in the weights' dtype. On one rank the persistent weights are views of
  their sub-group's flat partition.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepspeed.runtime.zero.config import DeepSpeedZeroConfig


@dataclass(frozen=True)
class StateBytes:
    parameters: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


def _padded(numel: int, multiple: int) -> int:
    return -(-numel // multiple) * multiple


def zero_settings(engine_json: dict) -> DeepSpeedZeroConfig:
    """DeepSpeed's ZeRO settings (its defaults filled in) for the engine configuration gptscale builds."""
    return DeepSpeedZeroConfig(**engine_json["zero_optimization"])


def state_bytes(
    groups: list[list[int]],
    dp: int,
    zero: int,
    bf16: bool,
    dp_rank: int = 0,
    settings: DeepSpeedZeroConfig | None = None,
    numels: list[int] | None = None,
    *,
    moment_bytes: int,
) -> StateBytes:
    """Bytes data-parallel rank ``dp_rank`` of ``dp`` holds for parameter ``groups`` (each a list of tensor
    sizes in the optimizer's order; ``numels``: the same tensors in module order) under ZeRO stage ``zero``,
    for an optimizer keeping ``moment_bytes`` of state per parameter."""
    settings = settings or DeepSpeedZeroConfig(stage=zero)
    numel = sum(sum(group) for group in groups)
    tensors = sum(len(group) for group in groups)
    weight = 2 if bf16 else 4
    if zero == 0:
        masters = 4 * numel if bf16 else 0
        return StateBytes(weight * numel, weight * numel, masters + moment_bytes * numel + 4 * tensors)
    if zero in (1, 2):
        shards = [_padded(sum(group), 2 * dp) // dp for group in groups]
        flat = sum(shard * dp for shard in shards)
        shard = sum(shards)
        step_counts = 4 * len(groups)
        optimizer = (4 + moment_bytes) * shard + step_counts  # fp32 master and state
        if bf16 and zero == 1:
            return StateBytes(2 * flat, 2 * numel + 4 * flat, optimizer)
        if bf16:
            return StateBytes(2 * flat, 4 * shard, optimizer)
        if settings.contiguous_gradients:
            gradients = sum(_contiguous_gradient_numel(group, size, dp_rank) for group, size in zip(groups, shards))
        else:
            gradients = shard
        return StateBytes(4 * flat, 4 * gradients, optimizer)
    if zero == 3:
        return _zero3_bytes(
            groups, numels or [n for group in groups for n in group], dp, weight, settings, moment_bytes
        )
    raise ValueError(f"parallel.zero={zero} is not a ZeRO stage")


def _contiguous_gradient_numel(group: list[int], partition: int, dp_rank: int) -> int:
    """Elements of ZeRO-1/2's gradient buffer for one group: every tensor overlapping the partition, whole,
    and a zero tensor for what the group's padding leaves uncovered (counted when it has several elements,
    as the held-bytes reader counts tensors)."""
    start, end = dp_rank * partition, (dp_rank + 1) * partition
    whole, covered, offset = 0, 0, 0
    for size in group:
        if offset < end and offset + size > start:
            whole += size
            covered += min(end, offset + size) - max(start, offset)
        offset += size
    padding = partition - covered
    return whole + (padding if padding > 1 else 0)


def _zero3_bytes(
    groups: list[list[int]], numels: list[int], dp: int, weight: int, settings: DeepSpeedZeroConfig, moment_bytes: int
) -> StateBytes:
    persistent, persisted = 0, 0
    for size in numels:  # DeepSpeed walks the module's parameters in order
        if size + persisted > settings.model_persistence_threshold:
            continue
        if size <= settings.param_persistence_threshold:
            persistent += size
            persisted += size
    partition, sub_groups, flat_weights, flat_partitions = 0, 0, 0, 0
    for group in groups:
        for members in _sub_groups(group, dp, settings.sub_group_size):
            flat = sum(-(-size // dp) for size in members)
            partition += flat
            sub_groups += 1
            # One rank alone: a whole tensor is its own partition, so persistent weights are views of the flat
            # buffer, which is then the weights' storage (gptscale leaves model_persistence_threshold unbounded).
            if dp == 1 and any(size <= settings.param_persistence_threshold for size in members):
                flat_weights += flat
            else:
                flat_partitions += flat
    parameters = weight * (flat_weights if dp == 1 else persistent)
    optimizer = (
        weight * flat_partitions
        + (4 + moment_bytes) * partition
        + 4 * sub_groups
        + weight * settings.reduce_bucket_size
    )
    return StateBytes(parameters, 4 * partition, optimizer)


def _sub_groups(group: list[int], dp: int, sub_group_size: int) -> list[list[int]]:
    """The sub-groups ZeRO-3 cuts a group into by partition size (each its own flat buffers and step count)."""
    partitions = [-(-size // dp) for size in group]
    if sub_group_size is None or sub_group_size >= sum(partitions):
        return [group]
    cuts, members, size = [], [], 0
    for index, (tensor, part) in enumerate(zip(group, partitions)):
        members.append(tensor)
        size += part
        if size >= sub_group_size or index == len(group) - 1:
            cuts.append(members)
            members, size = [], 0
    return cuts
