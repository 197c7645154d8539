"""Trackers without training: W&B offline read back, run-id continuation, the missing-key fallback, TensorBoard,
the rank rule, and gptscale-plot."""

import json
import logging
import subprocess
import sys

import pytest

from gptscale.config import load_config
from gptscale.tracking import build_tracker
from tests.helpers import REPO
from tests.wandb_file import read_run

STEPS = {
    2: {
        "loss": 5.5,
        "lr": 1e-4,
        "grad_norm": 2.5,
        "tokens_per_s": 1000.0,
        "tflops_per_device": 0.01,
        "mfu": None,
        "peak_memory_gib": None,
        "consumed_tokens": 4096,
    },
    4: {
        "loss": 5.25,
        "lr": 2e-4,
        "grad_norm": None,
        "tokens_per_s": 1100.0,
        "tflops_per_device": 0.02,
        "mfu": None,
        "peak_memory_gib": None,
        "consumed_tokens": 8192,
    },
}


@pytest.fixture(autouse=True)
def wandb_home(tmp_path, monkeypatch):
    """W&B reads and writes its settings under the test's directory and finds no API key anywhere."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def config(run_dir, *overrides):
    return load_config([f"run_dir={run_dir}", *overrides])


def log_steps(tracker, steps):
    for step in steps:
        tracker.log(step, STEPS[step])
    tracker.log(4, {"eval_loss": 5.0})
    tracker.log(4, {"checkpoint_step": 4})


def wandb_files(run_dir):
    """One file per W&B run started in ``run_dir`` (``latest-run`` links to the last of them)."""
    return sorted(path for path in (run_dir / "wandb").glob("*/run-*.wandb") if path.parent.name != "latest-run")


def test_wandb_offline_holds_config_and_every_metric_at_its_step(tmp_path):
    cfg = config(
        tmp_path,
        "logging.wandb.mode=offline",
        "logging.wandb.project=gptscale-test",
        "logging.wandb.group=sweep-a",
        "logging.wandb.tags=[tiny,cpu]",
        "train.steps=4",
    )
    tracker = build_tracker(cfg, is_logging_rank=True)
    log_steps(tracker, [2, 4])
    tracker.close()

    [path] = wandb_files(tmp_path)
    run = read_run(path)
    assert (run.project, run.group, run.tags) == ("gptscale-test", "sweep-a", ["tiny", "cpu"])
    assert run.config["model"]["name"] == "gpt2-tiny"
    assert run.config["train"]["steps"] == 4 and run.config["logging"]["wandb"]["mode"] == "offline"
    for step, metrics in STEPS.items():
        for key, value in metrics.items():
            assert run.history[step].get(key) == value, (step, key)  # None is not logged
    assert run.history[4]["eval_loss"] == 5.0 and run.history[4]["checkpoint_step"] == 4
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 4


def test_restored_tracker_continues_the_same_wandb_run(tmp_path):
    cfg = config(tmp_path, "logging.wandb.mode=offline")
    first = build_tracker(cfg, is_logging_rank=True)
    first.log(2, STEPS[2])
    saved = first.state_dict()
    first.close()

    resumed = build_tracker(cfg, is_logging_rank=True)
    resumed.load_state_dict(saved)
    resumed.log(4, STEPS[4])
    with pytest.raises(RuntimeError, match="already started"):
        resumed.load_state_dict(saved)
    resumed.close()

    runs = [read_run(path) for path in wandb_files(tmp_path)]
    assert len(runs) == 2
    assert {run.run_id for run in runs} == {saved["wandb"]["run_id"]}
    assert sorted(step for run in runs for step in run.history) == [2, 4]


def test_state_of_a_tracker_without_wandb_is_accepted_and_ignored(tmp_path):
    with_wandb = build_tracker(config(tmp_path, "logging.wandb.mode=offline"), is_logging_rank=True)
    without = build_tracker(config(tmp_path), is_logging_rank=True)
    without.load_state_dict(with_wandb.state_dict())
    with_wandb.load_state_dict(without.state_dict())
    assert without.state_dict() == {}
    with_wandb.close()
    without.close()


def test_online_without_api_key_falls_back_to_offline_with_a_warning(tmp_path, caplog):
    cfg = config(tmp_path, "logging.wandb.mode=online")
    with caplog.at_level(logging.WARNING, logger="gptscale"):
        tracker = build_tracker(cfg, is_logging_rank=True)
    assert "no W&B API key" in caplog.text and "logging offline" in caplog.text
    tracker.log(2, STEPS[2])
    tracker.close()
    [path] = wandb_files(tmp_path)
    assert path.parent.name.startswith("offline-run-")
    assert read_run(path).history[2]["loss"] == STEPS[2]["loss"]


def test_other_ranks_log_nothing(tmp_path):
    tracker = build_tracker(
        config(tmp_path, "logging.wandb.mode=offline", "logging.tensorboard=true"), is_logging_rank=False
    )
    tracker.log(2, STEPS[2])
    tracker.close()
    assert tracker.state_dict() == {}
    assert not any((tmp_path / name).exists() for name in ("metrics.jsonl", "wandb", "tensorboard"))


def test_tensorboard_has_every_metric_and_the_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = build_tracker(config(tmp_path, "logging.tensorboard=true"), is_logging_rank=True)
    log_steps(tracker, [2, 4])
    tracker.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    scalars = {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    for step, metrics in STEPS.items():
        for key, value in metrics.items():
            if value is not None:
                assert scalars[key][step] == pytest.approx(value), (step, key)
    assert scalars["eval_loss"] == {4: 5.0} and scalars["checkpoint_step"] == {4: 4.0}
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "name: gpt2-tiny" in config_text


def plot(*args):
    return subprocess.run(
        [sys.executable, "-m", "gptscale.tracking.plot", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_plot_draws_a_png_and_tolerates_resumed_and_cut_lines(tmp_path):
    lines = [json.dumps({"step": step, **STEPS[step]}) for step in (2, 4)]
    lines += [json.dumps({"step": 4, "eval_loss": 5.0}), json.dumps({"step": 4, **STEPS[4]}), '{"step": 6, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    proc = plot(tmp_path, "--out", tmp_path / "curves" / "run.png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "curves" / "run.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "skipping line 5" in proc.stderr
    assert not list((tmp_path / "curves").glob(".*partial"))


@pytest.mark.parametrize("contents, message", [(None, "no metrics.jsonl in"), ("", "has no training steps")])
def test_plot_refuses_a_directory_without_metrics(tmp_path, contents, message):
    if contents is not None:
        (tmp_path / "metrics.jsonl").write_text(contents)
    proc = plot(tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "metrics.png").exists()


def png_height(path) -> int:
    return int.from_bytes(path.read_bytes()[20:24], "big")  # the IHDR chunk: width, then height


def test_plot_adds_an_accuracy_panel_for_evaluated_tasks(tmp_path):
    lines = [json.dumps({"step": step, **STEPS[step]}) for step in (2, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert plot(tmp_path, "--out", tmp_path / "plain.png").returncode == 0
    lines += [json.dumps({"step": 4, "eval/sums/acc": 0.9, "eval/sums/acc_norm": 0.8, "eval/arc/acc": 0.3})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    proc = plot(tmp_path, "--out", tmp_path / "tasks.png")
    assert proc.returncode == 0, proc.stderr
    assert png_height(tmp_path / "plain.png") == 1200 and png_height(tmp_path / "tasks.png") == 1500


def test_plot_adds_where_the_wall_time_went_when_the_run_has_goodput_records(tmp_path):
    from tests.unit.test_goodput import KILLED_ONCE, write_run

    lines = [json.dumps({"step": step, **STEPS[step]}) for step in (2, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    write_run(tmp_path, KILLED_ONCE)
    proc = plot(tmp_path, "--out", tmp_path / "goodput.png")
    assert proc.returncode == 0, proc.stderr
    assert png_height(tmp_path / "goodput.png") == 1300


def test_plot_overlays_the_runs_of_a_sweep_with_smoothing(tmp_path):
    """A sweep's runs on the same axes: named one by one, or by their directory; --smooth averages the loss."""
    for number, scale in enumerate((1.0, 2.0)):
        run = tmp_path / "multirun" / str(number)
        run.mkdir(parents=True)
        lines = [json.dumps({"step": step, **STEPS[step], "loss": STEPS[step]["loss"] * scale}) for step in (2, 4)]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    proc = plot(tmp_path / "multirun", "--smooth", 2)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "multirun" / "metrics.png")
    assert png_height(tmp_path / "multirun" / "metrics.png") == 1200
    proc = plot(tmp_path / "multirun" / "0", tmp_path / "multirun" / "1", "--out", tmp_path / "both.png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "both.png").read_bytes().startswith(b"\x89PNG")
    assert plot(tmp_path / "multirun", "--smooth", 0).returncode == 2


def test_smoothing_is_a_trailing_mean():
    from gptscale.tracking.plot import smoothed

    assert smoothed([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smoothed([1.0, 3.0], 1) == [1.0, 3.0]
