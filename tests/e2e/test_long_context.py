"""docs/long-context.md's recipe as written, shrunk: a checkpoint trained at a short context continues at 4x
the length with YaRN, from its weights."""

import json
import re
import shlex
import subprocess
import sys

from gptscale.checkpoint.files import read_config
from tests.helpers import REPO

SHRUNK = {"2048": "128", "8192": "512"}  # the recipe's context lengths, at sizes a test affords


def recipe() -> list[list[str]]:
    """The gptscale-train commands of the recipe's code block, continuations joined, lengths shrunk."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "docs" / "long-context.md").read_text(), re.S).group(1)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.startswith("gptscale-train")]
    return [
        [re.sub(r"=(2048|8192)$", lambda m: "=" + SHRUNK[m.group(1)], word) for word in shlex.split(line)[1:]]
        for line in lines
    ]


def train(args: list[str], run_dir, steps: int) -> list[dict]:
    """Run ``args`` with its run directory, step count and batch replaced; the metrics it logged."""
    args = [word for word in args if not word.startswith(("run_dir=", "train.steps=", "parallel.global_batch="))]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptscale.train",
            *args,
            f"run_dir={run_dir}",
            f"train.steps={steps}",
            "train.log_interval=1",
            "parallel.global_batch=4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_short_context_checkpoint_continues_at_four_times_the_length_with_yarn(tmp_path):
    short, long = recipe()
    assert "task.init=runs/ctx2k" in long and "model.rope_scaling.type=yarn" in long
    first = [r["loss"] for r in train(short, tmp_path / "short", steps=20) if "loss" in r]
    long = [f"task.init={tmp_path / 'short'}" if word.startswith("task.init=") else word for word in long]
    second = [r["loss"] for r in train(long, tmp_path / "long", steps=2) if "loss" in r]
    assert first[-1] < first[0] - 0.3  # the short run learned something ...
    assert second[0] < first[0] - 0.3  # ... and the long one starts from it, not from a fresh initialisation
    saved = read_config(tmp_path / "long" / "checkpoints" / "step_000002")
    assert saved.model.max_position_embeddings == 512 and saved.train.seq_len == 512
    scaling = saved.model.rope_scaling
    assert (scaling.type.value, scaling.factor, scaling.original_max_position_embeddings) == ("yarn", 4.0, 128)
