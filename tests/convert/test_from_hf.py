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


def hf_model(arch: str, vocab: int, rope: dict | None = None):
    """A transformers model with random weights everywhere (norms and biases too); ``rope``: Llama's
    rope_parameters (default: unscaled, base 20000)."""
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_positions=128,
                n_embd=64,
                n_layer=2,
                n_head=4,
                activation_function="gelu",
                eos_token_id=0,
                bos_token_id=0,
            )
        )
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                rms_norm_eps=1e-5,
                rope_parameters=rope or {"rope_type": "default", "rope_theta": 20000.0},
            )
        )
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
    before, after = (
        load_file(tmp_path / "source" / "model.safetensors"),
        load_file(tmp_path / "back" / "model.safetensors"),
    )
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "back").config.vocab_size == 400


SCALED_ROPE = {
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 16.0,
        "mscale": 0.8,
        "mscale_all_dim": 0.5,
    },
}


@pytest.mark.parametrize("scaling", SCALED_ROPE)
def test_rope_scaling_is_imported_and_exported_back(scaling, tmp_path):
    source = hf_model("llama", 400, SCALED_ROPE[scaling])
    source.save_pretrained(tmp_path / "source")
    cfg, state, _ = import_hf(tmp_path / "source")
    assert (
        cfg.model.rope_scaling.type.value == scaling and cfg.model.rope_scaling.original_max_position_embeddings == 32
    )
    tokens = torch.randint(0, 400, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = source(tokens).logits
    assert (megatron_logits(cfg, state, tokens)[..., :400] - expected).abs().max() <= 1e-4

    export_hf(cfg, state, None, tmp_path / "back")
    back = json.loads((tmp_path / "back" / "config.json").read_text())["rope_parameters"]
    assert {key: back[key] for key in SCALED_ROPE[scaling]} == SCALED_ROPE[scaling]
    assert import_hf(tmp_path / "back")[0].model.rope_scaling == cfg.model.rope_scaling


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    )
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
