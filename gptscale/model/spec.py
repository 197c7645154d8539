"""Module specs for megatron-core's GPTModel.

``local``: megatron-core's own (pure torch) layers, with two swaps: a norm that supports sequence
parallelism (``gptscale.model.norm``) and, unless ``model.attention=unfused``, SDPA core attention.
``te``: Transformer Engine's fused layers (needed for its FP8), used when ``model.backend=te`` or, under
``auto``, when Transformer Engine imports and a GPU is present.
With ``train.fp8`` the local spec's linears become torchao float8 linears (``gptscale.model.fp8``).
"""

from __future__ import annotations

import copy
import importlib.util

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from gptscale.config.schema import Attention, Backend, ModelConfig, is_moe_layer
from gptscale.model.attention import SDPAttention
from gptscale.model.fp8 import Float8ColumnParallelLinear, Float8RowParallelLinear
from gptscale.model.norm import Norm


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(model: ModelConfig, on_gpu: bool) -> Backend:
    if model.backend == Backend.te and not transformer_engine_available():
        raise RuntimeError("model.backend=te but transformer_engine is not installed; use model.backend=local")
    if model.backend == Backend.auto:
        return Backend.te if on_gpu and transformer_engine_available() else Backend.local
    return model.backend


def _local_layer_spec(model: ModelConfig, float8, num_experts: int | None = None) -> ModuleSpec:
    spec = copy.deepcopy(get_gpt_layer_local_spec(num_experts=num_experts, normalization=model.normalization.value))
    layer = spec.submodules
    layer.input_layernorm = Norm
    layer.pre_mlp_layernorm = Norm
    if model.attention == Attention.sdpa:
        layer.self_attention.submodules.core_attention = SDPAttention
    if float8 is not None:
        column = ModuleSpec(module=Float8ColumnParallelLinear, params={"float8": float8})
        row = ModuleSpec(module=Float8RowParallelLinear, params={"float8": float8})
        attention, mlp = layer.self_attention.submodules, layer.mlp.submodules
        attention.linear_qkv, attention.linear_proj = column, row
        mlp.linear_fc1, mlp.linear_fc2 = column, row
    return spec


def decoder_block_spec(
    model: ModelConfig, config: TransformerConfig, backend: Backend, vp_stage: int | None, float8=None
) -> ModuleSpec:
    """The decoder of one pipeline stage (or one virtual stage): its layers and the final norm.

    ``float8``: torchao's Float8LinearConfig for the local spec's linears (None: bf16/fp32 matmuls).
    """
    experts = model.moe.num_experts or None
    if backend == Backend.te:
        from megatron.core.extensions.transformer_engine import TENorm

        dense = get_gpt_layer_with_transformer_engine_spec()
        moe = get_gpt_layer_with_transformer_engine_spec(num_experts=experts) if experts else None
        final_norm = TENorm
    else:
        dense = _local_layer_spec(model, float8)
        moe = _local_layer_spec(model, float8, experts) if experts else None
        final_norm = Norm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    layers = [moe if is_moe_layer(model, offset + i) else dense for i in range(num_layers)]
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=layers, layer_norm=final_norm),
    )
