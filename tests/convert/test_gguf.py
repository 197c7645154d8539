"""GGUF export, checked by llama.cpp itself (llama-cpp-python): logits, greedy generation, tokenizer, Q8_0."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from gptscale.convert import ConversionError
from gptscale.convert.generate import Decoder, generate
from gptscale.convert.gguf import export_gguf, interleave_rope_rows
from tests.convert.llama_cpp_run import greedy, load, load_vocab, logits, perplexity
from tests.convert.models import (
    EOD,
    HELD_OUT_FILES,
    perturbed_state,
    scaled_config,
    stdlib_text,
    tiny_config,
    train_state,
)

SAMPLES = [
    "def f(x):\n    return x + 1",
    "Hello  world!  123 4567 éà ✓",
    "  \n\n\tclass Foo(Bar):  # ok",
    "it's   we'll\r\n<|endoftext|>next document",
]


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def exported(request, trained, tokenizer_file, tmp_path_factory):
    cfg, state = trained(request.param)
    out = tmp_path_factory.mktemp(request.param) / "model-f32.gguf"
    summary = export_gguf(cfg, state, tokenizer_file, out)
    assert summary.files == [out] and summary.dtype == "f32"
    return cfg, state, out


def test_logits_and_greedy_generation_match(exported, tokenizer_file):
    cfg, state, path = exported
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    decoder = Decoder(cfg.model, state, tokenizer.get_vocab_size())
    llm = load(path)
    ids = tokenizer.encode("def parse_args(self, args=None, namespace=None):\n").ids
    ours = decoder.forward(torch.tensor([ids]), decoder.new_cache())[0].numpy()
    assert np.abs(logits(llm, ids) - ours).max() <= 1e-3
    assert generate(decoder, ids, 16) == greedy(llm, ids, 16)


def test_llama_cpp_tokenizes_like_ours(exported, tokenizer_file):
    _, _, path = exported
    ours = Tokenizer.from_file(str(tokenizer_file))
    llm = load_vocab(path)
    for text in SAMPLES:  # tokenizers encodes special tokens written in the text: llama.cpp's special=True
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours.encode(text).ids
    assert llm.token_eos() == ours.token_to_id(EOD)
    assert llm.detokenize(ours.encode(SAMPLES[1]).ids).decode() == SAMPLES[1]


def test_q8_0_perplexity_within_two_percent_of_f32(exported, tokenizer_file, tmp_path):
    cfg, state, f32_path = exported
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    ids = tokenizer.encode(stdlib_text(HELD_OUT_FILES)).ids[:512]
    q8_path = tmp_path / "model-q8_0.gguf"
    export_gguf(cfg, state, tokenizer_file, q8_path, dtype="q8_0")
    assert q8_path.stat().st_size < 0.5 * f32_path.stat().st_size
    f32, q8 = perplexity(load(f32_path), ids), perplexity(load(q8_path), ids)
    assert f32 < 0.5 * tokenizer.get_vocab_size()  # the model has learned something
    assert abs(q8 / f32 - 1) <= 0.02, (f32, q8)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_loads(exported, tokenizer_file, tmp_path, dtype):
    cfg, state, f32_path = exported
    path = tmp_path / f"model-{dtype}.gguf"
    export_gguf(cfg, state, tokenizer_file, path, dtype=dtype)
    ids = Tokenizer.from_file(str(tokenizer_file)).encode("import os\n").ids
    diff = np.abs(logits(load(path, 64), ids) - logits(load(f32_path, 64), ids)).max()
    assert diff < 0.05


@pytest.mark.parametrize("scaling", ["llama3", "yarn"])
def test_rope_scaled_logits_match_past_the_original_context(scaling, tokenizer_file, tmp_path):
    """YaRN as llama.cpp's rope.scaling keys, Llama 3's scaling as its rope_freqs tensor: the same logits at
    112 tokens of a model whose original context is 32."""
    cfg = scaled_config(scaling)
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    state = perturbed_state(cfg, vocab)
    export_gguf(cfg, state, tokenizer_file, tmp_path / "model.gguf")
    ids = torch.randint(0, vocab, (112,), generator=torch.Generator().manual_seed(3)).tolist()
    decoder = Decoder(cfg.model, state, vocab)
    ours = decoder.forward(torch.tensor([ids]), decoder.new_cache())[0].numpy()
    unscaled = Decoder(tiny_config("llama-tiny").model, state, vocab)
    assert np.abs(unscaled.forward(torch.tensor([ids]), unscaled.new_cache())[0].numpy() - ours).max() > 1e-3
    assert np.abs(logits(load(tmp_path / "model.gguf", 128), ids) - ours).max() <= 1e-4


def test_yarn_temperature_llama_cpp_cannot_express_is_refused(tokenizer_file, tmp_path):
    cfg = tiny_config(
        "llama-tiny",
        "model.rope_scaling.type=yarn",
        "model.rope_scaling.factor=4",
        "model.rope_scaling.original_max_position_embeddings=32",
        "model.rope_scaling.mscale=0.5",
    )
    with pytest.raises(ConversionError, match="model.rope_scaling.mscale=0.5"):
        export_gguf(cfg, perturbed_state(cfg, 400), tokenizer_file, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_rope_rows_interleave_per_head():
    rows = torch.arange(8.0)[:, None]  # two heads of four: [a0 a1 b0 b1] -> [a0 b0 a1 b1]
    assert interleave_rope_rows(rows, heads=2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.fixture(scope="module")
def k_quant_model(tokenizer_file):
    """A Llama-style model whose matrices' rows are multiples of 256 values, so llama.cpp's K-quant blocks
    apply (a narrower model would fall back to other types)."""
    cfg = tiny_config("llama-tiny", "model.hidden_size=256", "model.ffn_hidden_size=512", "model.num_layers=2")
    return cfg, train_state(cfg, tokenizer_file, steps=300)


BOUNDS = {"q6_k": 0.01, "q5_k_m": 0.02, "q4_k_m": 0.05}  # perplexity ratio to f16's, docs/converting.md


def test_k_quants_load_and_stay_near_f16_perplexity(k_quant_model, tokenizer_file, tmp_path):
    cfg, state = k_quant_model
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(stdlib_text(HELD_OUT_FILES)).ids[:512]
    paths = {}
    for dtype in ("f16", *BOUNDS):
        paths[dtype] = tmp_path / f"model-{dtype}.gguf"
        summary = export_gguf(cfg, state, tokenizer_file, paths[dtype], dtype=dtype)
        assert summary.dtype == dtype and list(tmp_path.glob("*.f32")) == []
    sizes = {dtype: path.stat().st_size for dtype, path in paths.items()}
    assert sizes["q4_k_m"] < sizes["q5_k_m"] < sizes["q6_k"] < 0.5 * sizes["f16"], sizes  # K-quant blocks used
    f16 = perplexity(load(paths["f16"]), ids)
    for dtype, bound in BOUNDS.items():
        quantized = perplexity(load(paths[dtype]), ids)
        assert abs(quantized / f16 - 1) <= bound, (dtype, f16, quantized)
