"""Runs that go wrong: a save killed mid-write, a stop signal, too many NaN steps, damaged checkpoints."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from gptscale.checkpoint.manifest import data_files, describe_file
from gptscale.checkpoint.save import KILL_AT_SAVE_ENV
from tests.checkpoint_helpers import step_dir
from tests.helpers import REPO, free_port, run_jobs, torchrun

COMMON = [
    "model=gpt2-tiny", "train.seq_len=32", "train.eval_interval=0", "train.log_interval=1",
    "parallel.global_batch=8", "parallel.micro_batch=2", "optim.warmup_steps=2", "optim.decay_steps=10",
    "data.embedded_max_bytes=200000",
]


def logged_losses(run_dir):
    """Every loss line of metrics.jsonl in order, as (step, loss)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def inspect(path):
    return subprocess.run([sys.executable, "tools/ckpt.py", "inspect", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def launch_killed(args, tmp_path):
    """A torchrun launch whose rank 0 is SIGKILLed in a save; returns its exit status.

    A killed rank leaves its helper processes behind (the multiprocessing manager megatron-core's writer
    starts), holding the launch's output open: output goes to a file, and the launch's leftovers (found by
    a marker in their environment) are killed afterwards.
    """
    marker = f"GPTSCALE_TEST_LAUNCH={tmp_path}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), KILL_AT_SAVE_ENV: "6",
           "GPTSCALE_TEST_LAUNCH": str(tmp_path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               *args]
    with open(tmp_path / "killed.log", "w") as output:
        status = subprocess.run(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
                                timeout=600).returncode
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    return status


def test_save_killed_mid_write_resumes_from_the_previous_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = ["-m", "gptscale.train", f"run_dir={run}", "train.steps=8", "checkpoint.interval=2", *COMMON]
    assert launch_killed(args, tmp_path) != 0
    checkpoints = run / "checkpoints"
    unfinished = list(checkpoints.glob("step_000006.tmp-*"))
    assert len(unfinished) == 1 and not (unfinished[0] / "checkpoint.json").exists()
    assert list((unfinished[0] / "shards").glob("*.distcp")), "the kill should come after the shards were written"
    assert sorted(p.name for p in checkpoints.iterdir() if re.fullmatch(r"step_\d+", p.name)) == \
        ["step_000002", "step_000004"]
    assert (checkpoints / "latest").read_text().strip() == "step_000004"
    report = inspect(unfinished[0])
    assert report.returncode == 1 and "INCOMPLETE" in report.stdout

    resumed = torchrun(2, args, timeout=600)
    assert f"resumed from {checkpoints / 'step_000004'}" in resumed.stderr
    assert not list(checkpoints.glob("*.tmp-*")), "the interrupted save is cleaned up"
    assert (checkpoints / "latest").read_text().strip() == "step_000008"
    losses = logged_losses(run)
    restart = next(i for i in range(1, len(losses)) if losses[i][0] <= losses[i - 1][0])
    first_run, second_run = dict(losses[:restart]), losses[restart:]
    assert min(first_run) == 1 and max(first_run) >= 6  # an async save is published during a later step
    assert [s for s, _ in second_run] == [5, 6, 7, 8]
    for step, loss in second_run:
        if step in first_run:
            assert loss == first_run[step], f"step {step} replayed from step 4 gives another loss"


def worker_pids(launcher_pid):
    """PIDs of a torchrun launcher's worker processes by RANK."""
    children = open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()
    ranks = {}
    for pid in map(int, children):
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        for entry in environ:
            if entry.startswith(b"RANK="):
                ranks[int(entry[5:])] = pid
    return ranks


def test_stop_signal_saves_exits_zero_and_the_run_resumes(tmp_path):
    """SIGTERM reaches one rank only: every rank stops after the same step, a checkpoint is written, exit 0."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "gptscale.train", f"run_dir={run}", "train.steps=100000", *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((run / "metrics.jsonl").exists() and len(logged_losses(run)) >= 2):
            assert launcher.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        os.kill(worker_pids(launcher.pid)[1], signal.SIGTERM)
        output, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output[-4000:]
    stopped_at = logged_losses(run)[-1][0]
    assert f"stop requested by signal: saving at step {stopped_at}" in output
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:06d}"

    resumed = torchrun(2, ["-m", "gptscale.train", f"run_dir={run}", f"train.steps={stopped_at + 2}", *COMMON],
                       timeout=600)
    assert f"resumed from {step_dir(run, stopped_at)}" in resumed.stderr
    assert [s for s, _ in logged_losses(run)][-2:] == [stopped_at + 1, stopped_at + 2]


def test_too_many_nan_steps_stop_the_run_naming_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "gptscale.train", f"run_dir={run}", "train.steps=10", "checkpoint.interval=2",
         "train.inject_nan_steps=[3,4,5]", "train.max_bad_steps=2", "train.bad_step_window=10", *COMMON],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "step 3 skipped: loss nan" in proc.stderr and "(1 skipped in the last 10 steps, 1 in all)" in proc.stderr
    assert "stopping at step 5: 3 steps in the last 10 had a non-finite loss or gradient norm" in proc.stderr
    assert f"last good checkpoint: {step_dir(run, 4)}" in proc.stderr
    assert "Traceback" not in proc.stderr


def fingerprint(directory):
    return {name: describe_file(directory / name) for name in data_files(directory)}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A good checkpoint, copies of it truncated, corrupted and missing a shard, and one of another model."""
    tmp = tmp_path_factory.mktemp("damaged")
    run_jobs(1, [[*COMMON, f"run_dir={tmp / 'good'}", "train.steps=2"],
                 [*COMMON, f"run_dir={tmp / 'small'}", "train.steps=1", "model.num_layers=2"]], tmp)
    good = step_dir(tmp / "good", 2)
    cases = {}
    for name in ("truncated", "corrupted", "missing"):
        shutil.copytree(tmp / "good", tmp / name)
        shard = max((step_dir(tmp / name, 2) / "shards").glob("*.distcp"), key=lambda p: p.stat().st_size)
        data = shard.read_bytes()
        if name == "truncated":
            shard.write_bytes(data[:len(data) // 2])
        elif name == "corrupted":
            shard.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:])
        else:
            shard.unlink()
        cases[name] = (step_dir(tmp / name, 2), shard)
    cases["other-shape"] = (step_dir(tmp / "small", 1), step_dir(tmp / "small", 1) / "shards" / ".metadata")
    before = {name: fingerprint(path.parent.parent) for name, (path, _) in cases.items()}
    jobs = [[*COMMON, f"run_dir={path.parent.parent}", "train.steps=4"] if name == "corrupted"  # resume=auto
            else [*COMMON, f"run_dir={tmp / ('resume-' + name)}", "train.steps=4", f"checkpoint.resume={path}"]
            for name, (path, _) in cases.items()]
    results = run_errors(jobs, tmp)
    return tmp, good, cases, before, dict(zip(cases, results))


def run_errors(jobs, tmp):
    jobs_file, results_file = tmp / "error-jobs.json", tmp / "error-results.json"
    jobs_file.write_text(json.dumps(jobs))
    torchrun(1, ["tests/dist/resume_errors.py", str(jobs_file), str(results_file)], timeout=600)
    return json.loads(results_file.read_text())


@pytest.mark.parametrize("name, expected", [
    ("truncated", "is truncated or damaged"),
    ("corrupted", "is corrupted: its CRC-32 differs"),
    ("missing", "is missing"),
    ("other-shape", "holds another model"),
])
def test_bad_checkpoints_are_refused_naming_file_and_mismatch(damaged, name, expected):
    tmp, _, cases, before, errors = damaged
    path, culprit = cases[name]
    assert errors[name] is not None, f"{name}: the resume went through"
    assert expected in errors[name] and str(culprit) in errors[name], errors[name]
    if name == "other-shape":
        assert "decoder.layers.self_attention.linear_qkv.weight: global shape (2, 192, 64) in the checkpoint, " \
               "(4, 192, 64) in this model" in errors[name]
    assert fingerprint(path.parent.parent) == before[name], "a refused checkpoint's run directory was changed"
    assert not (tmp / f"resume-{name}" / "checkpoints").exists() or \
        not list((tmp / f"resume-{name}" / "checkpoints").iterdir()), "nothing is written after a refusal"


def test_inspect_command(damaged):
    _, good, cases, _, _ = damaged
    report = inspect(good)
    assert report.returncode == 0 and f"{good}: complete" in report.stdout and "tp 1, pp 1" in report.stdout
    report = inspect(cases["truncated"][0])
    assert report.returncode == 1 and "DAMAGED" in report.stdout and str(cases["truncated"][1]) in report.stdout
