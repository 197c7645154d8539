"""The training command as users run it: the default job, torchrun, and bad configurations."""

import json
import subprocess
import sys
import time

from tests.helpers import REPO, torchrun


def train(args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "gptscale.train", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_default_job_learns(tmp_path):
    """The README's job, shortened: the loss at the end is well below the loss at the start."""
    proc = train([f"run_dir={tmp_path}", "train.steps=60", "train.log_interval=10", "train.eval_interval=60"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 1.0, losses
    assert "step 60/60 | loss" in proc.stderr and "| eta 0m00s" in proc.stderr
    assert "run ended at step 60/60" in proc.stderr
    assert any("eval_loss" in r for r in records)


def test_bad_layout_fails_before_work_and_names_fields(tmp_path):
    start = time.monotonic()
    proc = torchrun(3, ["-m", "gptscale.train", f"run_dir={tmp_path}", "parallel.tp=2"], check=False, timeout=300)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "world size 3 is not divisible by parallel.tp * parallel.cp * parallel.pp" in output
    assert not (tmp_path / "metrics.jsonl").exists()
    assert time.monotonic() - start < 120


def test_unknown_key_fails_naming_it(tmp_path):
    proc = train([f"run_dir={tmp_path}", "parallel.tpp=2"], timeout=120)
    assert proc.returncode != 0
    assert "parallel.tpp" in proc.stderr


def test_added_unknown_key_fails_with_the_nearest_known_key(tmp_path):
    """``+train.stpes=10`` (what Hydra suggests after ``train.stpes=10``) is refused, not stored and ignored."""
    proc = train([f"run_dir={tmp_path}", "+train.stpes=10"], timeout=120)
    assert proc.returncode == 2
    assert "train.stpes: unknown key (did you mean train.steps" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resuming_with_another_length_asks_how_the_schedule_should_change(tmp_path):
    """Raising train.steps on resume used to re-stretch the lr schedule silently (the lr jumped back up)."""
    short = [
        f"run_dir={tmp_path}",
        "train.seq_len=32",
        "parallel.global_batch=4",
        "train.eval_interval=0",
        "data.embedded_max_bytes=100000",
        "checkpoint.save_final=true",
    ]
    assert train([*short, "train.steps=4"]).returncode == 0
    proc = train([*short, "train.steps=8"])
    assert proc.returncode == 2
    assert (
        "train.steps is 8, but the checkpoint's schedule was made for 4 steps: set optim.on_new_steps to keep"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    proc = train([*short, "train.steps=8", "optim.on_new_steps=extend"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.steps changed from 4 to 8 on resume: optim.on_new_steps=extend" in proc.stderr


def test_help_is_one_page_of_the_keys_users_type():
    proc = train(["--help"], timeout=120)
    assert proc.returncode == 0
    assert "optim.lr=0.001" in proc.stdout and "peak learning rate" in proc.stdout
    assert "Powered by Hydra" not in proc.stdout


def test_checkpoints_by_wall_time(tmp_path):
    """checkpoint.interval_minutes saves without a step interval (on by default: 30 minutes), so a long run
    interrupted by hand does not lose everything."""
    proc = train(
        [
            f"run_dir={tmp_path}",
            "train.steps=12",
            "train.seq_len=32",
            "parallel.global_batch=4",
            "train.eval_interval=0",
            "data.embedded_max_bytes=100000",
            "checkpoint.interval=0",
            "checkpoint.interval_minutes=0.0001",
            "checkpoint.save_final=false",
            "checkpoint.keep_last=0",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*"))
    assert len(saved) >= 2 and saved[0] < 12, saved


def test_a_data_error_is_one_line_without_a_traceback(tmp_path):
    proc = train([f"run_dir={tmp_path}", "data.path=/nonexistent/corpus"], timeout=300)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "/nonexistent/corpus/manifest.json: no manifest" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cfg_job_resolve_prints_the_resolved_run_dir():
    proc = train(["--cfg", "job", "--resolve"], timeout=120)
    assert proc.returncode == 0 and "run_dir: runs/gpt2-tiny" in proc.stdout


def test_a_cpu_run_prints_no_dependency_noise_and_saves_the_datas_vocabulary(tmp_path):
    """DeepSpeed's accelerator notice, megatron-core's CUDA advice and torch's deprecations (on resume) said
    nothing about the user's run; config.yaml said vocab_size 50257 for a model built with the data's 4096."""
    short = [
        f"run_dir={tmp_path}",
        "train.steps=2",
        "train.seq_len=32",
        "parallel.global_batch=4",
        "train.eval_interval=0",
        "data.embedded_max_bytes=100000",
    ]
    first = train(short)
    assert first.returncode == 0, first.stderr[-3000:]
    again = train([*short, "train.steps=3", "optim.on_new_steps=keep"])
    assert again.returncode == 0, again.stderr[-3000:]
    for proc in (first, again):
        for noise in ("Setting accelerator to CPU", "CUDA_DEVICE_MAX_CONNECTIONS", "FutureWarning"):
            assert noise not in proc.stderr, noise
    import yaml

    saved = yaml.safe_load((tmp_path / "checkpoints" / "step_000003" / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] == 4096
