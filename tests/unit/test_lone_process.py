"""A process started without a launcher forms its own group and leaves the environment as it found it."""

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
    assert proc.stdout.strip().splitlines()[-1] == "[]"
