"""gptscale-prepare --executor ray on a local Ray cluster the command starts: the tokenizer trained in a Ray task,
then 2 Ray tasks, one of whose parts fails naming file and line; once the line is fixed a re-run (local: resuming
is the same for every executor) keeps the Ray tasks' parts, and the dataset equals one local task's."""

import json
import logging
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


def test_two_ray_tasks_name_a_failure_resume_and_equal_one_local_task(tmp_path, caplog):
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
    ray_tmp = tempfile.mkdtemp(prefix="ray-")  # Ray's sockets: under tmp_path their path passes 107 bytes
    try:
        proc = subprocess.run(
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
    with caplog.at_level(logging.INFO, logger="gptscale"):
        main([*options, "--output", str(tmp_path / "ray"), "--tasks", "2", "--workers", "1", "--quiet"])
    assert "resuming the job" in caplog.text
    main([*options, "--output", str(tmp_path / "local"), "--tasks", "1", "--workers", "1", "--quiet"])
    assert len(files_of(tmp_path / "local")) > 4 and files_of(tmp_path / "local") == files_of(tmp_path / "ray")
