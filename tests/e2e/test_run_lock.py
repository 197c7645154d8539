"""Two runs in one run_dir: the second is refused while the first trains, and a killed run's lock is taken over.

Three launches: a long run in the background, a two-rank run refused beside it, and after the first is
SIGKILLed, a short run that takes its lock over.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from tests.helpers import REPO, torchrun

COMMON = [
    "model=gpt2-tiny",
    "train.seq_len=32",
    "train.eval_interval=0",
    "train.log_interval=1",
    "parallel.global_batch=8",
    "parallel.micro_batch=2",
    "data.embedded_max_bytes=200000",
    "checkpoint.save_final=false",
]


def wait_for_training(proc, log_path, timeout=300):
    """Return once the background run has logged a training step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-4000:]
        if "| loss" in log_path.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"no training step logged in {timeout} s:\n{log_path.read_text()[-4000:]}")


def test_second_run_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    run_dir = (tmp_path / "run").resolve()
    log_path = tmp_path / "first.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log_path, "w") as output:
        first = subprocess.Popen(
            [sys.executable, "-m", "gptscale.train", f"run_dir={run_dir}", "train.steps=100000", *COMMON],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_training(first, log_path)
        lines_before = len((run_dir / "metrics.jsonl").read_text().splitlines())

        temporary = tmp_path / "tmp"  # the launch's temporary files: the refusal leaves none of gptscale's
        temporary.mkdir()
        second = torchrun(
            2,
            ["-m", "gptscale.train", f"run_dir={run_dir}", "train.steps=3", *COMMON],
            check=False,
            timeout=300,
            env={"TMPDIR": str(temporary)},
        )
        output = second.stdout + second.stderr
        assert second.returncode != 0, output[-4000:]
        holder = f"pid {first.pid} on host {socket.gethostname()}"
        assert f"run_dir {run_dir} is in use by another training run: {holder}, started " in output, output[-4000:]
        assert output.count("is in use by another training run") == 1, output[-4000:]  # both ranks stop, one says why
        assert "| loss" not in output, output[-4000:]
        assert "RunDirInUse" not in output, output[-4000:]  # a message, not a traceback (torchrun adds its own)
        assert not list(temporary.glob("gptscale-*")), list(temporary.iterdir())
        assert first.poll() is None  # the first run trains on, its metrics untouched by the refused one
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len(records) >= lines_before and [r["step"] for r in records] == list(range(1, len(records) + 1))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    third = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptscale.train",
            f"run_dir={run_dir}",
            "train.steps=2",
            "checkpoint.resume=none",
            *COMMON,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert third.returncode == 0, third.stderr[-4000:]
    assert (
        f"taking over {run_dir / '.lock'} from a run that ended without releasing it: pid {first.pid} on host "
        f"{socket.gethostname()}"
    ) in third.stderr, third.stderr[-4000:]
    assert "step 2/2 | loss" in third.stderr
    assert (run_dir / ".lock").read_text() == ""  # released at the end: the next run starts without a warning
