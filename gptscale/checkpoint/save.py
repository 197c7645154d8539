"""One save, run by every rank: stage a directory, snapshot, write, and publish once every rank has written.

The tensor part goes through megatron-core's ``dist_checkpointing.save`` with its torch_dist strategy
(PyTorch DCP files; with data parallelism, megatron-core's fully parallel wrapper spreads the writing of
replicated shards over data-parallel ranks). It returns a request whose writes run now or in the
background; publishing is appended to the request's finalize steps, which megatron-core runs on all ranks
only after every rank's writes are done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

from gptscale.checkpoint.files import RANKS, SHARDS
from gptscale.checkpoint.manifest import data_files, describe_file, write_manifest
from gptscale.checkpoint.publish import new_nonce, prune, publish, staging_dir, step_name

log = logging.getLogger("gptscale")


@dataclass
class SaveTarget:
    step: int
    staging: Path  # where ranks write
    final: Path  # the name it is published under


def sharded_strategy(replicas: int):
    """torch_dist (PyTorch DCP); shards replicated over ``replicas`` data- and context-parallel ranks written by
    all of them in turn, not by one (megatron-core numbers their replicas over both)."""
    strategy = get_default_save_sharded_strategy()
    if replicas == 1:
        return strategy
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelSaveStrategyWrapper(strategy, group, do_cache_distribution=True)


def stage(root: Path, step: int) -> SaveTarget:
    """A fresh staging directory for ``step``, the same on every rank (collective)."""
    nonce = [new_nonce() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(nonce, src=0)
    target = SaveTarget(step, staging_dir(root, step, nonce[0]), root / step_name(step))
    if dist.get_rank() == 0:
        for sub in (SHARDS, RANKS):
            (target.staging / sub).mkdir(parents=True)
    dist.barrier()
    return target


def write_shards(state: dict, target: SaveTarget, strategy) -> AsyncRequest:
    """Start megatron-core's save; the returned request performs the writes and then its finalize steps."""
    return dist_checkpointing.save(
        state, str(target.staging / SHARDS), sharded_strategy=strategy, async_sharded_save=True
    )


def publisher(
    target: SaveTarget, manifest: dict, keep_last: int, keep_every: int, on_published: Callable[[Path], None]
) -> Callable[[], None]:
    """The finalize step (all ranks, after every write): checksum the files in parallel, write the manifest,
    rename into place, point ``latest`` at it, apply retention."""

    def finalize() -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        names = [data_files(target.staging) if rank == 0 else None]
        dist.broadcast_object_list(names, src=0)
        mine = {name: describe_file(target.staging / name) for name in names[0][rank::world]}
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if rank == 0:
            files = {name: entry for part in gathered for name, entry in part.items()}
            write_manifest(
                target.staging,
                {
                    **manifest,
                    "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "bytes": sum(entry["bytes"] for entry in files.values()),
                    "files": dict(sorted(files.items())),
                },
            )
            publish(target.staging, target.final)
            for path in prune(target.final.parent, keep_last, keep_every):
                log.info("checkpoint %s deleted (retention)", path.name)
        dist.barrier()
        on_published(target.final)

    return finalize
