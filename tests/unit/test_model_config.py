"""Model-side pure functions: flops accounting, backend choice."""

import pytest

from gptscale.config import load_config
from gptscale.config.schema import Backend
from gptscale.config.validate import padded_vocab_size
from gptscale.model.flops import flops_per_token
from gptscale.model.spec import resolve_backend, transformer_engine_available


def test_flops_per_token_matches_the_issue_reference():
    """nanoGPT's gpt2-124m at T=1024: 422k tokens/s was 36.5 % of 989 TFLOP/s, i.e. ~855 MFLOP per token."""
    model = load_config(["model=gpt2-124m"]).model
    flops = flops_per_token(model, padded_vocab_size(model.vocab_size, model.vocab_multiple), seq_len=1024)
    assert flops == pytest.approx(0.365 * 989e12 / 422e3, rel=0.01)


def test_swiglu_and_grouped_query_attention_are_counted():
    llama = load_config(["model=llama-7b"]).model
    flops = flops_per_token(llama, 32000, seq_len=4096)
    # Llama-2-7B has 6.74e9 parameters, 0.13e9 of them in the input embedding.
    assert 6 * 6.6e9 < flops - 12 * 32 * 4096 * 4096 < 6 * 6.7e9


def test_backend_auto_is_local_without_gpu():
    model = load_config(["model.backend=auto"]).model
    assert resolve_backend(model, on_gpu=False) == Backend.local


@pytest.mark.skipif(transformer_engine_available(), reason="checks the message shown when TE is missing")
def test_backend_te_without_transformer_engine_says_so():
    model = load_config(["model.backend=te"]).model
    with pytest.raises(RuntimeError, match="model.backend=te"):
        resolve_backend(model, on_gpu=True)
