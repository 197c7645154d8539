"""Import from Hugging Face: the same function, the same tensors back, and clear refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gptscale.convert import ConversionError
from gptscale.convert.from_hf import import_hf
from gptscale.convert.hf import export_hf
from tests.convert.models import megatron_logits


def hf_model(arch: str, vocab: int):
    """A transformers model with random weights everywhere (norms and biases too)."""
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                           activation_function="gelu", eos_token_id=0, bos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256, rms_norm_eps=1e-5,
                                             rope_parameters={"rope_type": "default", "rope_theta": 20000.0}))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_round_trip_is_bit_identical_and_computes_the_same(arch, tokenizer_file, tmp_path):
    source = hf_model(arch, 400)
    source.save_pretrained(tmp_path / "source")
    (tmp_path / "source" / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())

    cfg, state, tokenizer = import_hf(tmp_path / "source", ["parallel.tp=2"])
    assert cfg.parallel.tp == 2 and tokenizer is not None
    assert state["embedding.word_embeddings.weight"].shape[0] == 512  # padded to model.vocab_multiple

    tokens = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = source(tokens).logits
    assert (megatron_logits(cfg, state, tokens)[..., :400] - expected).abs().max() <= 1e-4

    export_hf(cfg, state, tokenizer, tmp_path / "back")
    before, after = load_file(tmp_path / "source" / "model.safetensors"), load_file(tmp_path / "back" /
                                                                                      "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "back").config.vocab_size == 400


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"],
                                                      "model_type": "mistral"}))
    with pytest.raises(ConversionError, match="MistralForCausalLM.*not supported.*GPT2LMHeadModel"):
        import_hf(tmp_path)


def test_not_a_model_directory_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        import_hf(tmp_path)


def test_unsupported_features_are_refused(tmp_path):
    model = hf_model("llama", 400)
    model.config.attention_bias = True
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="attention_bias"):
        import_hf(tmp_path)


def test_layout_that_does_not_fit_is_refused(tmp_path):
    hf_model("llama", 400).save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="num_query_groups=2 is not divisible by parallel.tp=4"):
        import_hf(tmp_path, ["parallel.tp=4"])
