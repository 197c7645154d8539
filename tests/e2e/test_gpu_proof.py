"""The GPU proof kit's CPU rehearsal (GPU_PROOF_DRY=1 bash tools/gpu_proof.sh): a device call is 10 minutes
once, so every stage must already run here, write its rows to $OUT as it ends, and report its own failure."""

import json
import os
import subprocess
import sys
import time

from tests.helpers import REPO
from tests.unit.test_gpu_wheels import wheelhouse  # noqa: F401  (the fixture: the dry run lists its wheels)

STAGES = ["setup", "versions", "train", "ckpt", "speed-gpt2-tiny", "speed-llama-tiny", "fp8", "plan"]


def test_dry_run_writes_every_stage(tmp_path, wheelhouse):  # noqa: F811
    out = tmp_path / "out"
    env = {
        **os.environ,
        "GPU_PROOF_DRY": "1",
        "PYTHON": sys.executable,
        "OUT": str(out),
        "GPU_WHEELS": str(wheelhouse),
        "GPU_PROOF_WORK": str(tmp_path / "work"),
        "OMP_NUM_THREADS": "2",
    }
    proc = subprocess.run(
        ["bash", "tools/gpu_proof.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = dict(line.split(" rc=") for line in (out / "stages.txt").read_text().splitlines())
    assert list(status) == STAGES and all(s.startswith("0 ") for s in status.values()), status
    assert len(list(out.iterdir())) <= 8  # the device tool brings back at most 8 files

    losses = [r["loss"] for r in map(json.loads, (out / "train-metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 10 and losses[-1] < losses[0]

    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    labels = [r["label"] for r in rows]
    assert labels.count("baseline gpt2-tiny") == 1 and labels.count("baseline llama-tiny") == 1, labels
    fp8 = [r for r in rows if "train.fp8=hybrid" in r.get("overrides", [])]
    assert len(rows) == 6 and len(fp8) == 1, labels
    assert all(r["tokens_per_s"] > 0 and len(r["losses"]) == 3 for r in rows)

    assert "plan: rank 0" in (out / "plan.txt").read_text()
    summary = (out / "summary.txt").read_text()
    assert "baseline llama-tiny" in summary and "x" in summary.split("baseline llama-tiny")[0]


def test_a_stage_over_its_budget_is_cut_and_the_rest_still_run(tmp_path, wheelhouse):  # noqa: F811
    """GPU_PROOF_TOTAL=20: the stage running at 20 s is killed and recorded as a timeout, the later ones are
    skipped, and the script still ends (with its summary) within the total and the kill's grace."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "GPU_PROOF_DRY": "1",
        "PYTHON": sys.executable,
        "OUT": str(out),
        "GPU_WHEELS": str(wheelhouse),
        "GPU_PROOF_WORK": str(tmp_path / "work"),
        "GPU_PROOF_TOTAL": "20",
    }
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", "tools/gpu_proof.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (out / "stages.txt").read_text().splitlines()
    done = [line for line in lines if " rc=0 " in line]
    cut = [line for line in lines if " rc=timeout " in line]  # none if a stage ended just before the total
    skipped = [line for line in lines if line.endswith("skipped 0 s (no time left)")]
    assert lines == done + cut + skipped and len(cut) <= 1 and skipped, lines
    assert lines[-1].startswith("plan skipped") and (out / "summary.txt").exists()
    assert elapsed < 20 + 10 + 20, elapsed  # the total, timeout's kill grace, the summary's Python
