"""gptscale-prepare --executor slurm on a real one-node SLURM cluster: a 2-task job array (tokenizer trained in
its own job first) gives the same dataset as one local task."""

import json
import re
import subprocess
import sys

from tokenizers import Tokenizer, models

from tests.helpers import REPO
from tests.unit.test_data_prepare import TEXTS


def test_two_task_array_equals_one_local_task(cluster, tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    options = ["--input", str(tmp_path / "a.jsonl"), "--vocab-size", "300", "--shard-size", "2kB", "--part-size", "4kB"]
    env = {**cluster.env, "PYTHONPATH": str(REPO)}
    array = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptscale.data.prepare",
            *options,
            "--output",
            str(tmp_path / "slurm"),
            "--executor",
            "slurm",
            "--tasks",
            "2",
            "--slurm-time",
            "10",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert array.returncode == 0, array.stderr + cluster.logs()
    assert "training the tokenizer in SLURM job" in array.stderr and "submitted SLURM job array" in array.stderr
    assert "tasks 2 done, 0 running, 0 failed of 2" in array.stderr
    local = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptscale.data.prepare",
            *options,
            "--output",
            str(tmp_path / "local"),
            "--tasks",
            "1",
            "--workers",
            "1",
            "--quiet",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert local.returncode == 0, local.stderr
    files = {path.name: path.read_bytes() for path in (tmp_path / "local").iterdir()}
    assert len(files) > 4 and files == {path.name: path.read_bytes() for path in (tmp_path / "slurm").iterdir()}


def test_failed_array_task_names_file_and_line_and_publishes_nothing(cluster, tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:40]))
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{not json\n')
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptscale.data.prepare",
            "--input",
            str(tmp_path / "a.jsonl"),
            str(tmp_path / "b.jsonl"),
            "--tokenizer",
            str(tokenizer),
            "--output",
            str(tmp_path / "out"),
            "--executor",
            "slurm",
            "--tasks",
            "2",
            "--slurm-time",
            "10",
        ],
        cwd=tmp_path,
        env={**cluster.env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1 and "tasks 1 done, 0 running, 1 failed of 2" in proc.stderr, proc.stderr
    assert (
        re.search(
            r"gptscale-prepare: the merge refuses .*\n  part 1 \(.*b.jsonl\) failed: .*b.jsonl:2: not JSON", proc.stderr
        )
        and "Traceback" not in proc.stderr
    )
    assert not (tmp_path / "out").exists()
