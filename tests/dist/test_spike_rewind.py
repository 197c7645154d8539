"""Loss spikes on real ranks (DP=2): a planted garbage document makes a spike that is detected and skipped; the
run rewinds past it and its losses then equal, bit for bit, those of a run that excluded its documents from
the start. ``checkpoint.rewind=N`` at start: once per run directory, and a clear error without a checkpoint."""

import json
import subprocess
import sys

import pytest

from gptscale.checkpoint.cli import inspect
from gptscale.checkpoint.files import read_rank_state
from gptscale.data.exclude import read_exclusions
from gptscale.data.manifest import read_manifest
from gptscale.tracking.plot import plot, read_metrics, spike_marks
from tests.datasets import counting_documents, make_dataset, read_document, with_garbage
from tests.helpers import REPO, run_jobs

GARBAGE = (500, 1000)  # the counting documents use ids below 500


def common(dataset):
    # data.seed=6 serves the garbage document from step 183 on; checkpoints every 30 steps, so the rewind
    # goes to step 180, before any document of the spike's batch was first served.
    return [
        f"data.path={dataset}",
        "data.seed=6",
        "train.steps=200",
        "train.seq_len=32",
        "parallel.global_batch=4",
        "parallel.micro_batch=2",
        "optim.lr=5e-3",
        "optim.warmup_steps=5",
        "train.spike.window=20",
        "train.log_interval=1",
        "train.eval_interval=0",
        "checkpoint.interval=30",
        "checkpoint.keep_last=0",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spikes")
    dataset = make_dataset(
        tmp / "counting", with_garbage(counting_documents(2000, GARBAGE[0], seed=3), *GARBAGE, 400), vocab=1000
    )
    spiked, reference = tmp / "spiked", tmp / "reference"
    at_start = [
        f"run_dir={reference}",
        *common(dataset),
        "checkpoint.rewind=100",
        "train.steps=100",
        "optim.on_new_steps=stretch",
    ]
    results = run_jobs(
        2,
        [
            [f"run_dir={spiked}", *common(dataset), "train.spike.max_consecutive=1"],
            [f"run_dir={reference}", *common(dataset), f"data.exclude=[{spiked / 'skipped_documents.txt'}]"],
            at_start,  # rewinds the reference run to its step-90 checkpoint ...
            at_start,  # ... once: the same command line again resumes as usual
        ],
        tmp,
    )
    return dataset, spiked, reference, results


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_garbage_spike_is_skipped_rewound_and_then_bit_exact(runs):
    dataset, spiked, reference, (rewound, excluded_from_start, _, _) = runs
    skips = [r for r in metrics(spiked) if r.get("spike/skipped_step")]
    assert len(skips) == 1 and skips[0]["spike/zscore_loss"] > 6
    spike_step = skips[0]["step"]
    manifest = read_manifest(str(dataset))
    recorded = read_exclusions([str(spiked / "skipped_documents.txt")])
    garbage = [
        identity
        for identity in recorded
        if all(GARBAGE[0] <= token < GARBAGE[1] for token in read_document(manifest, identity)[:-1])
    ]
    assert len(garbage) == 1, recorded  # the planted document is among the skipped batch's documents
    (rewind,) = [json.loads(line) for line in (spiked / "rewinds.jsonl").read_text().splitlines()]
    assert (rewind["from_step"], rewind["to_step"], rewind["resumed_step"]) == (spike_step, spike_step - 1, 180)
    assert len(rewound["loss"]) == len(excluded_from_start["loss"]) == 200
    assert rewound["loss"] == excluded_from_start["loss"]
    assert rewound["grad_norm"] == excluded_from_start["grad_norm"]
    assert not any(r.get("spike/skipped") for r in metrics(reference))
    saved = read_rank_state(spiked / "checkpoints" / "step_000200", 1)["components"]["train_data"]
    assert saved["exclude"] == sorted(str(identity) for identity in recorded)  # every rank's state holds the list


def test_skips_and_rewinds_are_visible(runs, capsys, tmp_path):
    """metrics.jsonl has the skip and the rewind, gptscale-plot marks both, gptscale-ckpt inspect lists the
    exclusions."""
    _, spiked, _, _ = runs
    records = read_metrics(spiked / "metrics.jsonl")
    (steps, losses), rewinds = spike_marks(records)
    skip = next(r for r in records if r.get("spike/skipped_step"))
    assert steps == [skip["step"]] and losses == [skip["spike/loss"]] and rewinds == [(skip["step"], 180)]
    plot({"spiked": records}, tmp_path / "curves.png", "spiked")
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert inspect(spiked / "checkpoints" / "step_000200", checksums=False) == 0
    report = capsys.readouterr().out
    recorded = read_exclusions([str(spiked / "skipped_documents.txt")])
    assert f"excluded {len(recorded)} documents:" in report
    assert all(str(identity) in report for identity in recorded)


def test_rewind_at_start_once_and_without_a_checkpoint(runs):
    dataset, spiked, reference, (_, _, rewound_at_start, relaunched) = runs
    (rewind,) = [json.loads(line) for line in (reference / "rewinds.jsonl").read_text().splitlines()]
    assert (rewind["reason"], rewind["to_step"], rewind["resumed_step"]) == ("checkpoint.rewind", 100, 90)
    assert len(rewound_at_start["loss"]) == 10 and relaunched["loss"] == []  # steps 91-100, then none
    assert sorted(p.name.split("-")[0] for p in (reference / "checkpoints" / "rewound").iterdir()) == [
        "step_000120",
        "step_000150",
        "step_000180",
        "step_000200",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "gptscale.train", f"run_dir={spiked}", *common(dataset), "checkpoint.rewind=25"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert (
        "cannot rewind to step 25: " in proc.stderr
        and "holds no complete checkpoint at or before it (checkpoints present at steps: 30, 60, 90, 120, 150, "
        "180, 200)"
        in proc.stderr
    ), proc.stderr[-3000:]
