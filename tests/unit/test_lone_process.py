"""A process started without a launcher forms its own group and leaves the environment as it found it (processes
it starts, a SLURM job submitted from it, must not take themselves for ranks); ZeRO-3 trains there too."""

import os
import subprocess
import sys

from tests.helpers import REPO

SCRIPT = """
import os, torch
from gptscale.parallel.groups import init_distributed
init_distributed(torch.device("cpu"))
import torch.distributed as dist
assert dist.get_world_size() == 1 and dist.get_rank() == 0
print(sorted(k for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR") if k in os.environ))
"""


def test_lone_process_sets_no_rank_variables():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


ZERO3 = """
import os, sys
from gptscale.config import load_config
from gptscale.train.trainer import Trainer
trainer = Trainer(load_config([f"run_dir={sys.argv[1]}", "parallel.zero=3", "train.steps=2", "train.seq_len=64",
                               "checkpoint.save_final=false", "checkpoint.resume=none"]))
losses = []
trainer.fit(on_step=lambda step, result: losses.append(result.loss.item()))
trainer.close()
print(len(losses), "LOCAL_RANK" in os.environ)
"""


def test_lone_process_trains_with_zero3_and_unsets_local_rank_after(tmp_path):
    """DeepSpeed's ZeRO-3 reads LOCAL_RANK at every step: set while the trainer lives, gone once it closes."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    proc = subprocess.run(
        [sys.executable, "-c", ZERO3, str(tmp_path)],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "2 False"
