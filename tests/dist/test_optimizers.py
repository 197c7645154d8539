"""The second optimizer (Lion, ``optim=lion``) under every layout, as issue 22 asks of a new optimizer.

- Parity: its first six losses and gradient norms at one rank, TP=2, DP=2 ZeRO-1 and DP=2 ZeRO-3 agree
  within 1e-4, for a GPT-2 and a Llama model.
- Resharding: TP=2 saves at step 6 and goes on; resumed from that checkpoint at DP=2 ZeRO-1 and ZeRO-3, the
  next losses are TP=2's own within 1e-4, and Lion's state (exp_avg, no exp_avg_sq) is in the checkpoints
  and at step 9 the same whichever layout carried it.
- The name is honoured: the same settings with ``optim.name=adamw`` train differently, and a Lion
  checkpoint's state does not resume under AdamW (the error names both).
- A step planted with a NaN loss under ZeRO-1 and ZeRO-3 changes nothing: the update gate's ``found_inf``
  reaches Lion as it reaches AdamW.

One launch per rank count (imports dominate the cost of tiny runs).
"""

import json

import pytest
import torch

from tests.checkpoint_helpers import all_tensors, rank_state, step_dir
from tests.helpers import run_jobs, torchrun

COMMON = [
    "optim=lion",
    "optim.lr=1e-3",
    "optim.warmup_steps=2",
    "optim.decay_steps=10",
    "train.seq_len=32",
    "train.eval_interval=0",
    "train.log_interval=3",
    "parallel.global_batch=8",
    "parallel.micro_batch=2",
    "data.embedded_max_bytes=200000",
    "data.embedded_vocab_size=300",
]
MODELS = {"gpt2": "gpt2-tiny", "llama": "llama-tiny"}
LAYOUTS = {"tp2": ["parallel.tp=2"], "dp2-zero1": ["parallel.zero=1"], "dp2-zero3": ["parallel.zero=3"]}
RESUMED = {"dp2-zero1": ["parallel.zero=1"], "dp2-zero3": ["parallel.zero=3"]}
NAN = RESUMED
STEPS, SAVED, TOTAL = 6, 6, 9
RTOL = 1e-4


def job(model, run_dir, steps, *overrides):
    return [f"model={MODELS[model]}", f"run_dir={run_dir}", f"train.steps={steps}", *COMMON, *overrides]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """Each model under Lion (Llama's saved at the end), Llama under AdamW, and AdamW resuming Lion's save."""
    tmp = tmp_path_factory.mktemp("one-rank")
    jobs = {model: job(model, tmp / model, STEPS) for model in MODELS}
    jobs["adamw"] = job("llama", tmp / "adamw", STEPS, "checkpoint.save_final=false", "optim.name=adamw")
    jobs["adamw-resumes-lion"] = job(
        "llama",
        tmp / "adamw-resumes-lion",
        STEPS + 1,
        "optim.name=adamw",
        f"checkpoint.resume={step_dir(tmp / 'llama', STEPS)}",
    )
    (tmp / "jobs.json").write_text(json.dumps({name: [str(o) for o in overrides] for name, overrides in jobs.items()}))
    torchrun(1, ["tests/dist/run_outcomes.py", str(tmp / "jobs.json"), str(tmp / "results.json")], timeout=900)
    return tmp, json.loads((tmp / "results.json").read_text())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every parity layout; Llama at TP=2 runs on to step 9, saving at 6 and 9, and is resumed from step 6."""
    tmp = tmp_path_factory.mktemp("two-ranks")
    jobs, names = [], []
    for model in MODELS:
        for name, overrides in LAYOUTS.items():
            if (model, name) == ("llama", "tp2"):
                jobs.append(job(model, tmp / "llama-tp2", TOTAL, f"checkpoint.interval={SAVED}", *overrides))
            else:
                jobs.append(job(model, tmp / f"{model}-{name}", STEPS, "checkpoint.save_final=false", *overrides))
            names.append((model, name))
    for name, overrides in RESUMED.items():
        jobs.append(
            job(
                "llama",
                tmp / f"resumed-{name}",
                TOTAL,
                f"checkpoint.resume={step_dir(tmp / 'llama-tp2', SAVED)}",
                *overrides,
            )
        )
        names.append(("resumed", name))
    for name, overrides in NAN.items():
        jobs.append(job("gpt2", tmp / f"nan-{name}", 3, "test.nan_steps=[3]", *overrides))
        jobs.append(job("gpt2", tmp / f"clean-{name}", 2, *overrides))
        names += [("nan", name), ("clean", name)]
    return tmp, dict(zip(names, run_jobs(2, jobs, tmp)))


def assert_close(got, want, what, first=1):
    assert len(got) == len(want), what
    for step, (g, w) in enumerate(zip(got, want), start=first):
        assert abs(g - w) <= RTOL * abs(w), f"{what}: step {step} {g} vs {w}"


def test_lion_trains_and_is_not_adamw(one_rank):
    """The loss falls, and the name selects the algorithm: the same settings under AdamW train differently.

    AdamW's first update is sign(g) too (bias-corrected m / sqrt(v) at step one), so the two part from the
    second update on."""
    _, results = one_rank
    lion, adamw = results["llama"]["loss"], results["adamw"]["loss"]
    assert lion[-1] < lion[0] - 0.1, (lion, adamw)
    assert lion[0] == adamw[0] and abs(lion[1] - adamw[1]) <= RTOL * adamw[1], (lion, adamw)
    assert all(abs(a - b) > 1e-3 * abs(b) for a, b in zip(lion[2:], adamw[2:])), (lion, adamw)


def test_lion_state_does_not_resume_under_adamw(one_rank):
    tmp, results = one_rank
    error = results["adamw-resumes-lion"].get("error")
    assert error == (
        f"CheckpointError: {step_dir(tmp / 'llama', STEPS)} holds the state of optim.name=lion, this "
        "run uses optim.name=adamw: its state cannot continue it (to start a new optimizer from these "
        "weights, give the checkpoint as task.init)"
    ), error


@pytest.mark.parametrize("model", list(MODELS))
def test_two_rank_layouts_match_one_rank(one_rank, two_ranks, model):
    _, results = two_ranks
    for name in LAYOUTS:
        for metric in ("loss", "grad_norm"):
            got = results[(model, name)][metric][:STEPS]
            assert_close(got, one_rank[1][model][metric], f"{model} {name} {metric}")


@pytest.mark.parametrize("name", list(RESUMED))
def test_lion_checkpoint_of_tp2_resumes_at_other_layouts(two_ranks, name):
    """Steps 7-9 after the switch follow TP=2's own, uninterrupted steps 7-9."""
    _, results = two_ranks
    resumed = results[("resumed", name)]
    assert len(resumed["loss"]) == TOTAL - SAVED
    for metric in ("loss", "grad_norm"):
        assert_close(
            resumed[metric], results[("llama", "tp2")][metric][SAVED:], f"resumed at {name} {metric}", first=SAVED + 1
        )


@pytest.mark.parametrize("name", list(RESUMED))
def test_lion_state_is_saved_and_carried_across_layouts(two_ranks, name):
    """The checkpoint holds Lion's one moment per weight, nonzero; at step 9 the run resumed at another
    layout holds TP=2's moments (a moment lost at the resume would differ by its whole size: beta2=0.99)."""
    tmp, _ = two_ranks
    saved = all_tensors(step_dir(tmp / "llama-tp2", SAVED))
    moments = {k for k in saved if k.startswith("optimizer.exp_avg.")}
    assert moments and not any(k.startswith("optimizer.exp_avg_sq.") for k in saved)
    assert {k.removeprefix("optimizer.exp_avg.") for k in moments} == {
        k for k in saved if "." in k and not k.startswith("optimizer.")
    }
    assert all(saved[k].abs().sum() > 0 for k in moments) and int(saved["step"]) == SAVED
    straight = all_tensors(step_dir(tmp / "llama-tp2", TOTAL))
    resumed = all_tensors(step_dir(tmp / f"resumed-{name}", TOTAL))
    assert int(resumed["step"]) == TOTAL
    for key in moments:
        difference = torch.linalg.vector_norm(resumed[key] - straight[key])
        assert difference <= RTOL * torch.linalg.vector_norm(straight[key]), f"{name}: {key}"
        assert torch.linalg.vector_norm(straight[key] - saved[key]) > 10 * difference, key  # it did move


@pytest.mark.parametrize("name", list(NAN))
def test_nan_step_leaves_lion_untouched(two_ranks, name):
    """The checkpoint after a skipped NaN step equals the one before it: weights, moments and step count."""
    tmp, results = two_ranks
    nan_run, clean_run = results[("nan", name)], results[("clean", name)]
    assert nan_run["loss"][2] != nan_run["loss"][2] and nan_run["loss"][:2] == clean_run["loss"], name
    after, before = all_tensors(step_dir(tmp / f"nan-{name}", 3)), all_tensors(step_dir(tmp / f"clean-{name}", 2))
    assert after.keys() == before.keys() and any(k.startswith("optimizer.exp_avg.") for k in before)
    for key in before:
        assert torch.equal(after[key], before[key]), f"{name}: {key} changed in the skipped step"
    assert rank_state(step_dir(tmp / f"nan-{name}", 3))["components"]["guard"]["skipped"] == 1


def test_inspect_names_the_optimizer(one_rank, capsys):
    from gptscale.checkpoint.cli import inspect

    tmp, _ = one_rank
    assert inspect(step_dir(tmp / "llama", STEPS), checksums=False) == 0
    assert "holds    fp32 master weights, lion's state and step count" in capsys.readouterr().out
