"""A 2-rank run whose rank 1 is slowed on purpose (tests/e2e/slow_rank.py), killed with SIGKILL after a
checkpoint and a few more steps (a hang report written by the test stands for the detector that killed it),
then launched again in the same run directory: rank 1 is named as the straggler, and the run's goodput adds
up, with the killed attempt's steps after the checkpoint as lost work and the report's span as a hang."""

import json
import re
import socket
import statistics
import subprocess
import sys
import time

import psutil
import pytest

from gptscale.tracking.goodput import replay
from tests.e2e.test_launch import launcher_env, metrics, run_launcher, wait_for_step
from tests.helpers import REPO

JOB = [
    "train.steps=8",
    "train.log_interval=1",
    "train.eval_interval=0",
    "train.straggler.patience=2",
    "checkpoint.interval=4",
    "checkpoint.async_save=false",
    "parallel.micro_batch=2",
    "parallel.global_batch=8",
]


def slow_launch(run_dir, env, popen=False):
    command = [
        sys.executable,
        "-m",
        "gptscale.parallel.torchrun",
        "--standalone",
        "--nproc_per_node=2",
        "tests/e2e/slow_rank.py",
        f"run_dir={run_dir}",
        *JOB,
    ]
    return run_launcher(command, env, popen=popen)


@pytest.fixture(scope="module")
def killed_once(tmp_path_factory):
    """The run directory, both launches' output, the checkpoint step the second resumed from, the seconds from
    the first launch to the end of the second, and the hang report's span."""
    tmp_path = tmp_path_factory.mktemp("goodput")
    run_dir, env = tmp_path / "run", launcher_env(tmp_path)
    began = time.time()
    first = slow_launch(run_dir, env, popen=True)
    try:
        wait_for_step(run_dir, 6, first)  # the checkpoint of step 4 is complete (saved synchronously)
    finally:
        for process in [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]:
            process.kill()  # torchrun and both ranks (each in a session of its own) at once, as on a lost node
        first_output = first.communicate()[0]
    # The kill as a hang detector's: its report spans the last progress recorded to the kill.
    hang = {
        "last_progress_at": replay(run_dir).ended_at,
        "detected_at": time.time(),
        "ranks": [1],
        "hosts": [socket.gethostname()],
        "phase": "step",
        "step": 7,
    }
    (run_dir / "faults").mkdir(exist_ok=True)  # the watchdog keeps its record of starts there
    (run_dir / "faults" / "hang-test.json").write_text(json.dumps(hang))
    second = slow_launch(run_dir, env)
    elapsed = time.time() - began
    assert second.returncode == 0, second.stdout[-5000:] + second.stderr[-5000:]
    resumed = int(re.search(r"resumed from \S+ \(step (\d+),", second.stderr).group(1))
    return run_dir, first_output, second.stderr, resumed, elapsed, hang["detected_at"] - hang["last_progress_at"]


def goodput(run_dir, *options):
    proc = subprocess.run(
        [sys.executable, "-m", "gptscale.tracking.goodput", str(run_dir), *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_slowed_rank_is_named_as_the_straggler(killed_once):
    run_dir, first_output, second_output, resumed, _, _ = killed_once
    host = socket.gethostname()
    assert f"straggler: rank 1 on {host} is " in first_output and f"straggler: rank 1 on {host} is " in second_output
    assert "straggler: rank 0" not in first_output + second_output
    logged = [record for record in metrics(run_dir) if "loss" in record]
    second_launch = next(index for index in range(1, len(logged)) if logged[index]["step"] <= logged[index - 1]["step"])
    assert logged[second_launch]["step"] == resumed + 1
    for launch in (logged[:second_launch], logged[second_launch:]):
        # The first log step holds each rank's one-time warm-up, which can hide the slowed rank; from the
        # second on, rank 1 is the slowest, and named once slow for train.straggler.patience=2 intervals.
        assert all(r["straggler/slowest_rank"] == 1 and r["straggler/slowest_ratio"] > 1.5 for r in launch[1:])
        named = [index for index, record in enumerate(launch) if "straggler/ranks" in record]
        assert named == list(range(named[0], len(launch))) and named[0] in (1, 2)  # by the third log step
        assert all(
            (launch[index]["straggler/ranks"], launch[index]["straggler/hosts"]) == ([1], [host]) for index in named
        )


def test_goodput_of_the_killed_and_restarted_run_adds_up(killed_once):
    run_dir, _, _, resumed, elapsed, hung = killed_once
    report = json.loads(goodput(run_dir, "--json"))
    first, second = report["attempts"]
    assert (first["resumed_from"], first["finished"], second["resumed_from"], second["finished"]) == (
        None,
        False,
        resumed,
        True,
    )
    assert (second["first_step"], second["last_step"]) == (resumed + 1, 8)
    parts, wall = report["parts_s"], report["wall_s"]
    assert sum(parts.values()) == pytest.approx(wall, rel=0.01)
    assert elapsed - 45 < wall < elapsed  # from rank 0's start to its last record, inside the test's clock
    assert report["lost_steps"] == first["last_step"] - resumed >= 1
    assert report["kept_steps"] == 8
    assert min(parts["startup"], parts["checkpoint"], parts["down"]) > 0 and parts["eval"] == 0
    assert parts["hang"] == pytest.approx(hung)

    # The lost part is the killed attempt's time on the steps trained again: each took a step's time, which
    # the slowed rank's 0.5 s of sleep per step dominates.
    records = [json.loads(line) for line in (run_dir / "goodput.jsonl").read_text().splitlines()]
    second_start = max(index for index, record in enumerate(records) if record["phase"] == "start")
    attempt = records[second_start:]
    second_steps = [
        after["end"] - before["end"]
        for before, after in zip(attempt, attempt[1:])
        if before["phase"] == "step" == after["phase"]
    ]
    assert parts["lost"] == pytest.approx(report["lost_steps"] * statistics.median(second_steps), rel=0.25)


def test_goodput_summary_and_plot_of_the_run(killed_once, tmp_path):
    run_dir, _, second_output, resumed, _, _ = killed_once
    text = goodput(run_dir)
    report = json.loads(goodput(run_dir, "--json"))
    lines = text.splitlines()
    assert lines[0].startswith(f"{run_dir}: wall time ") and " over 2 attempt(s), goodput " in lines[0]
    assert lines[2].startswith("  lost: steps trained again") and lines[2].endswith(f"{report['lost_steps']} steps")
    assert f"from scratch, steps 1-{report['attempts'][0]['last_step']}, ended without finishing" in lines[-2]
    assert f"resumed from step {resumed}, steps {resumed + 1}-8, finished" in lines[-1]
    assert re.search(r"run ended at step 8/8 \|.*\| goodput \d+\.\d%", second_output)
    final = metrics(run_dir)[-1]
    assert (
        final["goodput/lost_s"] > 0
        and final["goodput/hang_s"] > 0
        and final["goodput"] == pytest.approx(final["goodput/productive_s"] / final["goodput/wall_s"])
    )

    out = tmp_path / "curves.png"
    proc = subprocess.run(
        [sys.executable, "-m", "gptscale.tracking.plot", str(run_dir), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
