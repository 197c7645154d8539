"""Trains one step per layout and writes, per rank, where the rank sits, the bytes of model states it holds
the bytes autograd saves in one micro-batch's forward through its chunks, and the most it holds at once
during the step (neither under ZeRO-3, whose gathered weights would count as saved tensors).

Usage: torchrun --nproc_per_node=N tests/dist/run_plan.py JOBS.json RESULTS_PREFIX
"""

import json
import sys
import weakref

import torch
import torch.distributed as dist

from gptscale.config import load_config
from gptscale.plan.activations import _storage_key, forward_saved_bytes
from gptscale.plan.held import gradient_storages, held_bytes
from gptscale.train.trainer import Trainer


class LiveSavedBytes:
    """The peak, inside the ``with`` block, of the bytes autograd holds for backward at once (each storage
    once while any graph still holds it, weights left out): what a pipeline schedule's in-flight
    micro-batches keep alive. Tests hold the schedule's in-flight prediction to it in a real step."""

    def __init__(self, weights=()):
        self.weights = {_storage_key(w) for w in weights}
        self.holders: dict[int, int] = {}
        self.live = self.peak = 0

    def _pack(self, tensor: torch.Tensor):
        key = _storage_key(tensor)
        if key in self.weights:
            return tensor
        if key not in self.holders:
            self.holders[key] = 0
            self.live += tensor.untyped_storage().nbytes()
            self.peak = max(self.peak, self.live)
        self.holders[key] += 1
        holder = _Held(tensor)
        weakref.finalize(holder, self._release, key, tensor.untyped_storage().nbytes())
        return holder

    def _release(self, key: int, nbytes: int) -> None:
        self.holders[key] -= 1
        if not self.holders[key]:
            del self.holders[key]
            self.live -= nbytes

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _Held:
    """What autograd keeps instead of a saved tensor, so that its release can be seen."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _unpack(saved):
    return saved.tensor if isinstance(saved, _Held) else saved


def measure(overrides: list[str]) -> dict:
    cfg = load_config(overrides)
    trainer = Trainer(cfg)
    try:
        optimizer, recorded = trainer.engine.optimizer, {}
        trainer.engine.before_next_update(lambda: recorded.update(gradient_storages(trainer.model, optimizer)))
        with LiveSavedBytes(trainer.model.parameters()) as live:  # ZeRO-3 gathers weights: not comparable
            trainer.fit()
        held = held_bytes(trainer.model, optimizer, recorded)
        saved = None
        if cfg.parallel.zero < 3:
            tokens = next(trainer.data.train)["tokens"].to(trainer.device)
            saved = sum(
                forward_saved_bytes(
                    chunk, cfg.parallel.micro_batch, cfg.train.seq_len, trainer.data.vocab_size, trainer.device, tokens
                )
                for chunk in trainer.model.chunks
            )
        return {
            "overrides": overrides,
            "vocab_size": trainer.data.vocab_size,
            "world_size": dist.get_world_size(),
            "pp_rank": trainer.ctx.pp_rank,
            "ep_rank": trainer.ctx.ep_rank,
            "dp_rank": trainer.engine.deepspeed.mpu.get_data_parallel_rank(),
            "held": vars(held),
            "saved": saved,
            "peak_saved": live.peak if cfg.parallel.zero < 3 else None,
        }
    finally:
        trainer.close()


def main(jobs_path: str, results_prefix: str) -> None:
    results = [measure(overrides) for overrides in json.load(open(jobs_path))]
    json.dump(results, open(f"{results_prefix}.{dist.get_rank()}.json", "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
