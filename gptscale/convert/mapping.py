"""Where every tensor of gptscale's model lives in Hugging Face transformers and in GGUF.

One table per architecture, read in both directions: export walks it from megatron-core's global names to
HF/GGUF names, import walks it back. A row names megatron-core's global key (tensors under
``decoder.layers.`` are stacked over layers, ``{i}`` is the layer in the other names) and how the tensor
splits: megatron-core fuses Q, K and V per query group ([q heads of the group..., k, v] for each group) and
SwiGLU's gate and up projections ([gate; up]); outside they are separate tensors, or, for GPT-2's
``c_attn`` and GGUF's ``attn_qkv``, one tensor ordered [all q; all k; all v].
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterator, Mapping

import torch

from gptscale.config.schema import Activation, ModelConfig, Normalization, PositionEmbedding
from gptscale.config.validate import padded_vocab_size
from gptscale.convert import ConversionError


class Parts(Enum):
    WHOLE = "whole"
    VOCAB = "vocab"  # rows padded to model.vocab_multiple in gptscale, the tokenizer's size outside
    QKV = "qkv"
    GATE_UP = "gate_up"


@dataclass(frozen=True)
class Row:
    megatron: str
    hf: tuple[str, ...]
    gguf: tuple[str, ...]
    parts: Parts = Parts.WHOLE
    conv1d: bool = False  # HF's GPT-2 keeps this weight in a Conv1D, [in, out]: transposed


LAYER = "decoder.layers."

GPT2 = (
    Row("embedding.word_embeddings.weight", ("transformer.wte.weight",), ("token_embd.weight",), Parts.VOCAB),
    Row("embedding.position_embeddings.weight", ("transformer.wpe.weight",), ("position_embd.weight",)),
    Row(LAYER + "self_attention.linear_qkv.layer_norm_weight", ("transformer.h.{i}.ln_1.weight",),
        ("blk.{i}.attn_norm.weight",)),
    Row(LAYER + "self_attention.linear_qkv.layer_norm_bias", ("transformer.h.{i}.ln_1.bias",),
        ("blk.{i}.attn_norm.bias",)),
    Row(LAYER + "self_attention.linear_qkv.weight", ("transformer.h.{i}.attn.c_attn.weight",),
        ("blk.{i}.attn_qkv.weight",), Parts.QKV, conv1d=True),
    Row(LAYER + "self_attention.linear_qkv.bias", ("transformer.h.{i}.attn.c_attn.bias",),
        ("blk.{i}.attn_qkv.bias",), Parts.QKV),
    Row(LAYER + "self_attention.linear_proj.weight", ("transformer.h.{i}.attn.c_proj.weight",),
        ("blk.{i}.attn_output.weight",), conv1d=True),
    Row(LAYER + "self_attention.linear_proj.bias", ("transformer.h.{i}.attn.c_proj.bias",),
        ("blk.{i}.attn_output.bias",)),
    Row(LAYER + "mlp.linear_fc1.layer_norm_weight", ("transformer.h.{i}.ln_2.weight",), ("blk.{i}.ffn_norm.weight",)),
    Row(LAYER + "mlp.linear_fc1.layer_norm_bias", ("transformer.h.{i}.ln_2.bias",), ("blk.{i}.ffn_norm.bias",)),
    Row(LAYER + "mlp.linear_fc1.weight", ("transformer.h.{i}.mlp.c_fc.weight",), ("blk.{i}.ffn_up.weight",),
        conv1d=True),
    Row(LAYER + "mlp.linear_fc1.bias", ("transformer.h.{i}.mlp.c_fc.bias",), ("blk.{i}.ffn_up.bias",)),
    Row(LAYER + "mlp.linear_fc2.weight", ("transformer.h.{i}.mlp.c_proj.weight",), ("blk.{i}.ffn_down.weight",),
        conv1d=True),
    Row(LAYER + "mlp.linear_fc2.bias", ("transformer.h.{i}.mlp.c_proj.bias",), ("blk.{i}.ffn_down.bias",)),
    Row("decoder.final_layernorm.weight", ("transformer.ln_f.weight",), ("output_norm.weight",)),
    Row("decoder.final_layernorm.bias", ("transformer.ln_f.bias",), ("output_norm.bias",)),
    Row("output_layer.weight", ("lm_head.weight",), ("output.weight",), Parts.VOCAB),
)

LLAMA = (
    Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ("token_embd.weight",), Parts.VOCAB),
    Row(LAYER + "self_attention.linear_qkv.layer_norm_weight", ("model.layers.{i}.input_layernorm.weight",),
        ("blk.{i}.attn_norm.weight",)),
    Row(LAYER + "self_attention.linear_qkv.weight",
        ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
         "model.layers.{i}.self_attn.v_proj.weight"),
        ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"), Parts.QKV),
    Row(LAYER + "self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",),
        ("blk.{i}.attn_output.weight",)),
    Row(LAYER + "mlp.linear_fc1.layer_norm_weight", ("model.layers.{i}.post_attention_layernorm.weight",),
        ("blk.{i}.ffn_norm.weight",)),
    Row(LAYER + "mlp.linear_fc1.weight",
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
        ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"), Parts.GATE_UP),
    Row(LAYER + "mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), ("blk.{i}.ffn_down.weight",)),
    Row("decoder.final_layernorm.weight", ("model.norm.weight",), ("output_norm.weight",)),
    Row("output_layer.weight", ("lm_head.weight",), ("output.weight",), Parts.VOCAB),
)

TABLES = {"gpt2": GPT2, "llama": LLAMA}


def architecture(model: ModelConfig) -> str:
    """``gpt2`` or ``llama``: the inference architecture that computes exactly what ``model`` computes."""
    groups = model.num_query_groups or model.num_attention_heads
    gpt2 = (model.position_embedding == PositionEmbedding.learned and model.normalization == Normalization.LayerNorm
            and model.activation == Activation.gelu and model.bias and groups == model.num_attention_heads)
    llama = (model.position_embedding == PositionEmbedding.rope and model.normalization == Normalization.RMSNorm
             and model.activation == Activation.swiglu and not model.bias)
    if gpt2:
        return "gpt2"
    if llama:
        return "llama"
    raise ConversionError(
        f"model {model.name!r} (position_embedding={model.position_embedding.value}, "
        f"normalization={model.normalization.value}, activation={model.activation.value}, bias={model.bias}, "
        f"num_query_groups={model.num_query_groups}) is neither GPT-2 style (learned, LayerNorm, gelu, biases, "
        "no grouped-query attention) nor Llama style (rope, RMSNorm, swiglu, no biases): no inference format "
        "computes the same function")


def rows(model: ModelConfig) -> tuple[Row, ...]:
    """The table of ``model``'s architecture; tied models have no output layer of their own."""
    return tuple(row for row in TABLES[architecture(model)]
                 if not (row.megatron == "output_layer.weight" and model.tie_embeddings))


def num_layers_of(row: Row, model: ModelConfig) -> int | None:
    return model.num_layers if row.megatron.startswith(LAYER) else None


def _heads(model: ModelConfig) -> tuple[int, int]:
    return model.num_attention_heads, model.num_query_groups or model.num_attention_heads


def split_qkv(fused: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
    """megatron-core's per-group [q..., k, v] rows into Q, K and V."""
    heads, groups = _heads(model)
    per_group = heads // groups
    grouped = fused.reshape(groups, per_group + 2, -1, *fused.shape[1:])
    head_dim = grouped.shape[2]
    q = grouped[:, :per_group].reshape(heads * head_dim, *fused.shape[1:])
    k = grouped[:, per_group].reshape(groups * head_dim, *fused.shape[1:])
    v = grouped[:, per_group + 1].reshape(groups * head_dim, *fused.shape[1:])
    return [q, k, v]


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """Q, K and V into megatron-core's per-group [q..., k, v] rows."""
    heads, groups = _heads(model)
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(groups, heads // groups, -1, *rest), k.reshape(groups, 1, -1, *rest),
                         v.reshape(groups, 1, -1, *rest)], dim=1)
    return grouped.reshape(-1, *rest)


def to_outside(row: Row, tensor: torch.Tensor, model: ModelConfig, vocab_size: int, hf: bool) -> list[torch.Tensor]:
    """One layer's megatron-core tensor as the tensors named by ``row.hf`` (``hf``) or ``row.gguf``."""
    names = row.hf if hf else row.gguf
    if row.parts == Parts.VOCAB:
        parts = [tensor[:vocab_size]]
    elif row.parts == Parts.QKV:
        parts = split_qkv(tensor, model)
    elif row.parts == Parts.GATE_UP:
        parts = list(tensor.chunk(2, dim=0))
    else:
        parts = [tensor]
    if len(names) == 1 and len(parts) > 1:
        parts = [torch.cat(parts, dim=0)]
    if hf and row.conv1d:
        parts = [part.t() for part in parts]
    return [part.contiguous() for part in parts]


def to_megatron(row: Row, parts: list[torch.Tensor], model: ModelConfig) -> torch.Tensor:
    """The inverse of ``to_outside`` for HF tensors; vocabulary rows are padded with zeros."""
    if row.conv1d:
        parts = [part.t() for part in parts]
    if row.parts == Parts.VOCAB:
        (embedding,) = parts
        padding = padded_vocab_size(embedding.shape[0], model.vocab_multiple) - embedding.shape[0]
        return torch.cat([embedding, embedding.new_zeros(padding, *embedding.shape[1:])]).contiguous()
    if row.parts == Parts.QKV:
        if len(parts) == 1:
            heads, groups = _heads(model)
            head_dim = model.hidden_size // heads
            parts = list(parts[0].split([heads * head_dim, groups * head_dim, groups * head_dim], dim=0))
        return merge_qkv(*parts, model).contiguous()
    return torch.cat(parts, dim=0).contiguous() if len(parts) > 1 else parts[0].contiguous()


def export_tensors(model: ModelConfig, tensors: Mapping[str, torch.Tensor], vocab_size: int,
                   hf: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in HF's (``hf``) or GGUF's naming, layer by layer, for every row of the table."""
    for row in rows(model):
        names = row.hf if hf else row.gguf
        layers = num_layers_of(row, model)
        for i in range(layers or 1):
            tensor = tensors[row.megatron][i] if layers else tensors[row.megatron]
            for name, part in zip(names, to_outside(row, tensor, model, vocab_size, hf)):
                yield name.format(i=i), part


def import_tensors(model: ModelConfig, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """megatron-core's global tensors from HF tensors (``read(name)``), stacked over layers."""
    state = {}
    for row in rows(model):
        layers = num_layers_of(row, model)
        per_layer = [to_megatron(row, [read(name.format(i=i)) for name in row.hf], model)
                     for i in range(layers or 1)]
        state[row.megatron] = torch.stack(per_layer) if layers else per_layer[0]
    return state
