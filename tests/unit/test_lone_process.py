"""A process started without a launcher forms its own group and sets none of the variables that make a process a
rank of a job (LOCAL_RANK=0 alone, which DeepSpeed's ZeRO-3 reads, makes no one a rank); ZeRO-3 then trains."""

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
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "['LOCAL_RANK']"


def test_lone_process_trains_with_zero3(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, "-m", "gptscale.train", f"run_dir={tmp_path}", "parallel.zero=3",
                           "train.steps=2", "train.seq_len=64", "checkpoint.save_final=false"], cwd=REPO,
                          env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2 | loss" in proc.stderr
