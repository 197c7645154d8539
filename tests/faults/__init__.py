"""Fault injection for tests, never in the product: NaN losses, and a rank that freezes (SIGSTOP) or dies
(SIGKILL) at a chosen point, by patching gptscale inside the rank's own process.

A process that runs ``Trainer`` itself (tests/dist/run_*.py) uses ``injected``. The ranks of a real launch
(launch/torchrun.sh, slurm.sbatch, ``torchrun -m gptscale.train``) get theirs from ``launch_env``: tests/faults/site
on PYTHONPATH, whose sitecustomize.py installs the faults of GPTSCALE_TEST_FAULTS in each rank.

A fault: ``{"at": "step" | "eval" | "save" | "manifest", "step": N, "rank": R, "signal": "SIGSTOP" | "SIGKILL",
"restart": K}``: rank R sends itself the signal in step N (after its forward and backward), in the evaluation
after step N (after its first batch), in the save of step N (before the shards are written) or in the publishing
of step N's checkpoint (after every file but the manifest), in the K-th restart of its launch (default 0).
"""

from __future__ import annotations

import json
import math
import os
import signal
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator
from unittest import mock

import torch

FAULTS_ENV = "GPTSCALE_TEST_FAULTS"
SITE = Path(__file__).resolve().parent / "site"
NAN_STEPS = "test.nan_steps="  # a test-only override of tests/dist/run_*.py: these steps get a NaN loss
# Watchdog timeouts for tiny steps on a busy machine: steps learned after 2, at least 5 s; heartbeats every 0.25 s.
FAST_TIMEOUTS = [
    "fault.heartbeat_s=0.25",
    "fault.step_warmup=2",
    "fault.step_timeout_floor_s=5",
    "fault.step_timeout_s=60",
    "fault.setup_timeout_s=300",
    "fault.checkpoint_timeout_s=15",
    "fault.eval_timeout_s=15",
    "fault.data_timeout_s=60",
    "fault.collective_timeout_s=330",
]


def launch_env(faults: list[dict], pythonpath: str = "") -> dict:
    """The environment that gives the ranks of a launch ``faults``."""
    return {FAULTS_ENV: json.dumps(faults), "PYTHONPATH": os.pathsep.join(p for p in (str(SITE), pythonpath) if p)}


def split_overrides(overrides: list[str]) -> tuple[list[str], list[int]]:
    """The Hydra overrides, and the steps a ``test.nan_steps=[...]`` item asks NaN losses for."""
    nan_steps = [
        step for item in overrides if item.startswith(NAN_STEPS) for step in json.loads(item[len(NAN_STEPS) :])
    ]
    return [item for item in overrides if not item.startswith(NAN_STEPS)], nan_steps


def with_nan_loss(batches: Iterator[dict]) -> Iterator[dict]:
    """A NaN loss mask makes the step's loss and gradients NaN."""
    for batch in batches:
        yield {**batch, "loss_mask": torch.full_like(batch["loss_mask"], math.nan)}


@contextmanager
def injected(faults: list[dict] = (), nan_steps: list[int] = ()):
    """``faults`` of this rank and restart, and NaN losses in ``nan_steps``, while inside."""
    from gptscale.checkpoint import checkpointer, save
    from gptscale.train import step as step_module
    from gptscale.train import trainer

    rank, restart = int(os.environ.get("RANK", "0")), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    pending = {
        (f["at"], f["step"]): getattr(signal, f.get("signal", "SIGSTOP"))
        for f in faults
        if f["rank"] == rank and f.get("restart", 0) == restart
    }
    where = {"phase": None, "step": 0, "losses": 0}

    def hit(at: str, step: int) -> None:
        signum = pending.pop((at, step), None)
        if signum is not None:
            os.kill(os.getpid(), signum)

    def within(phase, method, step_of):
        def run(self, *args, **kwargs):
            where.update(phase=phase, step=step_of(self), losses=0)
            try:
                return method(self, *args, **kwargs)
            finally:
                where["phase"] = None

        return run

    def global_loss(*args, **kwargs):
        where["losses"] += 1
        if where["phase"] == "step" or where["losses"] == 2:
            hit(where["phase"], where["step"])
        return real_global_loss(*args, **kwargs)

    def train_step(engine, model, batches, *args, **kwargs):
        if where["step"] in nan_steps:
            batches = with_nan_loss(batches)
        return real_train_step(engine, model, batches, *args, **kwargs)

    def write_shards(state, target, strategy):
        hit("save", target.step)
        return real_write_shards(state, target, strategy)

    def write_manifest(directory, manifest):
        hit("manifest", manifest["step"])
        return real_write_manifest(directory, manifest)

    real_global_loss, real_train_step = step_module._global_loss, trainer.train_step
    real_write_shards, real_write_manifest = checkpointer.write_shards, save.write_manifest
    Trainer = trainer.Trainer
    with ExitStack() as patches:
        for target, name, value in [
            (Trainer, "train_one_step", within("step", Trainer.train_one_step, lambda self: self.step + 1)),
            (Trainer, "evaluate", within("eval", Trainer.evaluate, lambda self: self.step)),
            (step_module, "_global_loss", global_loss),
            (trainer, "train_step", train_step),
            (checkpointer, "write_shards", write_shards),
            (save, "write_manifest", write_manifest),
        ]:
            patches.enter_context(mock.patch.object(target, name, value))
        yield
