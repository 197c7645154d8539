"""Goodput's accounting (gptscale/tracking/goodput.py) on records whose times the test chooses; the real
killed-and-restarted run is in tests/e2e/test_goodput.py."""

import json
import os
import subprocess
import sys
import time

import pytest

from gptscale.tracking.goodput import GOODPUT, GoodputLog, replay
from tests.helpers import REPO


def write_run(run_dir, records, tail=""):
    (run_dir / GOODPUT).write_text("".join(json.dumps(record) + "\n" for record in records) + tail)


def step(number, end, phase="step", **extra):
    return {"phase": phase, "step": number, "end": end, **extra}


# Attempt 1 trains steps 1-6 (1 s each, a 0.5 s save stall at step 4) and hangs; the hang is detected 13.5 s
# after its last progress and the job restarts 10 s later; attempt 2 resumes from step 4, trains steps 5-7 again
# with an evaluation and a final save.
KILLED_ONCE = [
    {"phase": "start", "at": 100.0, "host": "node1"},
    {"phase": "startup", "end": 110.0, "resumed": None},
    step(1, 111.0),
    step(2, 112.0),
    step(3, 113.0),
    step(4, 114.0),
    step(4, 114.5, "checkpoint"),
    step(5, 115.5),
    step(6, 116.5),
    {"phase": "start", "at": 140.0, "host": "node2"},
    {"phase": "startup", "end": 145.0, "resumed": 4},
    step(5, 146.0),
    step(6, 147.0),
    step(6, 148.0, "eval"),
    step(7, 149.0),
    step(7, 150.0, "checkpoint", finished=True),
]


def test_parts_of_a_run_killed_once_add_up_to_its_wall_time(tmp_path):
    write_run(tmp_path, KILLED_ONCE[:9], tail='{"phase": "step", "st')  # attempt 1's last line cut short
    with open(tmp_path / GOODPUT, "a") as file:  # whole JSON, but no record: skipped too
        file.write('\n{"phase": "step", "step": 7}\n["end", 117.5]')
    (tmp_path / "faults").mkdir()
    (tmp_path / "faults" / "hang-1.json").write_text(
        json.dumps(
            {
                "detected_at": 130.0,
                "last_progress_at": 116.5,
                "ranks": [1],
                "hosts": ["node1"],
                "phase": "step",
                "step": 7,
            }
        )
    )
    goodput = replay(tmp_path)
    assert goodput.wall == 30.0  # until the hang's detection: no record after it yet
    assert goodput.parts() == {
        "productive": 6.0,
        "lost": 0.0,
        "startup": 10.0,
        "checkpoint": 0.5,
        "eval": 0.0,
        "hang": 13.5,
        "down": 0.0,
    }

    with open(tmp_path / GOODPUT, "a") as file:  # what attempt 2 appends after ending the cut line
        file.write("\n" + "".join(json.dumps(record) + "\n" for record in KILLED_ONCE[9:]))
    goodput = replay(tmp_path)
    parts = goodput.parts()
    assert parts == {
        "productive": 7.0,
        "lost": 2.0,
        "startup": 15.0,
        "checkpoint": 1.5,
        "eval": 1.0,
        "hang": 13.5,
        "down": 10.0,
    }
    assert sum(parts.values()) == goodput.wall == 50.0
    assert (goodput.lost_steps, len(goodput.kept)) == (2, 7)
    assert [(a.host, a.resumed_from, a.first_step, a.last_step, a.finished) for a in goodput.attempts] == [
        ("node1", None, 1, 6, False),
        ("node2", 4, 5, 7, True),
    ]
    assert goodput.metrics()["goodput"] == pytest.approx(7.0 / 50.0)


def test_steps_trained_again_after_a_rewind_or_a_fresh_start_are_lost(tmp_path):
    records = [
        {"phase": "start", "at": 0.0},
        {"phase": "startup", "end": 1.0, "resumed": None},
        step(1, 2.0),
        step(2, 3.0),
        step(3, 5.0),
        step(2, 6.0),
        step(3, 7.0),  # a rewind to step 1
        {"phase": "start", "at": 10.0},
        {"phase": "startup", "end": 11.0, "resumed": None},  # resume=none
        step(1, 13.0),
    ]
    write_run(tmp_path, records)
    goodput = replay(tmp_path)
    assert goodput.parts()["lost"] == 1.0 + 2.0 + 1.0 + 1.0 + 1.0  # steps 2, 3, then 1, 2, 3 of the second try
    assert goodput.parts()["productive"] == 2.0 and goodput.lost_steps == 5
    assert sum(goodput.parts().values()) == goodput.wall == 13.0


def test_a_new_attempt_ends_a_cut_line_before_appending(tmp_path):
    write_run(tmp_path, KILLED_ONCE[:4], tail='{"phase": "step", "step": 3, "e')
    log = GoodputLog(tmp_path, writes=True)
    log.started(resumed=2)
    log.mark("step", 3)
    log.close()
    lines = (tmp_path / GOODPUT).read_text().splitlines()
    assert lines[4] == '{"phase": "step", "step": 3, "e'
    assert [json.loads(line)["phase"] for line in lines[5:]] == ["start", "startup", "step"]
    goodput = replay(tmp_path)
    assert [a.resumed_from for a in goodput.attempts] == [None, 2]
    assert log.goodput.parts() == goodput.parts()
    assert goodput.parts()["productive"] > 2.0  # steps 1, 2 and this process's step 3


def test_a_later_run_in_the_same_process_starts_when_it_is_set_up(tmp_path):
    """A local sweep runs its jobs one after the other in one process: only the first counts the imports."""
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        created = time.time()
        GoodputLog(tmp_path / name, writes=True).close()
    assert replay(tmp_path / "second").started_at >= created > replay(tmp_path / "first").started_at


def test_an_attempt_starts_when_its_process_started_to_the_clock_tick(tmp_path):
    """Not up to a second early, as psutil's create_time is (the boot time it adds is in whole seconds): an
    attempt launched right after a kill would seem to start before it, and its down time would vanish."""
    code = "from pathlib import Path; from gptscale.tracking.goodput import GoodputLog; GoodputLog(Path({!r}), True)"
    launched = time.time()
    subprocess.run([sys.executable, "-c", code.format(str(tmp_path))], cwd=REPO, check=True, timeout=120)
    tick = 1 / os.sysconf("SC_CLK_TCK")  # the boot clock's start is counted in ticks, rounded down
    assert launched - tick <= replay(tmp_path).started_at <= launched + 5


def test_summary_command(tmp_path):
    write_run(tmp_path, KILLED_ONCE)
    proc = subprocess.run(
        [sys.executable, "-m", "gptscale.tracking.goodput", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{tmp_path}: wall time 0m50s over 2 attempt(s), goodput 14.0% (productive training / wall time)"
    assert lines[1].split() == ["productive", "training", "7.0", "s", "14.0%", "7", "steps"]
    assert lines[2].split()[-5:] == ["2.0", "s", "4.0%", "2", "steps"]
    assert "resumed from step 4, steps 5-7, finished" in lines[-1]
    proc = subprocess.run(
        [sys.executable, "-m", "gptscale.tracking.goodput", str(tmp_path / "none")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "no goodput.jsonl in" in proc.stderr
