"""Export to GGUF for llama.cpp (``gpt2`` and ``llama`` architectures), with the tokenizer embedded.

Mixtral-style MoE models are llama.cpp's ``llama`` architecture with ``expert_count`` and
``expert_used_count`` set and each layer's experts stacked into one tensor per projection
(``ffn_gate_exps``, ``ffn_up_exps``, ``ffn_down_exps``) beside the router (``ffn_gate_inp``).

Two layouts differ from Hugging Face's. llama.cpp's ``llama`` architecture applies RoPE to adjacent pairs
(x0, x1), (x2, x3), ... of each head, while megatron-core (like HF) rotates the first half of a head
against the second; so the rows of every Q and K head are permuted from [first half; second half] to
interleaved pairs, which makes llama.cpp's rotation equal ours. And GGUF keeps nn.Linear's [out, in]
layout for every matrix, GPT-2's included. Norms and biases stay f32; Q8_0 quantizes matrices whose rows
are a multiple of its 32-value blocks and stores the others in f16, as llama.cpp's own converter does.
RoPE scaling travels as llama.cpp reads it: YaRN as the ``rope.scaling`` keys, Llama 3's as the
``rope_freqs`` tensor. llama.cpp's ``gpt2`` graph computes GELU with the tanh approximation where gptscale
computes it exactly; no GGUF key changes that, so GPT-2 style models differ from ours by a few 1e-4 in the
logits.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch
from tqdm import tqdm

from gptscale.config.schema import Config, ModelConfig, RopeScaling, RopeScalingConfig
from gptscale.convert import GGUF_DTYPES as DTYPES
from gptscale.convert import K_QUANTS, ConversionError
from gptscale.convert.hf import output_vocab_size
from gptscale.convert.mapping import architecture, expert_ffn_size, export_tensors
from gptscale.convert.output import GGUF_FILE, Summary, staged
from gptscale.convert.state import check_state
from gptscale.convert.tokenizer import gguf_vocab
from gptscale.model.rope import attention_factor, frequencies


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head, rows [first half; second half] to pairs (first[j], second[j]): llama.cpp's RoPE layout."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
    )


def rope_freq_factors(model: ModelConfig) -> torch.Tensor:
    """llama.cpp's ``rope_freqs``: what each rotation frequency is divided by (how llama.cpp carries Llama 3's
    scaling, as its own converter writes it)."""
    return frequencies(dataclasses.replace(model, rope_scaling=RopeScalingConfig())) / frequencies(model)


def write_rope_scaling(writer, model: ModelConfig) -> None:
    """YaRN's keys (llama3 scaling travels as the ``rope_freqs`` tensor). llama.cpp computes YaRN's attention
    temperature from the factor alone (0.1 ln(factor) + 1), so another mscale is refused."""
    import gguf

    scaling = model.rope_scaling
    if scaling.type != RopeScaling.yarn:
        return
    if not math.isclose(attention_factor(scaling), 0.1 * math.log(scaling.factor) + 1):
        raise ConversionError(
            f"model.rope_scaling.mscale={scaling.mscale} with mscale_all_dim={scaling.mscale_all_dim}: "
            "llama.cpp derives YaRN's attention temperature from the factor alone "
            "(mscale=1, mscale_all_dim=0); export --to hf"
        )
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(scaling.factor)
    writer.add_rope_scaling_orig_ctx_len(scaling.original_max_position_embeddings)
    writer.add_rope_scaling_yarn_beta_fast(scaling.beta_fast)
    writer.add_rope_scaling_yarn_beta_slow(scaling.beta_slow)


def _encode(tensor: torch.Tensor, dtype: str):
    """(data, raw GGML type or None) for ``GGUFWriter.add_tensor``."""
    from gguf import GGMLQuantizationType, quants

    data = tensor.float().numpy()
    if tensor.dim() == 1 or dtype == "f32":
        return data, None
    if dtype == "f16" or (dtype == "q8_0" and data.shape[-1] % 32):
        return data.astype(np.float16), None
    qtype = GGMLQuantizationType.BF16 if dtype == "bf16" else GGMLQuantizationType.Q8_0
    return quants.quantize(data, qtype), qtype


def export_gguf(
    cfg: Config,
    state: Mapping[str, torch.Tensor],
    tokenizer_file: Optional[Path],
    out_file: Path,
    dtype: str = "f32",
    overwrite: bool = False,
) -> Summary:
    """Write ``state`` and its tokenizer as one GGUF file at ``out_file``."""
    import gguf

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype} is not a GGUF type this converter writes; choose one of {DTYPES}")
    quantizer = llama_quantizer(dtype) if dtype in K_QUANTS else None
    if tokenizer_file is None:
        raise ConversionError(
            "the checkpoint has no tokenizer.json: GGUF needs the tokenizer for llama.cpp to "
            "tokenize text (train with a tokenized dataset)"
        )
    model = cfg.model
    arch = architecture(model)
    if arch == "qwen2_moe":
        raise ConversionError(
            f"model.moe.shared_expert_size={model.moe.shared_expert_size}: this converter writes "
            "Mixtral-style MoE GGUF only (routed experts, no shared expert); export --to hf and "
            "use llama.cpp's converter for Qwen2-MoE"
        )
    gguf_arch = "llama" if arch == "mixtral" else arch
    check_state(cfg, state)
    vocab = gguf_vocab(tokenizer_file)
    vocab_size = output_vocab_size(state, tokenizer_file)
    heads = model.num_attention_heads
    groups = model.query_groups
    written = "f32" if quantizer else dtype
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[written]

    with staged(out_file, GGUF_FILE, overwrite, make_dir=False) as stage:
        target = stage.with_name(f"{stage.name}.f32") if quantizer else stage
        writer = gguf.GGUFWriter(str(target), gguf_arch)
        writer.add_name(model.name)
        writer.add_file_type(file_type)
        if written == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_block_count(model.num_layers)
        writer.add_embedding_length(model.hidden_size)
        if arch == "mixtral":
            writer.add_feed_forward_length(expert_ffn_size(model))
            writer.add_expert_count(model.moe.num_experts)
            writer.add_expert_used_count(model.moe.top_k)
        else:
            writer.add_feed_forward_length(model.ffn_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(groups)
        writer.add_vocab_size(vocab_size)
        if arch == "gpt2":
            writer.add_context_length(state["embedding.position_embeddings.weight"].shape[0])
            writer.add_layer_norm_eps(model.norm_eps)
        else:
            writer.add_context_length(model.max_position_embeddings)
            writer.add_layer_norm_rms_eps(model.norm_eps)
            writer.add_rope_freq_base(float(int(model.rotary_base)))
            writer.add_rope_dimension_count(model.hidden_size // heads)
            write_rope_scaling(writer, model)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.token_types)
        writer.add_token_merges(vocab.merges)
        if vocab.eod_id is not None:
            writer.add_eos_token_id(vocab.eod_id)
            writer.add_bos_token_id(vocab.eod_id)
            writer.add_pad_token_id(vocab.eod_id)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)

        parameters = 0
        tensors = list(export_tensors(model, state, vocab_size, hf=False))
        if model.rope_scaling.type == RopeScaling.llama3:
            tensors.append(("rope_freqs.weight", rope_freq_factors(model)))
        for name, tensor in tqdm(tensors, desc=f"converting to GGUF {arch} {written}", unit="tensor"):
            if gguf_arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                tensor = interleave_rope_rows(tensor, heads if "attn_q" in name else groups)
            data, raw_dtype = _encode(tensor, written)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
            parameters += tensor.numel()
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
        if quantizer:
            quantizer(target, stage)
            target.unlink()
    return Summary("GGUF", gguf_arch, parameters, dtype, Path(out_file), [Path(out_file)])


def llama_quantizer(dtype: str):
    """llama.cpp's quantizer for ``dtype`` (checked before anything is converted): ``quantize(f32_file, out)``."""
    try:
        import llama_cpp
    except ImportError:
        raise ConversionError(
            f"--dtype {dtype} is made by llama.cpp's own quantizer: pip install llama-cpp-python "
            "(or export --dtype f16 and run llama.cpp's llama-quantize)"
        ) from None
    import ctypes

    def quantize(source: Path, out: Path) -> None:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, K_QUANTS[dtype])
        params.nthread = os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise ConversionError(f"llama.cpp could not quantize {source} to {dtype}")

    return quantize
