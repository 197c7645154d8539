"""FP8 matmuls: Transformer Engine's where the cluster has it, torchao's float8 training where it does not.

- ``model.backend=te``: megatron-core's TransformerConfig carries the FP8 format and recipe, and its
  Transformer Engine layers run their GEMMs in FP8 inside ``fp8_autocast`` (megatron-core enters it).
- ``model.backend=local``: megatron-core's column- and row-parallel linears of every transformer layer are
  swapped, in the layer spec, for subclasses whose matmul is torchao's float8 matmul (dynamic tensorwise
  scales, ``torch._scaled_mm`` on Hopper). torchao's own ``convert_to_float8_training`` swaps only
  ``torch.nn.Linear``, which megatron-core's parallel linears are not, so the swap is done here, on the
  one method (``_forward_impl``) through which megatron-core runs their matmul. The embedding and output
  layer stay in bf16, as in torchao's and Transformer Engine's recipes.

Both need bf16 weights and a GPU with FP8 tensor cores (compute capability 8.9+). torchao's emulation
(``train.fp8_emulate=true``) casts to FP8 and back and multiplies in high precision: FP8 numerics on any
device, no speed-up; it is how CPU tests train through this path.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from gptscale.config.schema import Backend, Fp8Format, Fp8Recipe, ModelConfig, TrainConfig
from gptscale.config.validate import ConfigError

FP8_COMPUTE_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with FP8 tensor cores

# Megatron-LM's settings for delayed scaling: the scale follows the largest amax of the last 1024 steps.
_DELAYED_SCALING = {"fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max"}


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def check_fp8(model: ModelConfig, train: TrainConfig, backend: Backend, device: torch.device) -> None:
    """Raise ConfigError, naming the fields, when ``train.fp8`` cannot run with this backend on this device."""
    if train.fp8 is None:
        return
    fp8 = f"train.fp8={train.fp8.value}"
    problems = []
    if backend == Backend.te:
        if train.fp8_emulate:
            problems.append(
                "train.fp8_emulate=true is torchao's emulation; Transformer Engine (model.backend=te) "
                "has none: use model.backend=local"
            )
    else:
        if not torchao_available():
            problems.append(
                f"{fp8} with model.backend={model.backend.value} (local layers) runs through torchao, "
                "which is not installed: pip install torchao"
            )
        if train.fp8_recipe == Fp8Recipe.delayed:
            problems.append(
                "train.fp8_recipe=delayed needs Transformer Engine (model.backend=te); torchao "
                "(model.backend=local) scales tensorwise: use train.fp8_recipe=tensorwise"
            )
    if not train.fp8_emulate:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < FP8_COMPUTE_CAPABILITY:
            where = f"compute capability {capability[0]}.{capability[1]}" if capability else device.type
            problems.append(
                f"{fp8} needs a GPU with FP8 tensor cores (compute capability 8.9+: H100, H200, L40S; this device: "
                f"{where})"
                + ("; set train.fp8_emulate=true to check FP8 numerics (no speed-up)" if backend != Backend.te else "")
            )
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def transformer_engine_fp8(train: TrainConfig) -> dict:
    """megatron-core TransformerConfig fields that turn on Transformer Engine's FP8 (empty without fp8)."""
    if train.fp8 is None:
        return {}
    fields: dict[str, object] = {"fp8": train.fp8.value, "fp8_recipe": train.fp8_recipe.value}
    if train.fp8_recipe == Fp8Recipe.delayed:
        fields.update(_DELAYED_SCALING)
    return fields


def _quiet_torchao_import() -> None:
    """Import torchao without its notices about CUDA-only kernels it cannot load on this machine."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    importlib.import_module("torchao.float8")


def torchao_float8_config(train: TrainConfig):
    """torchao's Float8LinearConfig for ``train`` (None without fp8): tensorwise dynamic scales."""
    if train.fp8 is None:
        return None
    _quiet_torchao_import()
    from torchao.float8 import CastConfig, Float8LinearConfig

    if train.fp8 == Fp8Format.hybrid:
        return Float8LinearConfig(emulate=train.fp8_emulate)
    e4m3 = CastConfig(target_dtype=torch.float8_e4m3fn)
    return Float8LinearConfig(cast_config_grad_output=e4m3, emulate=train.fp8_emulate)


class _Float8Matmul:
    """torchao's float8 matmul with megatron-core's tensor-parallel communication around it.

    megatron-core's own matmul also gathers sequence-parallel inputs (forward) and reduces input gradients
    over TP ranks (backward); here the same collectives come from megatron-core's autograd mappings.
    """

    def __init__(self, config):
        from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

        def gemm(fast_accum: bool) -> ScaledMMConfig:
            return ScaledMMConfig(config.emulate, fast_accum, False, config.pad_inner_dim)

        self.config = config
        self.mm_config = LinearMMConfig(
            gemm(config.gemm_config_output.use_fast_accum),
            gemm(config.gemm_config_grad_input.use_fast_accum),
            gemm(config.gemm_config_grad_weight.use_fast_accum),
        )

    def __call__(
        self,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        allreduce_dgrad: bool,
        sequence_parallel: bool,
        tp_group,
    ) -> torch.Tensor:
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
        elif allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        output = matmul_with_hp_or_float8_args.apply(input, weight.t(), self.mm_config, self.config)
        return output if bias is None else output + bias


def _float8_forward_impl(
    self,
    input,
    weight,
    bias,
    gradient_accumulation_fusion,
    allreduce_dgrad,
    sequence_parallel,
    tp_group=None,
    grad_output_buffer=None,
    **_unused,
):
    if gradient_accumulation_fusion or grad_output_buffer is not None:
        raise NotImplementedError("float8 linears support neither gradient_accumulation_fusion nor deferred wgrad")
    return self.float8_matmul(input, weight, bias, allreduce_dgrad, sequence_parallel, tp_group)


class Float8ColumnParallelLinear(ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear with its matmul in FP8 (torchao)."""

    def __init__(self, *args, float8, **kwargs):
        super().__init__(*args, **kwargs)
        self.float8_matmul = _Float8Matmul(float8)

    _forward_impl = _float8_forward_impl


class Float8RowParallelLinear(RowParallelLinear):
    """megatron-core's RowParallelLinear with its matmul in FP8 (torchao)."""

    def __init__(self, *args, float8, **kwargs):
        super().__init__(*args, **kwargs)
        self.float8_matmul = _Float8Matmul(float8)

    _forward_impl = _float8_forward_impl
