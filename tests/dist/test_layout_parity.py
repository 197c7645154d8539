"""Layout parity: the same seed, data and fp32 give the same first five losses under every layout.

Each launch runs many layouts one after another (imports dominate the cost of tiny runs).
"""

import pytest

from tests.helpers import run_jobs

MODELS = ["gpt2-tiny", "llama-tiny"]
COMMON = [
    "train.steps=5", "train.seq_len=32", "train.eval_interval=0", "train.log_interval=5",
    "parallel.global_batch=8", "optim.warmup_steps=2", "optim.lr=1e-3",
    "data.embedded_max_bytes=200000", "checkpoint.save_final=false",
]
TWO_RANKS = {
    "tp2": ["parallel.tp=2"],
    "tp2-sp": ["parallel.tp=2", "parallel.sp=true"],
    "pp2": ["parallel.pp=2"],
    "pp2-vpp2": ["parallel.pp=2", "parallel.vpp=2"],
    "dp2-zero0": ["parallel.zero=0"],
    "dp2-zero1": ["parallel.zero=1"],
    "dp2-zero2": ["parallel.zero=2"],
    "dp2-zero3": ["parallel.zero=3"],
}
FOUR_RANKS = {
    "tp2-pp2": ["parallel.tp=2", "parallel.pp=2"],
    "tp2-dp2-zero1": ["parallel.tp=2", "parallel.zero=1"],
}
RTOL = 1e-4


def jobs(layouts: dict, tmp_path, micro_batch: int = 2):
    return [[f"model={model}", f"run_dir={tmp_path}/{model}-{name}", f"parallel.micro_batch={micro_batch}",
             *COMMON, *overrides]
            for model in MODELS for name, overrides in layouts.items()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One rank: micro-batch 2 (4 accumulation steps), micro-batch 8 and micro-batch 1 (8 steps)."""
    tmp_path = tmp_path_factory.mktemp("one-rank")
    layouts = {"mb2": [], "mb8": ["parallel.micro_batch=8"], "mb1": ["parallel.micro_batch=1"]}
    results = run_jobs(1, jobs(layouts, tmp_path), tmp_path)
    return {(model, name): results[i * len(layouts) + j]
            for i, model in enumerate(MODELS) for j, name in enumerate(layouts)}


def assert_close(history, expected, what):
    """Losses and gradient norms (before clipping) of every step agree with the reference."""
    for metric in ("loss", "grad_norm"):
        got_all, want_all = history[metric], expected[metric]
        assert len(got_all) == len(want_all) == 5, what
        for step, (got, want) in enumerate(zip(got_all, want_all), start=1):
            assert abs(got - want) <= RTOL * abs(want), f"{what}: step {step} {metric} {got} vs one rank {want}"


def test_losses_fall_and_differ_between_models(reference):
    """The comparison means something: training moves the loss and the two architectures differ."""
    for model in MODELS:
        losses = reference[(model, "mb2")]["loss"]
        assert losses[-1] < losses[0] - 0.1, losses
    assert reference[("gpt2-tiny", "mb2")]["loss"][0] != reference[("llama-tiny", "mb2")]["loss"][0]


def test_gradient_accumulation_matches_one_big_micro_batch(reference):
    for model in MODELS:
        assert_close(reference[(model, "mb1")], reference[(model, "mb8")], f"{model} micro-batch 1 x 8")
        assert_close(reference[(model, "mb2")], reference[(model, "mb8")], f"{model} micro-batch 2 x 4")


def test_two_rank_layouts_match_one_rank(reference, tmp_path):
    results = run_jobs(2, jobs(TWO_RANKS, tmp_path), tmp_path)
    for i, model in enumerate(MODELS):
        for j, name in enumerate(TWO_RANKS):
            assert_close(results[i * len(TWO_RANKS) + j], reference[(model, "mb2")], f"{model} {name}")


def test_four_rank_layouts_match_one_rank(reference, tmp_path):
    results = run_jobs(4, jobs(FOUR_RANKS, tmp_path), tmp_path)
    for i, model in enumerate(MODELS):
        for j, name in enumerate(FOUR_RANKS):
            assert_close(results[i * len(FOUR_RANKS) + j], reference[(model, "mb2")], f"{model} {name}")
