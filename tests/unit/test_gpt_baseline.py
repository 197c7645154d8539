"""tools/gpt_baseline.py is only a fair yardstick if it builds the shapes gptscale's FLOP count assumes: its
matmul weights must be exactly ``matmul_parameters`` of the same preset, or its MFU is off by the difference."""

import importlib.util

import pytest
import torch
from torch import nn

from gptscale.config import load_config
from gptscale.config.validate import padded_vocab_size
from gptscale.model.flops import matmul_parameters
from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("gpt_baseline", REPO / "tools/gpt_baseline.py")
gpt_baseline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpt_baseline)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "gpt2-350m", "gpt2-774m", "llama-1b"])
def test_matmul_weights_are_gptscales(preset):
    model = load_config([f"model={preset}"]).model
    vocab = padded_vocab_size(model.vocab_size, model.vocab_multiple)
    with torch.device("meta"):
        gpt = gpt_baseline.GPT(model, vocab, 1024)
    weights = sum(m.weight.numel() for m in gpt.modules() if isinstance(m, nn.Linear))
    assert weights == matmul_parameters(model, vocab)
    assert (gpt.head.weight is gpt.embed.weight) == model.tie_embeddings


def test_learns_a_repeated_batch_on_cpu():
    """The training step as the script runs it (bf16 autocast, AdamW) fits one batch of a tiny Llama."""
    model = load_config(["model=llama-tiny"]).model
    torch.manual_seed(0)
    gpt = gpt_baseline.GPT(model, 256, 32)
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    tokens = torch.randint(0, 256, (2, 33))
    losses = []
    for _ in range(20):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = gpt(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(5.55, abs=0.3)  # ln 256 at initialisation
    assert losses[-1] < 0.5 * losses[0]
