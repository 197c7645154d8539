"""Checkpoints bring a run back exactly, at its own layout or another, and a NaN step changes nothing.

- 12 steps straight vs 6 steps, save, resume, 6 more: steps 7-12 bit for bit in fp32, for one rank and for
  TP=2, PP=2, CP=2, DP=2 with ZeRO-1 and ZeRO-3 (and bf16 through DeepSpeed's bf16 optimizers).
- Saved at TP=2, resumed at PP=2 and at DP=2; saved at CP=2, resumed at CP=1 (DP=2) and at TP=2: the next
  steps' losses equal those of the layout that saved within 1e-4.
- A step planted with a NaN loss is skipped: its checkpoint equals the previous step's (weights, Adam's
  moments and step), and the loss guard counts it.
- Weights written by ``read.save_model_state`` (conversion) resume at any layout.

Each launch runs many jobs one after another (imports dominate the cost of tiny runs).
"""

import math

import pytest
import torch

from tests.checkpoint_helpers import all_tensors, assert_resumed_exactly, rank_state, step_dir
from tests.helpers import run_jobs

COMMON = [
    "train.seq_len=32",
    "train.eval_interval=0",
    "train.log_interval=6",
    "parallel.global_batch=8",
    "parallel.micro_batch=2",
    "optim.warmup_steps=2",
    "optim.decay_steps=10",
    "optim.lr=1e-3",
    "data.embedded_max_bytes=200000",
]
RTOL = 1e-4


def job(model, run_dir, steps, *overrides):
    return [f"model={model}", f"run_dir={run_dir}", f"train.steps={steps}", *COMMON, *overrides]


def resume_jobs(model, run_dir, overrides, steps=12):
    """Straight, first half with a final save, second half resumed (auto) in the same run directory."""
    return [
        job(model, f"{run_dir}-straight", steps, "checkpoint.resume=none", "checkpoint.save_final=false", *overrides),
        job(model, run_dir, steps // 2, "checkpoint.resume=none", *overrides),
        job(model, run_dir, steps, *overrides),
    ]


def nan_jobs(model, run_dir, overrides):
    """Three steps with a NaN planted in the third, and two clean steps: both save at the end."""
    return [
        job(model, f"{run_dir}-nan", 3, "checkpoint.resume=none", "test.nan_steps=[3]", *overrides),
        job(model, f"{run_dir}-clean", 2, "checkpoint.resume=none", *overrides),
    ]


ONE_RANK = {"llama": ("llama-tiny", []), "gpt2-bf16": ("gpt2-tiny", ["train.precision=bf16"])}
TWO_RANKS = {
    "tp2": ("llama-tiny", ["parallel.tp=2"]),
    "pp2": ("gpt2-tiny", ["parallel.pp=2"]),
    "cp2": ("llama-tiny", ["parallel.cp=2"]),
    "dp2-zero1": ("llama-tiny", ["parallel.zero=1"]),
    "dp2-zero3": ("gpt2-tiny", ["parallel.zero=3"]),
    "dp2-zero1-bf16": ("gpt2-tiny", ["parallel.zero=1", "train.precision=bf16"]),
}
SHORT = {"gpt2-bf16": 6, "dp2-zero1-bf16": 6}  # extra precisions: 3 + 3 steps are enough
RESHARD = {
    "tp2-to-pp2": ("tp2", ["parallel.pp=2"]),
    "tp2-to-dp2": ("tp2", ["parallel.zero=1"]),
    "cp2-to-dp2": ("cp2", ["parallel.zero=1"]),
    "cp2-to-tp2": ("cp2", ["parallel.tp=2"]),
}
NAN_TWO_RANKS = {"dp2-zero1": ("gpt2-tiny", ["parallel.zero=1"]), "dp2-zero3": ("gpt2-tiny", ["parallel.zero=3"])}


def split(results, names, per_name):
    return {name: results[i * per_name : (i + 1) * per_name] for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one-rank")
    jobs = [
        j
        for name, (model, extra) in ONE_RANK.items()
        for j in resume_jobs(model, tmp / name, extra, SHORT.get(name, 12))
    ]
    jobs += nan_jobs("gpt2-tiny", tmp / "gpt2", [])
    results = run_jobs(1, jobs, tmp)
    return tmp, split(results[: 3 * len(ONE_RANK)], ONE_RANK, 3), results[3 * len(ONE_RANK) :]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, one_rank):
    from gptscale.checkpoint.read import load_model_state, save_model_state

    tmp = tmp_path_factory.mktemp("two-ranks")
    cfg, tensors, _ = load_model_state(step_dir(one_rank[0] / "llama", 6))
    imported = save_model_state(tmp / "imported", cfg, tensors)
    jobs = [
        j
        for name, (model, extra) in TWO_RANKS.items()
        for j in resume_jobs(model, tmp / name, extra, SHORT.get(name, 12))
    ]
    jobs += [
        job("llama-tiny", tmp / f"reshard-{name}", 9, f"checkpoint.resume={step_dir(tmp / saved, 6)}", *extra)
        for name, (saved, extra) in RESHARD.items()
    ]
    jobs += [j for name, (model, extra) in NAN_TWO_RANKS.items() for j in nan_jobs(model, tmp / name, extra)]
    jobs += [
        job(
            "llama-tiny",
            tmp / f"imported-{layout}",
            1,
            f"checkpoint.resume={imported}",
            "checkpoint.save_final=false",
            f"parallel.{layout}=2",
        )
        for layout in ("tp", "pp")
    ]
    jobs += [job("llama-tiny", tmp / "fresh", 1, "checkpoint.resume=none", "checkpoint.save_final=false")]
    results = run_jobs(2, jobs, tmp)
    n = 3 * len(TWO_RANKS)
    return {
        "dir": tmp,
        "resume": split(results[:n], TWO_RANKS, 3),
        "reshard": dict(zip(RESHARD, results[n : n + len(RESHARD)])),
        "nan": split(results[n + len(RESHARD) : n + len(RESHARD) + 2 * len(NAN_TWO_RANKS)], NAN_TWO_RANKS, 2),
        "imported": results[-3:-1],
        "fresh": results[-1],
    }


def assert_nan_step_changed_nothing(nan_run, clean_run, nan_dir, clean_dir, what):
    assert math.isnan(nan_run["loss"][2]) and nan_run["loss"][:2] == clean_run["loss"], what
    after_nan, before = all_tensors(step_dir(nan_dir, 3)), all_tensors(step_dir(clean_dir, 2))
    assert after_nan.keys() == before.keys() and any(k.startswith("optimizer.exp_avg_sq.") for k in before)
    for key in before:
        assert torch.equal(after_nan[key], before[key]), f"{what}: {key} changed in the skipped step"
    guard = rank_state(step_dir(nan_dir, 3))["components"]["guard"]
    assert guard == {"recent": [3], "skipped": 1}, what


@pytest.mark.parametrize("name", list(ONE_RANK))
def test_one_rank_resumes_bit_for_bit(one_rank, name):
    assert_resumed_exactly(*one_rank[1][name], f"one rank {name}")


@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_two_rank_layouts_resume_bit_for_bit(two_ranks, name):
    assert_resumed_exactly(*two_ranks["resume"][name], name)


@pytest.mark.parametrize("name", list(RESHARD))
def test_checkpoint_resumes_at_other_layouts(two_ranks, name):
    """Model and optimizer state reshard: steps 7-9 after the switch follow the saving layout's own steps 7-9."""
    saved = RESHARD[name][0]
    expected = two_ranks["resume"][saved][0]["loss"][6:9]
    got = two_ranks["reshard"][name]["loss"]
    assert len(got) == 3
    for step, (g, e) in enumerate(zip(got, expected), start=7):
        assert abs(g - e) <= RTOL * abs(e), f"{name}: step {step} loss {g} vs {saved}'s {e}"


def test_nan_step_is_skipped_and_counted_one_rank(one_rank):
    tmp, _, (nan_run, clean_run) = one_rank
    assert_nan_step_changed_nothing(nan_run, clean_run, tmp / "gpt2-nan", tmp / "gpt2-clean", "one rank fp32")


@pytest.mark.parametrize("name", list(NAN_TWO_RANKS))
def test_nan_step_is_skipped_and_counted_under_zero(two_ranks, name):
    nan_run, clean_run = two_ranks["nan"][name]
    tmp = two_ranks["dir"]
    assert_nan_step_changed_nothing(nan_run, clean_run, tmp / f"{name}-nan", tmp / f"{name}-clean", name)


def test_imported_weights_resume_at_any_layout(two_ranks):
    """save_model_state's checkpoint (weights only, step 0) starts training at TP=2 and PP=2 alike, from the
    trained weights (its first loss is far below a fresh model's)."""
    tp, pp = (run["loss"][0] for run in two_ranks["imported"])
    assert abs(tp - pp) <= RTOL * abs(tp), (tp, pp)
    assert tp < two_ranks["fresh"]["loss"][0] - 0.3, (tp, two_ranks["fresh"]["loss"][0])


def test_read_returns_the_same_weights_whatever_layout_saved_them(one_rank, two_ranks):
    from gptscale.checkpoint.read import load_model_state

    _, one, _ = load_model_state(step_dir(one_rank[0] / "llama", 12))
    for name in ("tp2", "dp2-zero1"):
        cfg, other, tokenizer = load_model_state(step_dir(two_ranks["dir"] / name, 12))
        assert cfg.model.name == "llama-tiny" and tokenizer.name == "tokenizer.json"  # the data's tokenizer
        assert one.keys() == other.keys()
        for key in one:
            assert one[key].shape == other[key].shape, key
            assert torch.allclose(one[key], other[key], atol=1e-4), f"{name}: {key}"
    assert one["decoder.layers.mlp.linear_fc1.weight"].shape == (4, 2 * 176, 64)  # stacked layers, [gate; up]
