"""MoE layout parity and resume: moe-tiny (fp32, dropless, aux and z losses weighted so they matter) trains
the same first five steps at 1 rank and under expert parallelism, alone and with ZeRO, data, tensor, context
and pipeline parallelism and gradient accumulation. Losses, router losses and gradient norms are compared.

With aux-loss-free balancing on (the router's expert bias, a buffer the optimizer does not own), a run split
by a checkpoint at EP=2 repeats the straight run bit for bit, and the EP=2 checkpoint resumed at one rank
follows EP=2's own steps within 1e-4, and so does the same checkpoint resumed at TP=2xEP=2.
"""

import json

import pytest

from tests.checkpoint_helpers import all_tensors, assert_resumed_exactly, step_dir
from tests.helpers import run_jobs

COMMON = [
    "model=moe-tiny",
    "train.steps=5",
    "train.seq_len=32",
    "train.log_interval=5",
    "parallel.global_batch=8",
    "optim.warmup_steps=2",
    "optim.lr=1e-3",
    "data.embedded_max_bytes=200000",
    "data.embedded_vocab_size=300",
    "checkpoint.save_final=false",
    "model.moe.aux_loss_coeff=1.0",
    "model.moe.z_loss_coeff=0.1",
]
REFERENCE = {"mb2": ["parallel.micro_batch=2"], "mb1": ["parallel.micro_batch=1"]}
TWO_RANKS = {
    "ep2": ["parallel.ep=2", "parallel.micro_batch=2"],
    "ep2-allgather": ["parallel.ep=2", "parallel.micro_batch=2", "model.moe.dispatcher=allgather"],
    "ep2-zero1": ["parallel.ep=2", "parallel.micro_batch=2", "parallel.zero=1"],
    "ep2-zero2": ["parallel.ep=2", "parallel.micro_batch=2", "parallel.zero=2"],
    "ep2-mb1": ["parallel.ep=2", "parallel.micro_batch=1"],  # four accumulation steps per rank
}
FOUR_RANKS = {
    "ep2-dp2-zero1": ["parallel.ep=2", "parallel.micro_batch=2", "parallel.zero=1"],
    "tp2-ep2": ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.micro_batch=2"],
    "pp2-ep2": ["parallel.pp=2", "parallel.ep=2", "parallel.micro_batch=2"],
    "pp2-ep2-mb1": ["parallel.pp=2", "parallel.ep=2", "parallel.micro_batch=1"],
    "cp2-ep2": ["parallel.cp=2", "parallel.ep=2", "parallel.micro_batch=2"],  # router losses split over cp ranks
}
RTOL = 1e-4

BALANCED = [
    "train.steps=12",
    "checkpoint.save_final=true",
    "parallel.micro_batch=2",
    "optim.decay_steps=12",
    "model.moe.expert_bias=true",
    "model.moe.expert_bias_update_rate=1e-2",
]


def jobs(layouts, tmp_path):
    return [[f"run_dir={tmp_path}/{name}", *COMMON, *overrides] for name, overrides in layouts.items()]


def resume_jobs(run_dir):
    """EP=2: 12 steps straight; 6 steps saved; the same run directory resumed (auto) to step 12."""
    return [
        [
            f"run_dir={run_dir}-straight",
            *COMMON,
            *BALANCED,
            "parallel.ep=2",
            "checkpoint.resume=none",
            "checkpoint.save_final=false",
        ],
        [f"run_dir={run_dir}", *COMMON, *BALANCED, "parallel.ep=2", "train.steps=6", "checkpoint.resume=none"],
        [f"run_dir={run_dir}", *COMMON, *BALANCED, "parallel.ep=2"],
    ]


def reference_for(name: str) -> str:
    return "mb1" if name.endswith("mb1") else "mb2"


def assert_close(history, expected, what, metrics=("loss", "aux_loss", "grad_norm")):
    for metric in metrics:
        got_all, want_all = history[metric], expected[metric]
        assert len(got_all) == len(want_all), what
        for step, (got, want) in enumerate(zip(got_all, want_all), start=1):
            assert abs(got - want) <= RTOL * abs(want), f"{what}: step {step} {metric} {got} vs {want}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe")
    two = run_jobs(2, jobs(TWO_RANKS, tmp / "two") + resume_jobs(tmp / "ep2-balanced"), tmp)
    ep2_checkpoint = step_dir(tmp / "ep2-balanced", 6)
    one_jobs = jobs(REFERENCE, tmp / "one") + [
        [
            f"run_dir={tmp}/one-resumed",
            *COMMON,
            *BALANCED,
            f"checkpoint.resume={ep2_checkpoint}",
            "checkpoint.save_final=false",
        ]
    ]
    one = run_jobs(1, one_jobs, tmp)
    four = run_jobs(
        4,
        jobs(FOUR_RANKS, tmp / "four")
        + [
            [
                f"run_dir={tmp}/tp2-ep2-resumed",
                *COMMON,
                *BALANCED,
                "parallel.tp=2",
                "parallel.sp=true",
                "parallel.ep=2",
                f"checkpoint.resume={ep2_checkpoint}",
                "checkpoint.save_final=false",
            ]
        ],
        tmp,
    )
    return {
        "dir": tmp,
        "reference": dict(zip(REFERENCE, one)),
        "one-resumed": one[len(REFERENCE)],
        "tp2-ep2-resumed": four[len(FOUR_RANKS)],
        "layouts": {**dict(zip(TWO_RANKS, two)), **dict(zip(FOUR_RANKS, four[: len(FOUR_RANKS)]))},
        "ep2-resume": two[len(TWO_RANKS) :],
    }


def test_router_losses_matter_in_the_reference(runs):
    for name, history in runs["reference"].items():
        assert len(history["loss"]) == 5, name
        assert min(history["aux_loss"]) > 0.1, history
        assert history["loss"][-1] < history["loss"][0], history


def logged_router_metrics(run_dir):
    return [line for line in map(json.loads, open(run_dir / "metrics.jsonl")) if "moe/tokens_per_expert" in line]


def test_router_losses_and_expert_load_are_logged(runs):
    """At the log interval (step 5): router losses, and per layer the tokens each expert got over steps 1-5
    (every token routed to top_k experts), the same at EP=2 as at one rank."""
    one, ep2 = (logged_router_metrics(runs["dir"] / where) for where in ("one/mb2", "two/ep2"))
    assert [line["step"] for line in one] == [line["step"] for line in ep2] == [5]
    routed = 5 * 8 * 32 * 2  # steps x sequences x tokens x top_k
    counts = one[0]["moe/tokens_per_expert"]
    assert len(counts) == 4 and all(sum(layer) == routed for layer in counts), counts
    assert ep2[0]["moe/tokens_per_expert"] == counts
    assert one[0]["moe/load_balancing_loss"] > 0 and one[0]["moe/z_loss"] > 0
    for layer in range(4):
        assert one[0][f"moe/layer{layer:02d}/min_load"] <= 1 <= one[0][f"moe/layer{layer:02d}/max_load"]
    assert one[0]["moe/max_load"] == max(one[0][f"moe/layer{layer:02d}/max_load"] for layer in range(4))


@pytest.mark.parametrize("name", [*TWO_RANKS, *FOUR_RANKS])
def test_expert_parallel_layout_matches_one_rank(runs, name):
    assert_close(runs["layouts"][name], runs["reference"][reference_for(name)], name)


def test_ep2_resumes_bit_for_bit_with_expert_bias(runs):
    straight, first, resumed = runs["ep2-resume"]
    assert_resumed_exactly(straight, first, resumed, "EP=2 with expert bias")
    saved = all_tensors(step_dir(runs["dir"] / "ep2-balanced", 6))
    biases = [key for key in saved if key.endswith("mlp.router.expert_bias")]
    assert biases and not any(key.startswith("optimizer.") and "expert_bias" in key for key in saved)
    assert any(saved[key].abs().max() > 0 for key in biases), "the expert bias never moved: nothing was tested"


@pytest.mark.parametrize("layout", ["one-resumed", "tp2-ep2-resumed"])
def test_ep2_checkpoint_resumes_at_other_layouts(runs, layout):
    """The EP=2 checkpoint of step 6, resumed at one rank and at TP=2xEP=2, follows EP=2's steps 7-12."""
    straight = runs["ep2-resume"][0]
    expected = {metric: values[6:] for metric, values in straight.items()}
    assert len(runs[layout]["loss"]) == 6
    assert_close(runs[layout], expected, f"EP=2 checkpoint at {layout}")
