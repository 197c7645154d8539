"""Spike detection on real runs: no false positives on the README's default job; a cascade that cannot rewind
stops the run saying why."""

import json
import math
import os
import subprocess
import sys

from tests.helpers import REPO


def train(args, timeout=600):
    return subprocess.run([sys.executable, "-m", "gptscale.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_default_job_has_no_false_spikes(tmp_path):
    """300 steps of the embedded default (shorter sequences and batch; ``tools/spike_check.py`` runs the full
    job) with the detector at its default: zero skipped steps, and the deciding score (the loss z-score) stays
    well below train.spike.zscore."""
    proc = train([f"run_dir={tmp_path}", "train.steps=300", "train.seq_len=64", "parallel.global_batch=8",
                  "parallel.micro_batch=8", "train.log_interval=1", "train.eval_interval=0",
                  "checkpoint.save_final=false"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 300
    assert all(r["spike/skipped"] == 0 and r["skipped_steps"] == 0 for r in steps)
    assert "skipped as a spike" not in proc.stderr
    scored = [r for r in steps if r["spike/zscore_loss"] is not None and r["spike/zscore_grad_norm"] is not None]
    assert len(scored) == 250  # the detector was on from the step after its 50-step window filled
    worst = {name: max(r[f"spike/zscore_{name}"] for r in scored) for name in ("loss", "grad_norm")}
    print(f"max loss z {worst['loss']:.2f}, grad norm z {worst['grad_norm']:.2f}")
    assert math.isfinite(worst["loss"]) and worst["loss"] < 0.75 * 6.0


def test_spikes_in_a_row_without_a_checkpoint_stop_the_run(tmp_path):
    """A hair-trigger detector (z 0.5 over 2 steps) makes a spike within a few steps; with no checkpoint to
    rewind to, train.spike.max_consecutive=1 stops the run naming the step and the missing checkpoint."""
    proc = train([f"run_dir={tmp_path}", "train.steps=40", "train.seq_len=32", "parallel.global_batch=4",
                  "parallel.micro_batch=4", "train.eval_interval=0", "train.spike.zscore=0.5", "train.spike.window=2",
                  "train.spike.max_consecutive=1"], timeout=300)
    assert proc.returncode != 0
    assert "skipped as loss spikes (train.spike.max_consecutive=1), and the run cannot rewind: cannot rewind to step" \
        in proc.stderr, proc.stderr[-3000:]
    assert "holds no complete checkpoint at or before it (checkpoints present at steps: none)" in proc.stderr
    assert (tmp_path / "skipped_documents.txt").read_text().count("# step") > 0


def test_rewinds_are_bounded(tmp_path):
    """With a checkpoint every step the hair-trigger detector rewinds, then spikes again: one rewind more than
    train.spike.max_rewinds=1 stops the run; RUN_DIR/rewinds.jsonl holds the one it made."""
    proc = train([f"run_dir={tmp_path}", "train.steps=60", "train.seq_len=32", "parallel.global_batch=4",
                  "parallel.micro_batch=4", "train.eval_interval=0", "train.spike.zscore=0.2", "train.spike.window=2",
                  "train.spike.max_consecutive=1", "train.spike.max_rewinds=1", "checkpoint.interval=1",
                  "checkpoint.async_save=false"], timeout=300)
    assert proc.returncode != 0
    assert "and the run has rewound train.spike.max_rewinds=1 times already" in proc.stderr, proc.stderr[-3000:]
    (rewind,) = [json.loads(line) for line in (tmp_path / "rewinds.jsonl").read_text().splitlines()]
    assert rewind["resumed_step"] == rewind["to_step"] == rewind["from_step"] - 1
