"""Launching real multi-process runs from tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    nprocs: int, args: list[str], timeout: float = 900, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run`` with ``nprocs`` CPU ranks; raise with the output on failure."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nprocs}",
        f"--master_port={free_port()}",
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def run_jobs(nprocs: int, jobs: list[list[str]], tmp_path: Path, timeout: float = 1200) -> list[dict]:
    """Train each override list in turn in one ``nprocs``-rank launch; per job, every step's loss and grad norm."""
    jobs_file, results_file = tmp_path / f"jobs{nprocs}.json", tmp_path / f"results{nprocs}.json"
    jobs_file.write_text(json.dumps(jobs))
    torchrun(nprocs, ["tests/dist/run_jobs.py", str(jobs_file), str(results_file)], timeout=timeout)
    return json.loads(results_file.read_text())


class Curves:
    """``Trainer.fit(on_step=...)``: every step's loss, gradient norm and router aux loss as plain floats, in
    step order; a step trained again after a rewind replaces the abandoned ones from there on."""

    def __init__(self):
        self.by_step: dict[int, tuple[float, float, float]] = {}

    def __call__(self, step, result) -> None:
        for later in [s for s in self.by_step if s >= step]:
            del self.by_step[later]
        self.by_step[step] = (
            result.loss.item(),
            float("nan") if result.grad_norm is None else result.grad_norm.item(),
            0.0 if result.aux is None else result.aux.item(),
        )

    def lists(self) -> dict[str, list[float]]:
        rows = [self.by_step[step] for step in sorted(self.by_step)]
        return {"loss": [r[0] for r in rows], "grad_norm": [r[1] for r in rows], "aux_loss": [r[2] for r in rows]}
