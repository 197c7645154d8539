"""Bytes of parameters, gradients and optimizer states one rank holds, as DeepSpeed lays them out.

The counts come from the model itself (its parameters, split into the optimizer's groups by
``gptscale.parallel.deepspeed.parameter_groups``); the layout rules are DeepSpeed 0.19's:

- no ZeRO, fp32: torch AdamW over the model's weights: weights, ``.grad``, two moments and a step count
  (a 4-byte tensor) per parameter tensor.
- no ZeRO, bf16: DeepSpeed's unfused mixed-precision optimizer: bf16 weights and gradients, fp32 masters
  and moments per tensor.
- ZeRO-1/2, fp32: each group flattened and padded to a multiple of 2 * dp elements; gradients, fp32 master
  and moments hold this rank's 1/dp of it, plus one step count per group.
- ZeRO-1/2, bf16 (fp32 gradient accumulation): DeepSpeed's BF16 optimizer: bf16 weights and gradients, a
  full fp32 gradient accumulator, this rank's 1/dp of fp32 masters and moments.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def state_bytes(groups: list[list[int]], dp: int, zero: int, bf16: bool) -> StateBytes:
    """Bytes one rank holds for parameter ``groups`` (each a list of tensor sizes) under ``zero`` and dp ranks."""
    numel = sum(sum(group) for group in groups)
    tensors = sum(len(group) for group in groups)
    weight = 2 if bf16 else 4
    if zero == 0:
        masters = 4 * numel if bf16 else 0
        return StateBytes(weight * numel, weight * numel, masters + 8 * numel + 4 * tensors)
    if zero in (1, 2):
        shard = sum(_padded(sum(group), 2 * dp) // dp for group in groups)
        flat = sum(_padded(sum(group), 2 * dp) for group in groups)
        step_counts = 4 * len(groups)
        if bf16:
            return StateBytes(2 * flat, 2 * numel + 4 * flat, 12 * shard + step_counts)
        return StateBytes(4 * flat, 4 * shard, 12 * shard + step_counts)
    raise NotImplementedError(f"parallel.zero={zero}: ZeRO-3's byte layout is not modelled yet")
