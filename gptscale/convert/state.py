"""A one-rank megatron-core model as the converters' representation, and back.

The representation is what ``gptscale.checkpoint.read.load_model_state`` returns: full fp32 tensors keyed by
megatron-core's global sharded-state-dict names, layers stacked on a leading axis, SwiGLU's fc1 as
[gate; up]. At one rank every shard spans its tensor except along the stacked-layer axis and SwiGLU's
doubled axis, so each shard is placed at its global offset.
"""

from __future__ import annotations

from typing import Mapping

import torch

from gptscale.config.schema import Config
from gptscale.convert import ConversionError
from gptscale.convert.mapping import expert_ffn_size, placed_rows
from gptscale.model.build import ModelChunks
from gptscale.model.init import sharded_tensors


def _global_index(shard) -> tuple:
    prepended = shard.prepend_axis_num
    layer = tuple(shard.global_offset[:prepended])
    local = tuple(
        slice(offset, offset + size) for offset, size in zip(shard.global_offset[prepended:], shard.data.shape)
    )
    return layer + local


def model_state(model: ModelChunks) -> dict[str, torch.Tensor]:
    """Every weight of a one-rank ``model`` as a full fp32 tensor under its global name."""
    state, filled = {}, {}
    for shard in sharded_tensors(model):
        if shard.key not in state:
            state[shard.key] = torch.zeros(shard.global_shape, dtype=torch.float32)
            filled[shard.key] = 0
        state[shard.key][_global_index(shard)] = shard.data.detach().float().cpu()
        filled[shard.key] += shard.data.numel()
    partial = [key for key, tensor in state.items() if filled[key] != tensor.numel()]
    if partial:
        raise ConversionError(f"the model holds only part of {partial}: build it at one rank")
    return state


def expected_shapes(cfg: Config, vocab_rows: int) -> dict[str, tuple[int, ...]]:
    """The global shape of every tensor a model of ``cfg`` holds, to check tensors before converting them."""
    model = cfg.model
    heads = model.num_attention_heads
    groups = model.query_groups
    head_dim, hidden, layers = model.hidden_size // heads, model.hidden_size, model.num_layers
    ffn = model.ffn_size
    fc1 = 2 * ffn if model.activation.value == "swiglu" else ffn
    qkv = (heads + 2 * groups) * head_dim
    shapes = {
        "embedding.word_embeddings.weight": (vocab_rows, hidden),
        "output_layer.weight": (vocab_rows, hidden),
        "embedding.position_embeddings.weight": (max(model.max_position_embeddings, cfg.train.seq_len), hidden),
        "decoder.final_layernorm.weight": (hidden,),
        "decoder.final_layernorm.bias": (hidden,),
    }
    per_layer = {
        "self_attention.linear_qkv.layer_norm_weight": (hidden,),
        "self_attention.linear_qkv.layer_norm_bias": (hidden,),
        "self_attention.linear_qkv.weight": (qkv, hidden),
        "self_attention.linear_qkv.bias": (qkv,),
        "self_attention.linear_proj.weight": (hidden, heads * head_dim),
        "self_attention.linear_proj.bias": (hidden,),
        "mlp.linear_fc1.layer_norm_weight": (hidden,),
        "mlp.linear_fc1.layer_norm_bias": (hidden,),
        "mlp.linear_fc1.weight": (fc1, hidden),
        "mlp.linear_fc1.bias": (fc1,),
        "mlp.linear_fc2.weight": (hidden, ffn),
        "mlp.linear_fc2.bias": (hidden,),
    }
    experts, expert_ffn, shared = model.moe.num_experts, expert_ffn_size(model), model.moe.shared_expert_size
    per_layer.update(
        {
            "mlp.router.weight": (experts, hidden),
            "mlp.experts.experts.linear_fc1.weight": (experts, 2 * expert_ffn, hidden),
            "mlp.experts.experts.linear_fc2.weight": (experts, hidden, expert_ffn),
            "mlp.shared_experts.linear_fc1.weight": (2 * shared, hidden),
            "mlp.shared_experts.linear_fc2.weight": (hidden, shared),
            "mlp.shared_experts.gate_weight": (1, hidden),
        }
    )
    expected = {}
    for row, key, axis, _ in placed_rows(model):
        if not row.megatron.startswith("decoder.layers."):
            expected[key] = shapes[key]
        else:
            shape = per_layer[row.megatron[len("decoder.layers.") :]]
            expected[key] = (layers, *shape) if axis is not None else shape
    return expected


def check_state(cfg: Config, state: Mapping[str, torch.Tensor]) -> None:
    """Raise ConversionError unless ``state`` holds exactly the full tensors ``cfg``'s model has."""
    embedding = state.get("embedding.word_embeddings.weight")
    if embedding is None:
        raise ConversionError("the checkpoint holds no embedding.word_embeddings.weight")
    expected = expected_shapes(cfg, embedding.shape[0])
    problems = [f"missing {key}" for key in expected if key not in state]
    problems += [
        f"{key} has shape {tuple(state[key].shape)}, expected {shape} (a shard, not the gathered tensor?)"
        for key, shape in expected.items()
        if key in state and tuple(state[key].shape) != shape
    ]
    if (
        cfg.model.tie_embeddings
        and "output_layer.weight" in state
        and not torch.equal(state["output_layer.weight"], embedding)
    ):
        problems.append("model.tie_embeddings is true but output_layer.weight differs from the embedding")
    problems += [f"unexpected {key}" for key in state if key not in expected and key != "output_layer.weight"]
    if problems:
        raise ConversionError(
            "the tensors do not form a complete model of this config:\n  - " + "\n  - ".join(problems)
        )
