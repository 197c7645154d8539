"""RoPE scaling for context extension (``model.rope_scaling``), computed by megatron-core's own code.

YaRN is megatron-core's YarnRotaryEmbedding: GPTModel's ``yarn`` position embedding, which reads its
settings from ``yarn_*`` attributes of the TransformerConfig, and whose attention temperature the attention
layer applies to both query and key rotations. Llama 3's scaling is RotaryEmbedding's ``_apply_scaling``,
but GPTModel's switch for it fixes the original context and frequency factors at Llama 3.1's (8192, 1, 4);
so the frequencies are scaled here with the configured ones and given to the model's rotary embedding.
The generation decoder takes the same frequencies and temperature from here.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_find_correction_range,
    _yarn_get_concentration_factor,
    _yarn_linear_ramp_mask,
)
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer import TransformerConfig

from gptscale.config.schema import ModelConfig, PositionEmbedding, RopeScaling, RopeScalingConfig


def position_embedding_type(model: ModelConfig) -> str:
    """GPTModel's ``position_embedding_type`` for this model."""
    if model.position_embedding == PositionEmbedding.learned:
        return "learned_absolute"
    return "yarn" if model.rope_scaling.type == RopeScaling.yarn else "rope"


def set_yarn_fields(config: TransformerConfig, model: ModelConfig) -> None:
    """Give ``config`` the ``yarn_*`` attributes megatron-core's GPTModel and attention read (YaRN only)."""
    scaling = model.rope_scaling
    if scaling.type != RopeScaling.yarn:
        return
    config.yarn_rotary_scaling_factor = scaling.factor
    config.yarn_original_max_position_embeddings = scaling.original_max_position_embeddings
    config.yarn_beta_fast = scaling.beta_fast
    config.yarn_beta_slow = scaling.beta_slow
    config.yarn_mscale = scaling.mscale
    config.yarn_mscale_all_dim = scaling.mscale_all_dim
    config.yarn_correction_range_round_to_int = True


def frequencies(model: ModelConfig) -> torch.Tensor:
    """Rotation frequency of each pair of a head's dimensions, scaled as ``model.rope_scaling`` says (CPU, fp32)."""
    dim = model.hidden_size // model.num_attention_heads
    base = int(model.rotary_base)
    rotary = RotaryEmbedding(dim, rotary_percent=1.0, rotary_base=base, use_cpu_initialization=True)
    scaling = model.rope_scaling
    if scaling.type == RopeScaling.llama3:
        return rotary._apply_scaling(
            rotary.inv_freq,
            factor=scaling.factor,
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        )
    if scaling.type == RopeScaling.yarn:
        low, high = _yarn_find_correction_range(
            scaling.beta_fast, scaling.beta_slow, dim, base, scaling.original_max_position_embeddings
        )
        kept = 1.0 - _yarn_linear_ramp_mask(low, high, dim // 2, device=rotary.inv_freq.device)
        return rotary.inv_freq / scaling.factor * (1 - kept) + rotary.inv_freq * kept
    return rotary.inv_freq


def attention_factor(scaling: RopeScalingConfig) -> float:
    """What YaRN multiplies the rotations' cosines and sines by (1 without YaRN)."""
    if scaling.type != RopeScaling.yarn:
        return 1.0
    return _yarn_get_concentration_factor(scaling.factor, scaling.mscale, scaling.mscale_all_dim)


def scale_llama3(chunk: GPTModel, model: ModelConfig) -> None:
    """Give a freshly built GPTModel's rotary embedding Llama 3's scaled frequencies (no-op otherwise)."""
    if model.rope_scaling.type == RopeScaling.llama3:
        chunk.rotary_pos_emb.inv_freq = frequencies(model).to(chunk.rotary_pos_emb.inv_freq.device)
