"""Hugging Face export: transformers computes what gptscale computes, tokenizes alike, and generates alike."""

import json

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptscale.convert.generate import Decoder, generate
from gptscale.convert.hf import export_hf
from tests.convert.models import EOD, megatron_logits, perturbed_state, scaled_config, tiny_config

VARIANTS = {
    "gpt2": ("gpt2-tiny", []),
    "gpt2-untied": ("gpt2-tiny", ["model.tie_embeddings=false"]),
    "llama-gqa": ("llama-tiny", []),  # 4 query heads in 2 groups
    "llama-mqa-tied": (
        "llama-tiny",
        ["model.num_query_groups=1", "model.tie_embeddings=true", "model.rotary_base=500000"],
    ),
}
SAMPLES = ["def f(x):\n    return x + 1", "Hello  world!  123 4567 éà ✓", "  \n\n\tclass Foo(Bar):  # ok"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_gptscale(variant, tokenizer_file, tmp_path):
    model, overrides = VARIANTS[variant]
    cfg = tiny_config(model, *overrides)
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    state = perturbed_state(cfg, vocab)
    tokens = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(1))
    ours = megatron_logits(cfg, state, tokens)
    assert ours.shape[-1] == 512 and vocab == 400  # padded to model.vocab_multiple, trimmed on export

    export_hf(cfg, state, tokenizer_file, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert theirs.shape == (2, 48, vocab)
    assert (theirs - ours[..., :vocab]).abs().max().item() <= 1e-4
    assert hf.config.tie_word_embeddings == cfg.model.tie_embeddings


def test_tokenizer_files(tokenizer_file, tmp_path, trained):
    cfg, state = trained("gpt2-tiny")
    export_hf(cfg, state, tokenizer_file, tmp_path / "hf")
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = Tokenizer.from_file(str(tokenizer_file))
    for text in SAMPLES:
        assert hf_tokenizer(text)["input_ids"] == ours.encode(text).ids
    eod = ours.token_to_id(EOD)
    assert hf_tokenizer.eos_token == EOD and hf_tokenizer.eos_token_id == eod
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eod


@pytest.mark.parametrize("model", ["gpt2-tiny", "llama-tiny"])
def test_greedy_generation_equals_transformers(model, tokenizer_file, trained, tmp_path):
    cfg, state = trained(model)
    export_hf(cfg, state, tokenizer_file, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    for prompt in ["def parse_args(self, args=None", "import os\n\nclass "]:
        ids = tokenizer.encode(prompt).ids
        ours = generate(Decoder(cfg.model, state, tokenizer.get_vocab_size()), ids, 32, stop=tokenizer.token_to_id(EOD))
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
        assert ours == theirs


def test_sharded_weights_and_half_precision(tokenizer_file, tmp_path, trained):
    cfg, state = trained("llama-tiny")
    export_hf(cfg, state, tokenizer_file, tmp_path / "f32", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "f32" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((tmp_path / "f32" / name).is_file() for name in files)
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "f32").eval()
    export_hf(cfg, state, tokenizer_file, tmp_path / "bf16", dtype="bf16")
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    assert next(half.parameters()).dtype == torch.bfloat16
    tokens = torch.arange(40)[None]
    with torch.no_grad():
        assert (full(tokens).logits - half(tokens).logits.float()).abs().max() < 0.1


@pytest.mark.parametrize("scaling", ["llama3", "yarn"])
def test_rope_scaled_logits_equal_gptscale_past_the_original_context(scaling, tokenizer_file, tmp_path):
    cfg = scaled_config(scaling)
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    state = perturbed_state(cfg, vocab)
    tokens = torch.randint(0, vocab, (2, 112), generator=torch.Generator().manual_seed(2))
    ours = megatron_logits(cfg, state, tokens)[..., :vocab]
    unscaled = megatron_logits(tiny_config("llama-tiny"), state, tokens)[..., :vocab]
    assert (ours - unscaled).abs().max() > 1e-3  # the scaling changes what the model computes

    export_hf(cfg, state, tokenizer_file, tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert (theirs - ours).abs().max().item() <= 1e-4
    assert written["max_position_embeddings"] == 128
    assert written["rope_parameters"]["rope_type"] == scaling
    assert written["rope_parameters"]["original_max_position_embeddings"] == 32
