"""Seconds to save and load a checkpoint with optimizer state, and how long training stalls for an async save.

    python tools/ckpt_bench.py model=gpt2-774m train.precision=bf16 parallel.zero=1      # one process
    torchrun --nproc_per_node=8 tools/ckpt_bench.py model=gpt2-774m parallel.zero=1      # a node

Trains two steps (Adam's state exists only after a step), then measures a synchronous save, an
asynchronous save (the stall: until training may go on; the total: until it is published, with training
steps running meanwhile) and a load at the same layout. Rank 0 prints one JSON line and deletes the run.
"""

import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from gptscale.config import load_config  # noqa: E402
from gptscale.train.trainer import Trainer  # noqa: E402


def main(overrides: list[str]) -> None:
    # An override run_dir=... picks the disk to measure (every rank must see it).
    cfg = load_config(
        [
            "run_dir=runs/ckpt-bench",
            "train.steps=1000",
            "train.eval_interval=0",
            "checkpoint.resume=none",
            "checkpoint.save_final=false",
            "checkpoint.keep_last=0",
            *overrides,
        ]
    )
    trainer = Trainer(cfg)
    checkpointer = trainer.checkpointer
    for _ in range(2):
        trainer.train_one_step()
    start = time.perf_counter()
    checkpointer.writer.queue, queue = None, checkpointer.writer.queue  # force a synchronous save
    checkpointer.save(trainer.step, trainer.progress.consumed_tokens)
    sync_save = time.perf_counter() - start
    checkpointer.writer.queue = queue

    step_start = time.perf_counter()
    trainer.train_one_step()
    step_seconds = time.perf_counter() - step_start
    async_stall, async_total, overlapped_steps = None, None, 0
    if queue is not None:
        start = time.perf_counter()
        checkpointer.save(trainer.step, trainer.progress.consumed_tokens)
        async_stall = time.perf_counter() - start
        while checkpointer.writer.pending():
            trainer.train_one_step()
            overlapped_steps += 1
            checkpointer.writer.poll()
        async_total = time.perf_counter() - start

    path = checkpointer.last_complete
    checkpointer.settings.resume = str(path)
    start = time.perf_counter()
    checkpointer.resume()
    load = time.perf_counter() - start
    if dist.get_rank() == 0:
        manifest = json.loads((path / "checkpoint.json").read_text())
        print(
            json.dumps(
                {
                    "model": cfg.model.name,
                    "world_size": trainer.layout.world_size,
                    "tp": trainer.layout.tp,
                    "pp": trainer.layout.pp,
                    "dp": trainer.layout.dp,
                    "zero": cfg.parallel.zero,
                    "precision": cfg.train.precision.value,
                    "device": str(trainer.device),
                    "checkpoint_gb": manifest["bytes"] / 1e9,
                    "step_s": step_seconds,
                    "sync_save_s": sync_save,
                    "async_stall_s": async_stall,
                    "async_total_s": async_total,
                    "steps_during_async_write": overlapped_steps,
                    "load_s": load,
                }
            )
        )
    trainer.close()
    if dist.get_rank() == 0:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
