"""Import a local Hugging Face GPT-2, Llama, Mixtral or Qwen2-MoE directory as gptscale's config and tensors,
to continue pretraining from it.

The model config is derived from the HF config and composed through Hydra like any run's, so layout
overrides (``parallel.tp=2``) and other keys apply and are validated now, against the model, rather than
at the first training launch. The checkpoint written from it holds weights only, which load at any
layout; the overrides are what its config.yaml records and what ``resume_overrides`` hands back for the
``gptscale-train`` command that continues the run. Weights are read from safetensors and mapped back
through ``gptscale.convert.mapping``'s tables; the vocabulary is padded to ``model.vocab_multiple`` with
zero rows. Features gptscale's model does not compute are refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
from enum import Enum
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from gptscale.config import Config, ConfigError, check, load_config
from gptscale.config.schema import RopeScaling, RopeScalingConfig
from gptscale.convert import ConversionError
from gptscale.convert.mapping import import_tensors
from gptscale.model.rope import attention_factor

log = logging.getLogger("gptscale")

SUPPORTED = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}


def _read_config(hf_dir: Path) -> tuple[dict, str]:
    """config.json and its architecture, a value of ``SUPPORTED`` (from ``architectures``, or ``model_type``
    where that is missing)."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    config = json.loads(path.read_text())
    architectures = config.get("architectures") or []
    known = [SUPPORTED[name] for name in architectures if name in SUPPORTED]
    if not architectures and config.get("model_type") in SUPPORTED.values():
        known = [config["model_type"]]
    if not known:
        raise ConversionError(
            f"{hf_dir}: architecture {architectures or config.get('model_type')} is not supported; "
            f"gptscale imports {sorted(SUPPORTED)}"
        )
    return config, known[0]


def _gpt2_overrides(config: dict) -> list[str]:
    refused = [
        key
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention")
        if config.get(key)
    ]
    if refused or not config.get("scale_attn_weights", True):
        raise ConversionError(f"GPT-2 options gptscale's model does not compute: {refused or ['scale_attn_weights']}")
    activation = config.get("activation_function", "gelu_new")
    if activation not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise ConversionError(f"GPT-2 activation_function={activation!r}: gptscale computes GELU")
    if activation != "gelu":
        log.warning(
            "activation_function=%s is GELU's tanh approximation; gptscale computes exact GELU "
            "(outputs differ slightly until training adapts)",
            activation,
        )
    hidden = config["n_embd"]
    return [
        "model.position_embedding=learned",
        "model.normalization=LayerNorm",
        "model.activation=gelu",
        "model.bias=true",
        f"model.num_layers={config['n_layer']}",
        f"model.hidden_size={hidden}",
        f"model.num_attention_heads={config['n_head']}",
        "model.num_query_groups=null",
        f"model.ffn_hidden_size={config.get('n_inner') or 4 * hidden}",
        f"model.max_position_embeddings={config['n_positions']}",
        f"model.norm_eps={config.get('layer_norm_epsilon', 1e-5)}",
        f"model.tie_embeddings={str(config.get('tie_word_embeddings', True)).lower()}",
    ]


def _llama_overrides(config: dict) -> list[str]:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    problems = []
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("attention_bias / mlp_bias")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']}")
    if config.get("head_dim", hidden // heads) != hidden // heads:
        problems.append(f"head_dim={config['head_dim']} (gptscale uses hidden_size / num_attention_heads)")
    if rope_type not in ("default", "llama3", "yarn"):
        problems.append(f"RoPE scaling {rope_type!r}")
    if problems:
        raise ConversionError(f"Llama options gptscale's model does not compute: {', '.join(problems)}")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if float(int(theta)) != float(theta):
        raise ConversionError(f"rope_theta={theta}: megatron-core takes an integer RoPE base")
    return [
        "model.position_embedding=rope",
        "model.normalization=RMSNorm",
        "model.activation=swiglu",
        "model.bias=false",
        f"model.num_layers={config['num_hidden_layers']}",
        f"model.hidden_size={hidden}",
        f"model.num_attention_heads={heads}",
        f"model.num_query_groups={config.get('num_key_value_heads') or heads}",
        f"model.ffn_hidden_size={config['intermediate_size']}",
        f"model.max_position_embeddings={config['max_position_embeddings']}",
        f"model.norm_eps={config.get('rms_norm_eps', 1e-6)}",
        f"model.rotary_base={float(theta)}",
        f"model.tie_embeddings={str(config.get('tie_word_embeddings', False)).lower()}",
    ] + ([] if rope_type == "default" else _rope_scaling_overrides(config, rope))


def _rope_scaling_overrides(config: dict, rope: dict) -> list[str]:
    """``model.rope_scaling.*`` of transformers' llama3 or yarn RoPE parameters, with transformers' defaults.

    Without ``attention_factor``, transformers derives YaRN's temperature from mscale and mscale_all_dim only
    when both are set, else from the factor alone, as megatron-core does at mscale=1, mscale_all_dim=0. An
    explicit ``attention_factor`` (gptscale's export writes one) must be what the mscale values given beside it
    give in megatron-core."""
    kind, default = RopeScaling(rope.get("rope_type", rope.get("type"))), RopeScalingConfig()
    original = rope.get("original_max_position_embeddings") or config["max_position_embeddings"]
    factor = rope.get("factor") or config["max_position_embeddings"] / original
    if kind == RopeScaling.llama3:
        scaling = RopeScalingConfig(
            kind, factor, original, low_freq_factor=rope["low_freq_factor"], high_freq_factor=rope["high_freq_factor"]
        )
    else:
        if not rope.get("truncate", True):
            raise ConversionError("YaRN with truncate=false: megatron-core rounds the correction range to integers")
        given = rope.get("attention_factor")
        temperature = given is not None or bool(rope.get("mscale") and rope.get("mscale_all_dim"))
        scaling = RopeScalingConfig(
            kind,
            factor,
            original,
            beta_fast=rope.get("beta_fast") or default.beta_fast,
            beta_slow=rope.get("beta_slow") or default.beta_slow,
            mscale=rope.get("mscale", default.mscale) if temperature else default.mscale,
            mscale_all_dim=rope.get("mscale_all_dim", default.mscale_all_dim)
            if temperature
            else default.mscale_all_dim,
        )
        if given is not None and not math.isclose(given, attention_factor(scaling), rel_tol=1e-6):
            raise ConversionError(
                f"YaRN attention_factor={given}: megatron-core derives it from factor, mscale and "
                f"mscale_all_dim, which give {attention_factor(scaling)}"
            )
    return _changed(scaling, default, "model.rope_scaling.")


def _moe_layer_freq(config: dict, sparse: list[int]) -> int:
    """``model.moe.layer_freq`` whose MoE layers (i % freq == 0) are exactly ``sparse``; refused otherwise."""
    layers = config["num_hidden_layers"]
    for freq in range(1, layers + 1):
        if [i for i in range(layers) if i % freq == 0] == sparse:
            return freq
    raise ConversionError(
        f"MoE layers {sparse} of {layers}: gptscale places MoE layers every model.moe.layer_freq "
        "layers from the first (mlp_only_layers / decoder_sparse_step give another pattern)"
    )


def _moe_overrides(config: dict, arch: str) -> list[str]:
    """The llama overrides plus ``model.moe.*`` for Mixtral (every layer routed, top-k renormalised) or
    Qwen2-MoE (a gated shared expert, dense layers where ``mlp_only_layers`` says)."""
    if config.get("sliding_window") and config.get("use_sliding_window", arch == "mixtral"):
        raise ConversionError(f"sliding_window={config['sliding_window']}: gptscale attends over the whole sequence")
    qkv_bias = arch == "qwen2_moe" and config.get("qkv_bias", True)
    derived = _llama_overrides(config) + [
        f"model.moe.top_k={config['num_experts_per_tok']}",
        f"model.moe.aux_loss_coeff={config.get('router_aux_loss_coef', 0.0)}",
        f"model.qkv_bias={str(bool(qkv_bias)).lower()}",
    ]
    if arch == "mixtral":
        return derived + [
            f"model.moe.num_experts={config['num_local_experts']}",
            f"model.moe.ffn_hidden_size={config['intermediate_size']}",
            "model.moe.pre_softmax=false",
        ]
    step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
    sparse = [i for i in range(config["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0]
    return derived + [
        f"model.moe.num_experts={config['num_experts']}",
        f"model.moe.ffn_hidden_size={config['moe_intermediate_size']}",
        f"model.moe.shared_expert_size={config['shared_expert_intermediate_size']}",
        "model.moe.shared_expert_gate=true",
        f"model.moe.pre_softmax={str(not config.get('norm_topk_prob', False)).lower()}",
        f"model.moe.layer_freq={_moe_layer_freq(config, sparse)}",
    ]


class _Weights:
    """Tensors of a safetensors checkpoint, single file or sharded with an index, read on demand."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (hf_dir / "model.safetensors").is_file():
            with safe_open(hf_dir / "model.safetensors", "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise ConversionError(
                f"{hf_dir} holds no model.safetensors (PyTorch .bin weights are not read: "
                "re-save the model with save_pretrained(safe_serialization=True))"
            )
        self.hf_dir, self.weight_map = hf_dir, weight_map

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"{self.hf_dir} lacks tensor {name}")
        with safe_open(self.hf_dir / self.weight_map[name], "pt") as f:
            return f.get_tensor(name).float()


def _tokenizer_file(hf_dir: Path) -> Optional[Path]:
    """tokenizer.json, or one written from the directory's slow tokenizer files; None without a tokenizer."""
    if (hf_dir / "tokenizer.json").is_file():
        return hf_dir / "tokenizer.json"
    try:
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(str(hf_dir)).backend_tokenizer
    except Exception as error:  # no tokenizer files at all, or one transformers cannot read
        log.warning("%s: no usable tokenizer (%s); the checkpoint will have none", hf_dir, error)
        return None
    path = Path(tempfile.mkdtemp(prefix="gptscale-tokenizer-")) / "tokenizer.json"
    backend.save(str(path))
    return path


def import_hf(
    hf_dir: Path, overrides: Optional[list[str]] = None
) -> tuple[Config, dict[str, torch.Tensor], Optional[Path]]:
    """(config, megatron-core global tensors, tokenizer file) of the HF model at ``hf_dir``."""
    hf_dir = Path(hf_dir)
    config, arch = _read_config(hf_dir)
    if arch == "gpt2":
        derived = _gpt2_overrides(config)
    elif arch == "llama":
        derived = _llama_overrides(config)
    else:
        derived = _moe_overrides(config, arch)
    derived += [f"model.name={hf_dir.resolve().name}", f"model.vocab_size={config['vocab_size']}"]
    cfg = load_config(derived + list(overrides or []))
    try:
        check(cfg, cfg.parallel.tp * cfg.parallel.pp)
    except ConfigError as error:
        raise ConversionError(f"the layout does not fit the imported model: {error}") from error
    return cfg, import_tensors(cfg.model, _Weights(hf_dir)), _tokenizer_file(hf_dir)


def _override_value(value) -> str:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def resume_overrides(cfg: Config, overrides: Optional[list[str]] = None) -> list[str]:
    """The ``gptscale-train`` overrides that build the imported model (every ``model.*`` key that differs
    from conf/'s defaults) followed by the user's other overrides (the layout): a training run given them
    and ``checkpoint.resume=<the checkpoint>`` continues from the imported weights at that layout."""
    return _changed(cfg.model, load_config().model, "model.") + [
        override for override in overrides or [] if override.lstrip("+~").split("=")[0].split(".")[0] != "model"
    ]


def _changed(node, default, prefix: str) -> list[str]:
    """``prefix.key=value`` for every leaf of ``node`` (nested groups such as model.moe too) that differs
    from ``default``."""
    changed = []
    for field in dataclasses.fields(node):
        value, base = getattr(node, field.name), getattr(default, field.name)
        if dataclasses.is_dataclass(value):
            changed += _changed(value, base, f"{prefix}{field.name}.")
        elif value != base:
            changed.append(f"{prefix}{field.name}={_override_value(value)}")
    return changed
