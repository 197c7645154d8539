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

from gptscale.config.schema import Activation, ModelConfig, Normalization, PositionEmbedding, is_moe_layer
from gptscale.config.validate import padded_vocab_size
from gptscale.convert import ConversionError


class Parts(Enum):
    WHOLE = "whole"
    VOCAB = "vocab"  # rows padded to model.vocab_multiple in gptscale, the tokenizer's size outside
    QKV = "qkv"
    GATE_UP = "gate_up"
    EXPERTS = "experts"  # [experts, out, in]: one tensor per expert ({j}) in HF, stacked in GGUF
    EXPERTS_GATE_UP = "experts_gate_up"  # [experts, gate; up, in]


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
    Row(
        LAYER + "self_attention.linear_qkv.layer_norm_weight",
        ("transformer.h.{i}.ln_1.weight",),
        ("blk.{i}.attn_norm.weight",),
    ),
    Row(
        LAYER + "self_attention.linear_qkv.layer_norm_bias",
        ("transformer.h.{i}.ln_1.bias",),
        ("blk.{i}.attn_norm.bias",),
    ),
    Row(
        LAYER + "self_attention.linear_qkv.weight",
        ("transformer.h.{i}.attn.c_attn.weight",),
        ("blk.{i}.attn_qkv.weight",),
        Parts.QKV,
        conv1d=True,
    ),
    Row(
        LAYER + "self_attention.linear_qkv.bias",
        ("transformer.h.{i}.attn.c_attn.bias",),
        ("blk.{i}.attn_qkv.bias",),
        Parts.QKV,
    ),
    Row(
        LAYER + "self_attention.linear_proj.weight",
        ("transformer.h.{i}.attn.c_proj.weight",),
        ("blk.{i}.attn_output.weight",),
        conv1d=True,
    ),
    Row(
        LAYER + "self_attention.linear_proj.bias",
        ("transformer.h.{i}.attn.c_proj.bias",),
        ("blk.{i}.attn_output.bias",),
    ),
    Row(LAYER + "mlp.linear_fc1.layer_norm_weight", ("transformer.h.{i}.ln_2.weight",), ("blk.{i}.ffn_norm.weight",)),
    Row(LAYER + "mlp.linear_fc1.layer_norm_bias", ("transformer.h.{i}.ln_2.bias",), ("blk.{i}.ffn_norm.bias",)),
    Row(
        LAYER + "mlp.linear_fc1.weight", ("transformer.h.{i}.mlp.c_fc.weight",), ("blk.{i}.ffn_up.weight",), conv1d=True
    ),
    Row(LAYER + "mlp.linear_fc1.bias", ("transformer.h.{i}.mlp.c_fc.bias",), ("blk.{i}.ffn_up.bias",)),
    Row(
        LAYER + "mlp.linear_fc2.weight",
        ("transformer.h.{i}.mlp.c_proj.weight",),
        ("blk.{i}.ffn_down.weight",),
        conv1d=True,
    ),
    Row(LAYER + "mlp.linear_fc2.bias", ("transformer.h.{i}.mlp.c_proj.bias",), ("blk.{i}.ffn_down.bias",)),
    Row("decoder.final_layernorm.weight", ("transformer.ln_f.weight",), ("output_norm.weight",)),
    Row("decoder.final_layernorm.bias", ("transformer.ln_f.bias",), ("output_norm.bias",)),
    Row("output_layer.weight", ("lm_head.weight",), ("output.weight",), Parts.VOCAB),
)

LLAMA = (
    Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ("token_embd.weight",), Parts.VOCAB),
    Row(
        LAYER + "self_attention.linear_qkv.layer_norm_weight",
        ("model.layers.{i}.input_layernorm.weight",),
        ("blk.{i}.attn_norm.weight",),
    ),
    Row(
        LAYER + "self_attention.linear_qkv.weight",
        (
            "model.layers.{i}.self_attn.q_proj.weight",
            "model.layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight",
        ),
        ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"),
        Parts.QKV,
    ),
    Row(
        LAYER + "self_attention.linear_proj.weight",
        ("model.layers.{i}.self_attn.o_proj.weight",),
        ("blk.{i}.attn_output.weight",),
    ),
    Row(
        LAYER + "mlp.linear_fc1.layer_norm_weight",
        ("model.layers.{i}.post_attention_layernorm.weight",),
        ("blk.{i}.ffn_norm.weight",),
    ),
    Row(
        LAYER + "mlp.linear_fc1.weight",
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
        ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"),
        Parts.GATE_UP,
    ),
    Row(LAYER + "mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), ("blk.{i}.ffn_down.weight",)),
    Row("decoder.final_layernorm.weight", ("model.norm.weight",), ("output_norm.weight",)),
    Row("output_layer.weight", ("lm_head.weight",), ("output.weight",), Parts.VOCAB),
)

TABLES = {"gpt2": GPT2, "llama": LLAMA}

QKV_BIAS = Row(
    LAYER + "self_attention.linear_qkv.bias",
    (
        "model.layers.{i}.self_attn.q_proj.bias",
        "model.layers.{i}.self_attn.k_proj.bias",
        "model.layers.{i}.self_attn.v_proj.bias",
    ),
    ("blk.{i}.attn_q.bias", "blk.{i}.attn_k.bias", "blk.{i}.attn_v.bias"),
    Parts.QKV,
)

MIXTRAL_EXPERTS = (
    Row(
        LAYER + "mlp.router.weight",
        ("model.layers.{i}.block_sparse_moe.gate.weight",),
        ("blk.{i}.ffn_gate_inp.weight",),
    ),
    Row(
        LAYER + "mlp.experts.experts.linear_fc1.weight",
        (
            "model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight",
            "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight",
        ),
        ("blk.{i}.ffn_gate_exps.weight", "blk.{i}.ffn_up_exps.weight"),
        Parts.EXPERTS_GATE_UP,
    ),
    Row(
        LAYER + "mlp.experts.experts.linear_fc2.weight",
        ("model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight",),
        ("blk.{i}.ffn_down_exps.weight",),
        Parts.EXPERTS,
    ),
)

QWEN2_MOE_EXPERTS = (
    Row(LAYER + "mlp.router.weight", ("model.layers.{i}.mlp.gate.weight",), ("blk.{i}.ffn_gate_inp.weight",)),
    Row(
        LAYER + "mlp.experts.experts.linear_fc1.weight",
        ("model.layers.{i}.mlp.experts.{j}.gate_proj.weight", "model.layers.{i}.mlp.experts.{j}.up_proj.weight"),
        ("blk.{i}.ffn_gate_exps.weight", "blk.{i}.ffn_up_exps.weight"),
        Parts.EXPERTS_GATE_UP,
    ),
    Row(
        LAYER + "mlp.experts.experts.linear_fc2.weight",
        ("model.layers.{i}.mlp.experts.{j}.down_proj.weight",),
        ("blk.{i}.ffn_down_exps.weight",),
        Parts.EXPERTS,
    ),
    Row(
        LAYER + "mlp.shared_experts.linear_fc1.weight",
        ("model.layers.{i}.mlp.shared_expert.gate_proj.weight", "model.layers.{i}.mlp.shared_expert.up_proj.weight"),
        ("blk.{i}.ffn_gate_shexp.weight", "blk.{i}.ffn_up_shexp.weight"),
        Parts.GATE_UP,
    ),
    Row(
        LAYER + "mlp.shared_experts.linear_fc2.weight",
        ("model.layers.{i}.mlp.shared_expert.down_proj.weight",),
        ("blk.{i}.ffn_down_shexp.weight",),
    ),
    Row(
        LAYER + "mlp.shared_experts.gate_weight",
        ("model.layers.{i}.mlp.shared_expert_gate.weight",),
        ("blk.{i}.ffn_gate_inp_shexp.weight",),
    ),
)

EXPERT_TABLES = {"mixtral": MIXTRAL_EXPERTS, "qwen2_moe": QWEN2_MOE_EXPERTS}
DENSE_MLP = (LAYER + "mlp.linear_fc1.weight", LAYER + "mlp.linear_fc2.weight")


def architecture(model: ModelConfig) -> str:
    """``gpt2``, ``llama``, ``mixtral`` or ``qwen2_moe``: the inference architecture that computes exactly what
    ``model`` computes."""
    groups = model.query_groups
    gpt2 = (
        model.position_embedding == PositionEmbedding.learned
        and model.normalization == Normalization.LayerNorm
        and model.activation == Activation.gelu
        and model.bias
        and groups == model.num_attention_heads
    )
    llama = (
        model.position_embedding == PositionEmbedding.rope
        and model.normalization == Normalization.RMSNorm
        and model.activation == Activation.swiglu
        and not model.bias
    )
    if gpt2 and model.moe.num_experts == 0:
        return "gpt2"
    if llama:
        return _llama_family(model)
    raise ConversionError(
        f"model {model.name!r} (position_embedding={model.position_embedding.value}, "
        f"normalization={model.normalization.value}, activation={model.activation.value}, bias={model.bias}, "
        f"num_query_groups={model.num_query_groups}) is neither GPT-2 style (learned, LayerNorm, gelu, biases, "
        "no grouped-query attention) nor Llama style (rope, RMSNorm, swiglu, no biases): no inference format "
        "computes the same function"
    )


def _llama_family(model: ModelConfig) -> str:
    """Llama for dense models; for MoE ones Mixtral (routed experts only) or Qwen2-MoE (plus a gated shared
    expert), refusing, by field, what neither computes."""
    moe = model.moe
    if moe.num_experts == 0:
        if model.qkv_bias:
            raise ConversionError(
                "model.qkv_bias=true: Llama has no Q/K/V-only biases (its attention_bias also "
                "biases the output projection)"
            )
        return "llama"
    if moe.expert_bias:
        raise ConversionError(
            "model.moe.expert_bias=true: sigmoid router scores with a balancing bias; neither "
            "Mixtral nor Qwen2-MoE routes that way"
        )
    if moe.shared_expert_size:
        if not moe.shared_expert_gate:
            raise ConversionError(
                "model.moe.shared_expert_gate=false: Qwen2-MoE, the format with a shared expert, "
                "always scales it by a sigmoid gate"
            )
        return "qwen2_moe"
    refused = [
        problem
        for problem, bad in (
            ("model.moe.pre_softmax=true (Mixtral renormalises the top-k probabilities)", moe.pre_softmax),
            (f"model.moe.layer_freq={moe.layer_freq} (every Mixtral layer is a MoE layer)", moe.layer_freq != 1),
            ("model.qkv_bias=true (Mixtral has no attention biases)", model.qkv_bias),
        )
        if bad
    ]
    if refused:
        raise ConversionError(
            "a MoE model without a shared expert exports as Mixtral, which cannot express "
            + "; ".join(refused)
            + " (Qwen2-MoE can, with a gated shared expert)"
        )
    return "mixtral"


def stacked(model: ModelConfig) -> bool:
    """Whether megatron-core stacks every layer's tensor of one name on a leading axis. It does not for MoE
    models: gptscale.model.build hands it MoE-or-dense per layer as a list, so layers are keyed one by one."""
    return model.moe.num_experts == 0


def expert_ffn_size(model: ModelConfig) -> int:
    return model.expert_ffn_size


def layer_rows(model: ModelConfig, index: int) -> tuple[Row, ...]:
    """The rows of layer ``index``: attention, then a dense MLP or experts (plus a shared expert)."""
    arch = architecture(model)
    table = TABLES["llama" if arch in EXPERT_TABLES else arch]
    layer = [row for row in table if row.megatron.startswith(LAYER)]
    if model.qkv_bias:
        layer.append(QKV_BIAS)
    if arch in EXPERT_TABLES and is_moe_layer(model, index):
        layer = [row for row in layer if row.megatron not in DENSE_MLP] + list(EXPERT_TABLES[arch])
    return tuple(layer)


def rows(model: ModelConfig) -> tuple[Row, ...]:
    """The rows outside the layers; tied models have no output layer of their own."""
    arch = architecture(model)
    return tuple(
        row
        for row in TABLES["llama" if arch in EXPERT_TABLES else arch]
        if not row.megatron.startswith(LAYER) and not (row.megatron == "output_layer.weight" and model.tie_embeddings)
    )


def placed_rows(model: ModelConfig) -> Iterator[tuple[Row, str, int | None, int | None]]:
    """(row, megatron-core key, index into the key's stacked-layer axis or None, layer or None) for every tensor."""
    for row in rows(model):
        yield row, row.megatron, None, None
    for i in range(model.num_layers):
        for row in layer_rows(model, i):
            if stacked(model):
                yield row, row.megatron, i, i
            else:
                yield row, f"{LAYER}{i}.{row.megatron[len(LAYER) :]}", None, i


def _heads(model: ModelConfig) -> tuple[int, int]:
    return model.num_attention_heads, model.query_groups


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
    grouped = torch.cat(
        [
            q.reshape(groups, heads // groups, -1, *rest),
            k.reshape(groups, 1, -1, *rest),
            v.reshape(groups, 1, -1, *rest),
        ],
        dim=1,
    )
    return grouped.reshape(-1, *rest)


def to_outside(row: Row, tensor: torch.Tensor, model: ModelConfig, vocab_size: int, hf: bool) -> list[torch.Tensor]:
    """One layer's megatron-core tensor as the tensors named by ``row.hf`` (``hf``) or ``row.gguf``; experts
    are one entry per expert and name in HF (expert-major), stacked in GGUF."""
    names = row.hf if hf else row.gguf
    if row.parts in (Parts.EXPERTS, Parts.EXPERTS_GATE_UP):
        per_expert = list(tensor.chunk(2, dim=1)) if row.parts == Parts.EXPERTS_GATE_UP else [tensor]
        if not hf:
            return [part.contiguous() for part in per_expert]
        return [part[j].contiguous() for j in range(tensor.shape[0]) for part in per_expert]
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
    if row.parts in (Parts.EXPERTS, Parts.EXPERTS_GATE_UP):
        per_expert = 2 if row.parts == Parts.EXPERTS_GATE_UP else 1
        return torch.stack(
            [torch.cat(parts[j : j + per_expert], dim=0) for j in range(0, len(parts), per_expert)]
        ).contiguous()
    if row.parts == Parts.VOCAB:
        (embedding,) = parts
        padding = padded_vocab_size(embedding.shape[0], model.vocab_multiple) - embedding.shape[0]
        return torch.cat([embedding, embedding.new_zeros(padding, *embedding.shape[1:])]).contiguous()
    if row.parts == Parts.QKV:
        if len(parts) == 1:
            heads, groups = _heads(model)
            head_dim = model.hidden_size // heads
            parts = list(parts[0].split([heads * head_dim, groups * head_dim, groups * head_dim], dim=0))
        q, k, v = parts
        return merge_qkv(q, k, v, model).contiguous()
    return torch.cat(parts, dim=0).contiguous() if len(parts) > 1 else parts[0].contiguous()


def outside_names(row: Row, model: ModelConfig, layer: int | None, hf: bool) -> list[str]:
    """The names ``to_outside`` returns tensors for, in its order."""
    names = row.hf if hf else row.gguf
    experts = range(model.moe.num_experts) if hf and row.parts in (Parts.EXPERTS, Parts.EXPERTS_GATE_UP) else [0]
    return [name.format(i=layer, j=j) for j in experts for name in names]


def export_tensors(
    model: ModelConfig, tensors: Mapping[str, torch.Tensor], vocab_size: int, hf: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in HF's (``hf``) or GGUF's naming, layer by layer, for every row of the table."""
    for row, key, axis, layer in placed_rows(model):
        tensor = tensors[key] if axis is None else tensors[key][axis]
        yield from zip(outside_names(row, model, layer, hf), to_outside(row, tensor, model, vocab_size, hf))


def import_tensors(model: ModelConfig, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """megatron-core's global tensors from HF tensors (``read(name)``), stacked over layers where megatron-core
    stacks them."""
    per_key: dict[str, list[torch.Tensor]] = {}
    for row, key, axis, layer in placed_rows(model):
        tensor = to_megatron(row, [read(name) for name in outside_names(row, model, layer, hf=True)], model)
        per_key.setdefault(key, []).append(tensor)
    return {
        key: torch.stack(parts) if len(parts) > 1 or stacked(model) and key.startswith(LAYER) else parts[0]
        for key, parts in per_key.items()
    }
