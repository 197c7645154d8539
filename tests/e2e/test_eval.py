"""Evaluation as users run it: a tiny model fine-tuned on sums learns held-out ones (measured by gptscale-eval and
by the evaluation inside training), the scores do not depend on the layout, and lm-eval-harness on the Hugging
Face export gives the same scores from the same log-likelihoods."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
from lm_eval.tasks import TaskManager

from tests.helpers import REPO, torchrun
from tests.sft.data import prepare_pairs, sums, write_choices, write_pairs

STEPS = 250
TRAIN = [
    "task=sft",
    "model=gpt2-tiny",
    "train.seq_len=32",
    "parallel.global_batch=16",
    "parallel.micro_batch=16",
    "optim.lr=3e-3",
    "optim.min_lr=3e-4",
    "optim.warmup_steps=10",
    "checkpoint.resume=none",
]


def run(module: str, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def lines(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    return {line["task"]: line for line in map(json.loads, proc.stdout.splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An untrained and a fine-tuned checkpoint of the sums, the held-out sums as a task, and the fine-tuned
    checkpoint's scores in one process."""
    tmp = tmp_path_factory.mktemp("eval")
    train_pairs, held_out = sums()
    data = prepare_pairs(tmp / "data", write_pairs(tmp / "pairs.jsonl", train_pairs, repeat=4))
    task = write_choices(tmp / "sums.jsonl", held_out)
    run("gptscale.train", [*TRAIN, f"data.path={data}", f"run_dir={tmp}/untrained", "train.steps=0"])
    run(
        "gptscale.train",
        [
            *TRAIN,
            f"data.path={data}",
            f"run_dir={tmp}/tuned",
            f"train.steps={STEPS}",
            f"train.eval_interval={STEPS}",
            f"eval.tasks=[{task}]",
        ],
    )
    return tmp, task, evaluate(tmp / "tuned", task, "--log-likelihoods")


def evaluate(checkpoint: Path, task: Path, *extra: str) -> dict[str, dict]:
    return lines(run("gptscale.eval", ["--checkpoint", str(checkpoint), f"eval.tasks=[{task}]", *extra]))


def test_fine_tuning_learns_held_out_sums(runs):
    tmp, task, after = runs
    before = evaluate(tmp / "untrained", task)
    assert before["sums"]["examples"] == after["sums"]["examples"] == 20
    assert before["sums"]["acc"] <= 0.5, before  # four choices: chance is 0.25
    assert after["sums"]["acc"] >= 0.8 and after["sums"]["acc"] >= before["sums"]["acc"] + 0.4, (before, after)
    assert after["heldout"]["loss"] < before["heldout"]["loss"] - 2
    logged = [json.loads(line) for line in (tmp / "tuned" / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in logged if r["step"] == STEPS and "eval/sums/acc" in r)
    assert final["eval/sums/acc"] == after["sums"]["acc"] and final["eval/sums/acc_norm"] == after["sums"]["acc_norm"]
    assert final["eval_loss"] == pytest.approx(after["heldout"]["loss"], rel=1e-6)


@pytest.mark.parametrize(
    "layout",
    [["parallel.tp=2"], ["parallel.pp=2"], ["parallel.micro_batch=4"], ["parallel.cp=2"]],
    ids=["tp2", "pp2", "dp2", "cp2"],
)
def test_scores_do_not_depend_on_the_layout(runs, layout):
    tmp, task, one_rank = runs
    proc = torchrun(
        2,
        [
            "-m",
            "gptscale.eval",
            "--checkpoint",
            str(tmp / "tuned"),
            f"eval.tasks=[{task}]",
            "--log-likelihoods",
            *layout,
        ],
        timeout=600,
    )
    two_ranks = lines(proc)
    assert two_ranks["sums"]["acc"] == one_rank["sums"]["acc"]
    assert two_ranks["sums"]["acc_norm"] == one_rank["sums"]["acc_norm"]
    pairs = [
        (a, b)
        for x, y in zip(one_rank["sums"]["log_likelihoods"], two_ranks["sums"]["log_likelihoods"])
        for a, b in zip(x, y)
    ]
    assert len(pairs) == 80 and max(abs(a - b) for a, b in pairs) < 1e-4
    assert two_ranks["heldout"]["loss"] == pytest.approx(one_rank["heldout"]["loss"], rel=1e-5)


def test_lm_eval_harness_on_the_hf_export_agrees(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # a local task file: nothing to download
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tmp, task, one_rank = runs
    ours = one_rank["sums"]
    run("gptscale.convert", ["--checkpoint", str(tmp / "tuned"), "--to", "hf", "--out", str(tmp_path / "hf")])
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "sums.yaml").write_text(
        "task: sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {task}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    result = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
        tasks=["sums"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        device="cpu",
        batch_size=8,
        log_samples=True,
    )
    scores = result["results"]["sums"]
    assert abs(scores["acc,none"] - ours["acc"]) <= 1e-6 and abs(scores["acc_norm,none"] - ours["acc_norm"]) <= 1e-6
    theirs = {sample["doc_id"]: [ll for ll, _ in sample["filtered_resps"]] for sample in result["samples"]["sums"]}
    differences = [abs(a - b) for doc, lls in theirs.items() for a, b in zip(lls, ours["log_likelihoods"][doc])]
    assert len(differences) == 80 and max(differences) < 1e-5, max(differences)


def test_eval_speaks_of_evaluating_not_of_training(runs):
    """It printed 'no checkpoint to resume from ...: training from scratch' and the optimizer-memory plan."""
    tmp, task, _ = runs
    proc = run("gptscale.eval", ["--checkpoint", str(tmp / "tuned"), f"eval.tasks=[{task}]"])
    assert f"evaluating {tmp / 'tuned'}" in proc.stderr
    assert "training from scratch" not in proc.stderr and "plan: rank" not in proc.stderr
