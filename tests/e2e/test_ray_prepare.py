"""gptscale-prepare --executor ray on a local Ray cluster the command starts: the tokenizer trained in a Ray task,
then 2 Ray tasks, one of whose parts fails naming file and line; once the line is fixed the same command resumes
(keeping the parts already done), and the dataset equals one local task's."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from gptscale.data.prepare import main
from tests.helpers import REPO
from tests.unit.test_data_array import files_of
from tests.unit.test_data_prepare import TEXTS

BAD, FIXED = "{not json!!}", '{"text":"y"}'  # the same size: the plan of the re-run is the same


def run_on_ray(options, tmp_path):
    """The command with ``--executor ray --tasks 2``, on a local Ray cluster it starts and stops."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-")  # Ray's sockets: under tmp_path their path passes 107 bytes
    try:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "gptscale.data.prepare",
                *options,
                "--output",
                str(tmp_path / "ray"),
                "--executor",
                "ray",
                "--tasks",
                "2",
            ],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local", "RAY_TMPDIR": ray_tmp},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_two_ray_tasks_name_a_failure_resume_and_equal_one_local_task(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:105]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[105:]) + BAD + "\n")
    options = [
        "--input",
        str(tmp_path / "a.jsonl"),
        str(tmp_path / "b.jsonl"),
        "--vocab-size",
        "300",
        "--tokenizer-train-chars",
        "6k",
        "--shard-size",
        "2kB",
        "--part-size",
        "4kB",
    ]  # b's bad line: no sample
    proc = run_on_ray(options, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "training the tokenizer in a Ray task" in proc.stderr and "2 Ray tasks" in proc.stderr, proc.stderr
    assert "tasks 1 done, 0 running, 1 failed of 2" in proc.stderr, proc.stderr
    assert (
        re.search(
            r"gptscale-prepare: the merge refuses .*\n  part \d+ \(.*b.jsonl.*\) failed: .*b.jsonl:16: "
            "not JSON",
            proc.stderr,
        )
        and "Traceback" not in proc.stderr
    ), proc.stderr
    assert not (tmp_path / "ray").exists()

    (tmp_path / "b.jsonl").write_text((tmp_path / "b.jsonl").read_text().replace(BAD, FIXED))
    kept = {path.stat().st_ino for path in (tmp_path / ".ray.parts" / "parts").glob("part-*/*.tar")}
    assert kept
    resumed = run_on_ray(options, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the job" in resumed.stderr and "tasks 2 done, 0 running, 0 failed of 2" in resumed.stderr
    main([*options, "--output", str(tmp_path / "local"), "--tasks", "1", "--workers", "1", "--quiet"])
    assert kept < {path.stat().st_ino for path in (tmp_path / "ray").glob("*.tar")}  # the done parts' own shards
    assert len(files_of(tmp_path / "local")) > 4 and files_of(tmp_path / "local") == files_of(tmp_path / "ray")
