"""Each parameter's fp32 master weight and optimizer state, whichever DeepSpeed optimizer holds them.

DeepSpeed keeps them in different places: ZeRO-1/2 and its bf16 optimizer in flat partitions spread over
data-parallel ranks, ZeRO-3 in per-parameter partitions, bf16 without ZeRO in fp32 copies of the
parameters, and fp32 without ZeRO in the parameters themselves (with the torch optimizer's state). DeepSpeed's
tensor-fragment API (``safe_get_full_*`` / ``safe_set_full_*``) assembles and scatters the partitioned
ones; the others are read directly. Reading or writing a partitioned parameter is a collective over its
data-parallel group, so every rank must visit the same parameters in the same order. Which state tensors
there are is the optimizer's declaration (``gptscale.optim``: Adam's exp_avg and exp_avg_sq, Lion's exp_avg).
"""

from __future__ import annotations

import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)


def _is_partitioned(param: torch.nn.Parameter) -> bool:
    """ZeRO-3 (``ds_id``), ZeRO-1/2 or DeepSpeed's bf16 optimizer (``_hp_mapping``)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


class OptimizerState:
    """Get and set a parameter's full (tensor-parallel-local) fp32 master weight and optimizer state."""

    def __init__(self, engine, state_names: tuple[str, ...]):
        self.state_names = state_names  # the optimizer's per-parameter state tensors besides its step count
        self.optimizer = engine.optimizer  # a DeepSpeed wrapper, or the torch optimizer for fp32 without ZeRO
        self.base = getattr(self.optimizer, "optimizer", self.optimizer)  # the torch optimizer either way
        # bf16 without ZeRO: DeepSpeed's fp16 wrapper keeps an fp32 copy of each parameter.
        self._copies = {
            id(low): high
            for low_group, high_group in zip(
                getattr(self.optimizer, "fp16_groups", []), getattr(self.optimizer, "fp32_groups", [])
            )
            for low, high in zip(low_group, high_group)
        }

    def _master(self, param: torch.nn.Parameter) -> torch.Tensor:
        return self._copies.get(id(param), param)

    def _master_tensors(self) -> list[torch.Tensor]:
        """The tensors the torch optimizer updates: DeepSpeed's flat partitions, fp32 copies, or the parameters."""
        zero3 = getattr(self.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3 empties param_groups
        if zero3 is not None:
            return list(zero3)
        return [tensor for group in self.base.param_groups for tensor in group["params"]]

    def get(self, param: torch.nn.Parameter, moment: str | None = None) -> torch.Tensor:
        """The fp32 master weight (``moment=None``) or the optimizer state ``moment`` of ``param``, full and
        unpartitioned."""
        if _is_partitioned(param):
            if moment is None:
                return safe_get_full_fp32_param(param)
            return safe_get_full_optimizer_state(param, moment)
        master = self._master(param)
        return master.detach() if moment is None else self.base.state[master][moment]

    def set(self, param: torch.nn.Parameter, value: torch.Tensor, moment: str | None = None) -> None:
        """Overwrite the master weight or a moment; call ``refresh_model_weights`` after the last weight."""
        if _is_partitioned(param):
            if moment is None:
                safe_set_full_fp32_param(param, value)
            else:
                safe_set_full_optimizer_state(param, value, moment)
            return
        master = self._master(param)
        target = master.data if moment is None else self.base.state[master][moment]
        target.copy_(value.view_as(target))

    def ensure_state(self) -> None:
        """Create the optimizer's state (zero tensors, step 0) where its first step has not yet done so.

        torch optimizers create their state lazily at the first step, and DeepSpeed links its per-parameter
        views of that state only then; a checkpoint saved or loaded before any step needs both. Zeros at
        step 0 (a step count on the tensor's device, as fused AdamW and Lion keep it) are exactly what the
        first step would have created.
        """
        for master in self._master_tensors():
            state = self.base.state[master]
            if state:
                continue
            state["step"] = torch.zeros((), dtype=torch.float32, device=master.device)
            for moment in self.state_names:
                state[moment] = torch.zeros_like(master, memory_format=torch.preserve_format)
        link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-1/2, bf16
        if link is not None:
            # ZeRO-1/2 step one parameter group at a time and link after the first group's first step, when the
            # other groups have no state yet (their views stay empty), so link again now that every group has.
            self.optimizer._hp_optimizer_states_linked = False
            link()

    def step_count(self) -> int:
        """The optimizer's step counter (the same for every tensor: a skipped step skips them all)."""
        steps = [self.base.state[m]["step"] for m in self._master_tensors() if "step" in self.base.state[m]]
        return int(steps[0]) if steps else 0

    def set_step_count(self, step: int) -> None:
        for master in self._master_tensors():
            self.base.state[master]["step"].fill_(step)

    def before_weights_set(self) -> None:
        """ZeRO-3 keeps small parameters gathered between steps; release them before their partitions change."""
        prologue = getattr(self.optimizer, "checkpoint_event_prologue", None)
        if prologue is not None:
            prologue()

    @torch.no_grad()
    def refresh_model_weights(self, params: list[torch.nn.Parameter]) -> None:
        """Copy the fp32 masters into the weights the forward pass uses (bf16, or DeepSpeed's own buffers)."""
        optimizer = self.optimizer
        if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
            for sub_group in range(len(optimizer.fp32_partitioned_groups_flat)):
                optimizer._reassign_or_swap_out_partitioned_parameters(sub_group)
            optimizer.checkpoint_event_epilogue()  # gathers the persistent (small) parameters again
        elif hasattr(optimizer, "update_lp_params"):  # ZeRO-1/2 and the bf16 optimizer
            optimizer.update_lp_params()
        else:
            for param in params:
                master = self._master(param)
                if master is not param:
                    param.data.copy_(master.data)
