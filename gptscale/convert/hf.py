"""Export to a Hugging Face transformers directory: GPT2LMHeadModel or LlamaForCausalLM.

The directory holds safetensors weights (sharded with an index above ``max_shard_bytes``, as
``save_pretrained`` does), config.json, generation_config.json and the tokenizer files, so
``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)`` work offline.
Tensor names and layouts come from ``gptscale.convert.mapping``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from gptscale.config.schema import Config, ModelConfig, RopeScaling
from gptscale.convert import ConversionError
from gptscale.convert.mapping import architecture, export_tensors
from gptscale.convert.output import HF_EXPORT, Summary, staged
from gptscale.convert.state import check_state
from gptscale.convert.tokenizer import eod_token, load_tokenizer, vocab_size, write_hf_tokenizer
from gptscale.model.rope import attention_factor

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}


def output_vocab_size(state: Mapping[str, torch.Tensor], tokenizer_file: Optional[Path]) -> int:
    """The tokenizer's vocabulary (the padding rows are dropped); all rows without a tokenizer."""
    rows = state["embedding.word_embeddings.weight"].shape[0]
    if tokenizer_file is None:
        return rows
    size = vocab_size(load_tokenizer(tokenizer_file))
    if size > rows:
        raise ConversionError(f"the tokenizer has {size} tokens but the model only {rows} embedding rows")
    return size


def rope_parameters(model: ModelConfig) -> dict:
    """transformers' ``rope_parameters`` of the model's RoPE, scaling included. YaRN's temperature is written as
    ``attention_factor``, megatron-core's value (transformers would derive another from mscale when
    mscale_all_dim is 0); mscale and mscale_all_dim beside it bring the settings back on import."""
    scaling = model.rope_scaling
    parameters = {
        "rope_type": scaling.type.value,
        "rope_theta": float(model.rotary_base),
        "factor": scaling.factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings,
    }
    if scaling.type == RopeScaling.llama3:
        return {**parameters, "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor}
    if scaling.type == RopeScaling.yarn:
        return {
            **parameters,
            "beta_fast": scaling.beta_fast,
            "beta_slow": scaling.beta_slow,
            "mscale": scaling.mscale,
            "mscale_all_dim": scaling.mscale_all_dim,
            "attention_factor": attention_factor(scaling),
            "truncate": True,
        }
    return {"rope_type": "default", "rope_theta": float(model.rotary_base)}


def hf_config(cfg: Config, state: Mapping[str, torch.Tensor], vocab: int, eod_id: Optional[int], dtype: str):
    """transformers' config of the same model (exact GELU: megatron-core uses erf GELU, not GPT-2's tanh)."""
    from transformers import GPT2Config, LlamaConfig, MixtralConfig, Qwen2MoeConfig

    from gptscale.config.schema import is_moe_layer
    from gptscale.convert.mapping import expert_ffn_size

    model = cfg.model
    arch = architecture(model)
    common = dict(
        vocab_size=vocab,
        tie_word_embeddings=model.tie_embeddings,
        bos_token_id=eod_id,
        eos_token_id=eod_id,
        pad_token_id=eod_id,
        dtype={"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype],
    )
    if arch == "gpt2":
        config = GPT2Config(
            n_positions=state["embedding.position_embeddings.weight"].shape[0],
            n_embd=model.hidden_size,
            n_layer=model.num_layers,
            n_head=model.num_attention_heads,
            n_inner=model.ffn_size,
            activation_function="gelu",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=model.norm_eps,
            initializer_range=model.init_std,
            **common,
        )
    elif arch in ("mixtral", "qwen2_moe"):
        moe = model.moe
        layers = dict(
            hidden_size=model.hidden_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_attention_heads,
            num_key_value_heads=model.query_groups,
            hidden_act="silu",
            max_position_embeddings=model.max_position_embeddings,
            rms_norm_eps=model.norm_eps,
            rope_parameters=rope_parameters(model),
            num_experts_per_tok=moe.top_k,
            router_aux_loss_coef=moe.aux_loss_coeff,
            initializer_range=model.init_std,
            **common,
        )
        if arch == "mixtral":
            config = MixtralConfig(
                intermediate_size=expert_ffn_size(model),
                num_local_experts=moe.num_experts,
                head_dim=model.hidden_size // model.num_attention_heads,
                sliding_window=None,
                **layers,
            )
        else:  # softmax over all experts then top-k; renormalising them equals megatron-core's top-k then softmax
            config = Qwen2MoeConfig(
                intermediate_size=model.ffn_size,
                num_experts=moe.num_experts,
                moe_intermediate_size=expert_ffn_size(model),
                shared_expert_intermediate_size=moe.shared_expert_size,
                norm_topk_prob=not moe.pre_softmax,
                decoder_sparse_step=1,
                qkv_bias=model.qkv_bias,
                mlp_only_layers=[i for i in range(model.num_layers) if not is_moe_layer(model, i)],
                use_sliding_window=False,
                **layers,
            )
    else:
        config = LlamaConfig(
            hidden_size=model.hidden_size,
            intermediate_size=model.ffn_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_attention_heads,
            num_key_value_heads=model.query_groups,
            head_dim=model.hidden_size // model.num_attention_heads,
            hidden_act="silu",
            max_position_embeddings=model.max_position_embeddings,
            rms_norm_eps=model.norm_eps,
            rope_parameters=rope_parameters(model),
            attention_bias=False,
            mlp_bias=False,
            initializer_range=model.init_std,
            **common,
        )
    config.architectures = [ARCHITECTURES[arch]]
    return config


def _shards(named: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, tensor in named.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    return shards + [current]


def _write_weights(named: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards = _shards(named, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for index, shard in enumerate(tqdm(shards, desc="writing shards", unit="file"), start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in named.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )


def export_hf(
    cfg: Config,
    state: Mapping[str, torch.Tensor],
    tokenizer_file: Optional[Path],
    out_dir: Path,
    dtype: str = "f32",
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Summary:
    """Write ``state`` as a transformers model directory at ``out_dir``."""
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype} is not a Hugging Face weight type; choose one of {sorted(DTYPES)}")
    arch = architecture(cfg.model)
    check_state(cfg, state)
    vocab = output_vocab_size(state, tokenizer_file)
    eod = eod_token(load_tokenizer(tokenizer_file)) if tokenizer_file else None
    rows = list(export_tensors(cfg.model, state, vocab, hf=True))
    named = {
        name: tensor.to(DTYPES[dtype]).contiguous()
        for name, tensor in tqdm(rows, desc=f"converting to {ARCHITECTURES[arch]}", unit="tensor")
    }
    with staged(out_dir, HF_EXPORT, overwrite, make_dir=True) as stage:
        _write_weights(named, stage, max_shard_bytes)
        config = hf_config(cfg, state, vocab, None if eod is None else eod[1], dtype)
        config.save_pretrained(str(stage))
        from transformers import GenerationConfig

        GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        ).save_pretrained(str(stage))
        if tokenizer_file is not None:
            write_hf_tokenizer(tokenizer_file, stage, cfg.model.max_position_embeddings)
    return Summary(
        "Hugging Face transformers",
        ARCHITECTURES[arch],
        sum(t.numel() for t in named.values()),
        dtype,
        Path(out_dir),
        sorted(Path(out_dir).iterdir()),
    )
