"""Model FLOPs per token, the PaLM paper's accounting: 6N for the weight matmuls (forward and backward) plus
12·L·H·Q·T for attention scores, with N the parameters that take part in matmuls (the output projection
counted, the embedding lookups not; a MoE layer counts only the router, the top-k experts and the shared
expert). The trainer's MFU and the planner's step time both use it.
"""

from __future__ import annotations

from gptscale.config.schema import ModelConfig, is_moe_layer


def matmul_parameters(model: ModelConfig, vocab_size: int) -> int:
    """Parameters that multiply activations: every layer's projections plus the output layer."""
    h, layers = model.hidden_size, model.num_layers
    head_dim = h // model.num_attention_heads
    groups = model.query_groups
    ffn = model.ffn_size
    attention = h * (model.num_attention_heads + 2 * groups) * head_dim + model.num_attention_heads * head_dim * h
    per_unit = 3 if model.activation.value == "swiglu" else 2
    mlp = h * ffn * per_unit
    moe = model.moe
    # A MoE layer's active weights: the router, the top-k experts a token visits and the shared expert.
    expert_ffn = model.expert_ffn_size
    active_moe = h * moe.num_experts + moe.top_k * h * expert_ffn * per_unit + h * moe.shared_expert_size * per_unit
    moe_layers = sum(is_moe_layer(model, i) for i in range(layers))
    return layers * attention + (layers - moe_layers) * mlp + moe_layers * active_moe + vocab_size * h


def flops_per_token(model: ModelConfig, vocab_size: int, seq_len: int) -> float:
    attention_scores = 12 * model.num_layers * model.hidden_size * seq_len
    return 6 * matmul_parameters(model, vocab_size) + attention_scores
