"""Acceptance on real checkpoints: gpt2-tiny and llama-tiny trained at TP=2 x PP=2 (4 ranks) and at DP=2
ZeRO-3 convert exactly, and a Hugging Face model imported for TP=2 resumes there and comes back bit for bit.

The runs train on the embedded corpus, whose byte-level BPE tokenizer.json every checkpoint carries, so the
exports hold the tokenizer gptscale's data pipeline trains and llama.cpp must tokenize as it does.
"""

import json
import shlex

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from gptscale.checkpoint.read import load_model_state
from gptscale.convert.cli import convert_main, generate_main
from gptscale.convert.generate import Decoder, generate
from tests.checkpoint_helpers import step_dir
from tests.convert.llama_cpp_run import greedy, load, load_vocab, logits
from tests.convert.models import megatron_logits
from tests.helpers import run_jobs

STEPS = 8
COMMON = [
    "train.seq_len=32",
    "train.eval_interval=0",
    "train.log_interval=2",
    "parallel.global_batch=8",
    "parallel.micro_batch=2",
    "optim.warmup_steps=1",
    "data.embedded_max_bytes=200000",
    "data.embedded_vocab_size=300",
    "checkpoint.async_save=false",
]
LAYOUTS = {"tp2-pp2": (4, ["parallel.tp=2", "parallel.pp=2"]), "dp2-zero3": (2, ["parallel.zero=3"])}
MODELS = ["gpt2-tiny", "llama-tiny"]
PROMPT = "def main(argv):\n"
SAMPLES = [
    "import os\nclass Foo(Bar):\n    pass",
    "  \n\n\tx = {'a': 1}  # ok",
    "Hello  world!  123 éà ✓",
    "<|endoftext|>next document",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run directory and per-step losses of each (model, layout), trained with a final save."""
    tmp = tmp_path_factory.mktemp("runs")
    found = {}
    for layout, (ranks, overrides) in LAYOUTS.items():
        jobs = [
            [
                f"model={model}",
                f"run_dir={tmp}/{model}-{layout}",
                f"train.steps={STEPS}",
                "optim.lr=3e-3",
                *COMMON,
                *overrides,
            ]
            for model in MODELS
        ]
        results = run_jobs(ranks, jobs, tmp)
        found.update(
            {(model, layout): (tmp / f"{model}-{layout}", result["loss"]) for model, result in zip(MODELS, results)}
        )
    for run_dir, _ in found.values():  # issue 4's layout: RUN_DIR/checkpoints/step_NNNNNN, latest names it
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == step_dir(run_dir, STEPS).name
    return found


def converted(*args: str) -> None:
    assert convert_main(list(args)) == 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model", MODELS)
def test_hf_export_and_generation_equal_gptscale(runs, model, layout, tmp_path, capsys):
    path = step_dir(runs[model, layout][0], STEPS)
    cfg, state, tokenizer_file = load_model_state(path)
    converted("--checkpoint", str(path), "--to", "hf", "--out", str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    vocab = hf.config.vocab_size
    assert vocab == Tokenizer.from_file(str(tokenizer_file)).get_vocab_size() == 300
    tokens = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - megatron_logits(cfg, state, tokens)[..., :vocab]).abs().max() <= 1e-4

    ids = Tokenizer.from_file(str(tokenizer_file)).encode(PROMPT).ids
    capsys.readouterr()
    assert (
        generate_main(["--checkpoint", str(path), "--prompt", PROMPT, "--max-new-tokens", "32", "--greedy", "--ids"])
        == 0
    )
    ours = [int(i) for i in capsys.readouterr().out.rsplit("ids: ", 1)[1].split()]
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
    assert ours == theirs and len(ours) == 32


@pytest.mark.parametrize("model", MODELS)
def test_gguf_export_matches(runs, model, tmp_path):
    """From the run directory (the reader takes its newest complete checkpoint), trained at TP=2 x PP=2."""
    run_dir = runs[model, "tp2-pp2"][0]
    cfg, state, tokenizer_file = load_model_state(run_dir)
    converted("--checkpoint", str(run_dir), "--to", "gguf", "--out", str(tmp_path / "m.gguf"))
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    vocab = load_vocab(tmp_path / "m.gguf")
    for text in SAMPLES:  # tokenizers encodes special tokens written in the text: llama.cpp's special=True
        assert vocab.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text).ids, text

    ids = tokenizer.encode(PROMPT).ids
    llm = load(tmp_path / "m.gguf", n_ctx=128)
    decoder = Decoder(cfg.model, state, tokenizer.get_vocab_size())
    ours = decoder.forward(torch.tensor([ids]), decoder.new_cache())[0].numpy()
    assert np.abs(logits(llm, ids) - ours).max() <= 1e-3
    assert generate(decoder, ids, 16) == greedy(llm, ids, 16)


def test_hf_round_trip_through_a_tp2_run_is_bit_identical(runs, tmp_path, capsys):
    """HF -> gptscale checkpoint for TP=2 -> a TP=2 run resumes it and saves after one step at learning rate
    0 (weights loaded into TP shards and gathered back) -> HF: the same tensors, bit for bit."""
    jobs, exported = [], {}
    for model in MODELS:
        hf, imported = tmp_path / f"{model}-hf", tmp_path / f"{model}-imported"
        converted("--checkpoint", str(step_dir(runs[model, "dp2-zero3"][0], STEPS)), "--to", "hf", "--out", str(hf))
        capsys.readouterr()
        converted("--from-hf", str(hf), "--out", str(imported), "parallel.tp=2")
        command = shlex.split(capsys.readouterr().out.rsplit("\n  ", 1)[1])
        assert command[0] == "gptscale-train" and command[-1] == "parallel.tp=2"
        assert load_model_state(imported)[0].parallel.tp == 2
        jobs.append(
            [
                *command[1:],
                f"run_dir={tmp_path}/{model}-resumed",
                "train.steps=1",
                "optim.lr=0",
                "optim.min_lr=0",
                *COMMON,
            ]
        )
        exported[model] = hf
    resumed = run_jobs(2, jobs, tmp_path)

    for model, result in zip(MODELS, resumed):
        checkpoint = step_dir(tmp_path / f"{model}-resumed", 1)
        assert json.loads((checkpoint / "checkpoint.json").read_text())["layout"]["tp"] == 2
        # The same first batch as the original run (the data order does not depend on the layout), now
        # seen by the trained weights rather than a fresh initialisation.
        assert result["loss"][0] < runs[model, "dp2-zero3"][1][0] - 0.3, (model, result["loss"])
        converted("--checkpoint", str(checkpoint), "--to", "hf", "--out", str(tmp_path / f"{model}-back"))
        before = load_file(exported[model] / "model.safetensors")
        after = load_file(tmp_path / f"{model}-back" / "model.safetensors")
        assert before.keys() == after.keys(), model
        for name in before:
            assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), (model, name)
