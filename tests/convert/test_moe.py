"""MoE conversion: transformers (Mixtral, Qwen2-MoE) and the reference decoder compute megatron-core's logits
and pick the same greedy tokens; the HF export imports back bit for bit; llama.cpp runs the Mixtral GGUF."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from gptscale.convert import ConversionError
from gptscale.convert.from_hf import import_hf
from gptscale.convert.generate import Decoder, generate
from gptscale.convert.gguf import export_gguf
from gptscale.convert.hf import export_hf
from tests.convert.llama_cpp_run import greedy, load, logits
from tests.convert.models import megatron_logits, perturbed_state, tiny_config, train_state

VARIANTS = {
    "mixtral": [],
    "qwen2_moe": [
        "model.qkv_bias=true",
        "model.moe.shared_expert_size=96",
        "model.moe.shared_expert_gate=true",
        "model.moe.pre_softmax=true",
        "model.moe.layer_freq=2",
    ],
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_logits_equal_gptscale(variant, tmp_path):
    cfg = tiny_config("moe-tiny", *VARIANTS[variant])
    state = perturbed_state(cfg, 400)
    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = megatron_logits(cfg, state, tokens)[..., :400]
    export_hf(cfg, state, None, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(tokens).logits[..., :400]
    decoder = Decoder(cfg.model, state, 400)
    reference = decoder.forward(tokens, decoder.new_cache())
    print(
        f"{variant}: max abs logit diff transformers {(theirs - ours).abs().max().item():.3g}, "
        f"reference decoder {(reference - ours).abs().max().item():.3g}"
    )
    assert (theirs - ours).abs().max().item() <= 1e-5
    assert (reference - ours).abs().max().item() <= 1e-5
    hf.generation_config.eos_token_id = None  # random weights: run the full length on both sides
    prompt = tokens[0, :8].tolist()
    padding = list(range(400, hf.config.vocab_size))  # rows past the tokens in use, which our decoder leaves out
    greedy_theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, suppress_tokens=padding)[
        0, len(prompt) :
    ].tolist()
    assert generate(decoder, prompt, 16) == greedy_theirs


@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_import_gives_back_the_exported_model(variant, tmp_path):
    cfg = tiny_config("moe-tiny", *VARIANTS[variant])
    state = perturbed_state(cfg, 400)
    export_hf(cfg, state, None, tmp_path / "hf")
    imported, tensors, _ = import_hf(tmp_path / "hf")
    for field in (
        "num_experts",
        "top_k",
        "ffn_hidden_size",
        "shared_expert_size",
        "shared_expert_gate",
        "pre_softmax",
        "layer_freq",
    ):
        assert getattr(imported.model.moe, field) == getattr(cfg.model.moe, field), field
    assert imported.model.qkv_bias == cfg.model.qkv_bias
    assert tensors.keys() == state.keys()
    for key, tensor in state.items():  # vocabulary rows are padded on import: compare the rows both have
        rows = min(tensor.shape[0], tensors[key].shape[0])
        assert torch.equal(tensors[key][:rows], tensor[:rows]), key


@pytest.mark.parametrize(
    "override, field",
    [("model.moe.expert_bias=true", "model.moe.expert_bias"), ("model.moe.pre_softmax=true", "model.moe.pre_softmax")],
)
def test_unexpressible_moe_refused_by_field(override, field, tmp_path):
    cfg = tiny_config("moe-tiny", override)
    with pytest.raises(ConversionError, match=field):
        export_hf(cfg, {}, None, tmp_path / "hf")


def test_mixtral_gguf_runs_in_llama_cpp(tokenizer_file, tmp_path):
    """llama.cpp computes our logits from the Mixtral-style GGUF and decodes the same greedy text."""
    cfg = tiny_config("moe-tiny")
    state = train_state(cfg, tokenizer_file, steps=100)  # briefly trained: greedy continuations are not noise
    summary = export_gguf(cfg, state, tokenizer_file, tmp_path / "moe.gguf")
    assert summary.architecture == "llama"
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    decoder = Decoder(cfg.model, state, tokenizer.get_vocab_size())
    llm = load(tmp_path / "moe.gguf")
    ids = tokenizer.encode("def parse_args(self, args=None, namespace=None):\n").ids
    ours = decoder.forward(torch.tensor([ids]), decoder.new_cache())[0].numpy()
    diff = np.abs(logits(llm, ids) - ours).max()
    print(f"llama.cpp Mixtral GGUF: max abs logit diff {diff:.3g}")
    assert diff <= 1e-3
    assert generate(decoder, ids, 16) == greedy(llm, ids, 16)


def test_gguf_refuses_a_shared_expert_by_field(tmp_path):
    with pytest.raises(ConversionError, match="model.moe.shared_expert_size"):
        export_gguf(
            tiny_config("moe-tiny", *VARIANTS["qwen2_moe"]), {}, tmp_path / "tokenizer.json", tmp_path / "m.gguf"
        )
