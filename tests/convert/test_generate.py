"""gptscale-generate: the cached decoder computes megatron-core's logits; sampling options and the command
(on checkpoints written by ``save_model_state``)."""

import pytest
import torch
from tokenizers import Tokenizer

from gptscale.checkpoint.read import save_model_state
from gptscale.convert.cli import generate_main
from gptscale.convert.generate import Decoder, Sampling, generate, next_token
from tests.convert.models import EOD, megatron_logits, perturbed_state, scaled_config, tiny_config


@pytest.mark.parametrize("model", ["gpt2-tiny", "llama-tiny", "llama3", "yarn"])
def test_cached_decoding_equals_megatron_core(model):
    """Also with RoPE scaling (llama3, yarn: llama-tiny from 32 tokens to 128), past the original context."""
    cfg = scaled_config(model) if model in ("llama3", "yarn") else tiny_config(model)
    state = perturbed_state(cfg, 400)
    tokens = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(0))
    expected = megatron_logits(cfg, state, tokens)[..., :400]
    decoder = Decoder(cfg.model, state, 400)
    cache = decoder.new_cache()
    pieces = [decoder.forward(tokens[:, :17], cache)] + [
        decoder.forward(tokens[:, i : i + 1], cache) for i in range(17, 40)
    ]
    assert (torch.cat(pieces, dim=1) - expected).abs().max() <= 1e-4


def test_sampling_options():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    assert next_token(logits, Sampling(), None) == 1
    assert next_token(logits, Sampling(temperature=5.0, top_k=1), torch.Generator().manual_seed(0)) == 1
    assert next_token(logits, Sampling(temperature=1.0, top_p=0.01), torch.Generator().manual_seed(0)) == 1
    top2 = {
        next_token(logits, Sampling(temperature=10.0, top_k=2), torch.Generator().manual_seed(s)) for s in range(50)
    }
    assert top2 == {1, 2}
    nucleus = {
        next_token(logits, Sampling(temperature=1.0, top_p=0.8), torch.Generator().manual_seed(s)) for s in range(50)
    }
    assert nucleus == {1, 2}  # p(1) + p(2) = 0.84 reaches 0.8 only with both


def test_seeded_sampling_repeats(trained, tokenizer_file):
    cfg, state = trained("llama-tiny")
    decoder = Decoder(cfg.model, state, 400)
    sampling = Sampling(temperature=1.0, top_k=50, top_p=0.95)
    first, again, other = (generate(decoder, [5, 6, 7], 20, sampling, seed) for seed in (1, 1, 2))
    assert first == again and first != other


def test_command_prints_the_greedy_continuation(trained, tokenizer_file, tmp_path, capsys):
    cfg, state = trained("gpt2-tiny")
    path = save_model_state(tmp_path / "ckpt", cfg, state, tokenizer_file)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    prompt = "def parse_args(self, args=None"
    expected = generate(
        Decoder(cfg.model, state, 400), tokenizer.encode(prompt).ids, 12, stop=tokenizer.token_to_id(EOD)
    )

    assert (
        generate_main(["--checkpoint", str(path), "--prompt", prompt, "--max-new-tokens", "12", "--greedy", "--ids"])
        == 0
    )
    text, ids = capsys.readouterr().out.rsplit("ids: ", 1)
    assert [int(i) for i in ids.split()] == expected
    assert text.rstrip("\n") == tokenizer.decode(expected)

    sampled = [
        "--checkpoint",
        str(path),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ]
    outputs = []
    for _ in range(2):
        assert generate_main(sampled) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_command_errors(trained, tokenizer_file, tmp_path, capsys):
    cfg, state = trained("gpt2-tiny")
    path = save_model_state(tmp_path / "ckpt", cfg, state, tokenizer_file)
    assert generate_main(["--checkpoint", str(path), "--prompt", "x", "--greedy", "--temperature", "1"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert generate_main(["--checkpoint", str(path), "--prompt", "x", "--max-new-tokens", "5000"]) == 2
    assert "learned positions" in capsys.readouterr().err
    assert generate_main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "missing: no such checkpoint directory" in capsys.readouterr().err
    untokenized = save_model_state(tmp_path / "untokenized", cfg, state)
    assert generate_main(["--checkpoint", str(untokenized), "--prompt", "x"]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err
