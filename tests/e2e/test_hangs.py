"""Hangs and in-job restarts with real processes (docs/faults.md).

One launch through launch/torchrun.sh, restarts allowed, meets in turn a rank frozen (SIGSTOP) mid-step, a rank
frozen in a checkpoint save, a rank frozen in an evaluation and a rank killed (SIGKILL). The watchdog names each
hang with its rank and phase and ends the attempt with the hang code (torchrun sees the killed rank itself);
torchrun kills the frozen rank and restarts the ranks, which resume from the newest complete checkpoint, and the
run completes with the losses of a run never interrupted. Without restarts, the launch exits with the hang code.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from gptscale.errors import HANG_EXIT_CODE
from tests.checkpoint_helpers import step_dir
from tests.faults import FAST_TIMEOUTS, launch_env
from tests.helpers import REPO, free_port

RUN = [
    "model=gpt2-tiny",
    "train.seq_len=32",
    "train.log_interval=1",
    "parallel.global_batch=8",
    "parallel.micro_batch=2",
    "optim.warmup_steps=2",
    "optim.decay_steps=10",
    "train.steps=10",
    "checkpoint.interval=2",
    "checkpoint.keep_last=0",
    "checkpoint.async_save=false",
    "train.eval_interval=4",
    "train.eval_batches=2",
]
FAULTS = [  # rank 1 each time; checkpoints every 2 steps, evaluations every 4
    {"at": "step", "step": 5, "rank": 1, "restart": 0},  # newest checkpoint: step 4
    {"at": "save", "step": 6, "rank": 1, "restart": 1},  # resumed from 4, frozen saving 6: 4 stays the newest
    {"at": "eval", "step": 8, "rank": 1, "restart": 2},  # resumed from 4, saved 6, frozen in the evaluation at 8
    {"at": "step", "step": 9, "rank": 1, "restart": 3, "signal": "SIGKILL"},  # resumed from 6, saved 8
]


def launch(run_dir, faults, *options):
    """launch/torchrun.sh with 2 ranks whose rank processes meet ``faults``; its exit status and output."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHON": sys.executable,
        "MASTER_PORT": str(free_port()),
        **launch_env(faults, str(REPO)),
    }
    proc = subprocess.run(
        ["launch/torchrun.sh", "--nproc-per-node", "2", *options, f"run_dir={run_dir}", *RUN, *FAST_TIMEOUTS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc.returncode, proc.stdout + proc.stderr


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def hang_reports(run_dir):
    return sorted(
        (json.loads(p.read_text()) for p in (run_dir / "faults").glob("hang-*.json")),
        key=lambda report: report["detected_at"],
    )


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """The run meeting FAULTS with 4 restarts allowed, and the same run never interrupted."""
    tmp = tmp_path_factory.mktemp("hangs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    straight = subprocess.Popen(  # beside it: the faulty run's processes wait much of the time
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            "-m",
            "gptscale.train",
            f"run_dir={tmp / 'straight'}",
            *RUN,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        status, output = launch(tmp / "run", FAULTS, "--max-restarts", "4")
        straight_output, _ = straight.communicate(timeout=600)
    finally:
        straight.kill()
    assert straight.returncode == 0, straight_output[-6000:]
    return tmp / "run", status, output, records(tmp / "straight" / "metrics.jsonl")


def test_each_hang_is_named_with_its_rank_phase_and_step_within_the_timeout(faulty):
    run_dir, status, output, _ = faulty
    assert status == 0, output[-6000:]
    reports = hang_reports(run_dir)
    assert [(r["ranks"], r["phase"], r["step"]) for r in reports] == [
        ([1], "step", 5),
        ([1], "checkpoint_save", 6),
        ([1], "eval", 8),
    ], output[-6000:]
    for report in reports:
        assert report["hosts"] == [socket.gethostname()] and report["detected_by"] == 0
        timeout = report["rank_states"]["0"]["timeout"]
        assert 0 < report["detected_at"] - report["last_progress_at"] <= timeout + 5, report
        assert report["rank_states"]["1"]["heartbeat"] == "silent"
        assert report["rank_states"]["0"]["heartbeat"] == "live"
        assert "distributed_c10d.py" in report["rank_states"]["0"]["doing"]  # waiting in a collective
        stacks = run_dir / report["stacks"]
        assert sorted(p.name for p in stacks.iterdir()) == ["rank0.txt"]  # the frozen rank cannot dump its own
        assert "Thread" in (stacks / "rank0.txt").read_text()
    assert f"stuck: rank 1 on {socket.gethostname()} (step 5, heartbeat silent)" in output


def test_the_ranks_are_restarted_and_resume_from_the_newest_complete_checkpoint(faulty):
    run_dir, _, output, _ = faulty
    starts = records(run_dir / "faults" / "starts.jsonl")
    assert [(s["restart"], s["checkpoint"]) for s in starts] == [
        (0, None),
        (1, "step_000004"),
        (2, "step_000004"),
        (3, "step_000006"),
        (4, "step_000008"),
    ]
    assert output.count("gptscale: restarting the ranks (restart") == 4
    assert f"gptscale: rank 1 on {socket.gethostname()} failed first (killed by SIGKILL)" in output
    for step in (4, 4, 6, 8):
        assert f"resumed from {step_dir(run_dir, step)}" in output


def test_a_rank_frozen_in_a_save_leaves_the_newest_complete_checkpoint_untouched(faulty):
    from gptscale.checkpoint.manifest import find_damage, read_manifest

    run_dir, _, output, _ = faulty
    assert output.count("deleted " + str(run_dir / "checkpoints" / "step_000006.tmp-")) == 1  # the frozen save
    newest = step_dir(run_dir, 4)
    manifest = read_manifest(newest)
    assert find_damage(newest, manifest, sorted(manifest["files"])) == []  # every file as its manifest says


def test_the_losses_equal_those_of_a_run_never_interrupted(faulty):
    run_dir, _, _, straight = faulty
    expected = {(r["step"], key): r[key] for r in straight for key in ("loss", "eval_loss") if key in r}
    seen = [
        ((r["step"], key), r[key])
        for r in records(run_dir / "metrics.jsonl")
        for key in ("loss", "eval_loss")
        if key in r
    ]
    assert {at for at, _ in seen} == set(expected)
    for at, value in seen:
        assert value == expected[at], f"{at}: {value} after restarts, {expected[at]} straight"


def test_rank_0_frozen_whole_ends_the_launch_with_the_hang_code_without_restarts(tmp_path):
    """Rank 0 hosts the job's store: frozen, it answers no heartbeat, and rank 1 judges alone."""
    status, output = launch(tmp_path / "run", [{"at": "step", "step": 5, "rank": 0}], "--max-restarts", "0")
    assert status == HANG_EXIT_CODE, output[-6000:]
    (report,) = hang_reports(tmp_path / "run")
    assert (report["ranks"], report["phase"], report["step"], report["detected_by"]) == ([0], "step", 5, 1)
    assert "store_unreachable" in report
    assert f"gptscale: rank 1 on {socket.gethostname()} failed first (exit code {HANG_EXIT_CODE})" in output
