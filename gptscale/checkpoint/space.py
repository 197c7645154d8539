"""Disk space for a save: refused before writing when it cannot fit, and named when a write runs out.

A full disk otherwise surfaces as the writer's failure (``Worker failure: [enforce fail at
inline_container.cc] unexpected pos ...``) with a half-written directory left behind. The estimate is the
larger of the previous checkpoint's size (its manifest's ``bytes``, overheads included) and the bytes of
the tensors this save writes, over all ranks.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import is_main_replica

from gptscale.checkpoint.manifest import MANIFEST


def bytes_needed(state: dict, previous: Optional[Path]) -> int:
    """About how many bytes the checkpoint of the snapshot ``state`` takes on disk (collective)."""
    mine = sum(
        item.data.numel() * item.data.element_size()
        for item in nested_values(state)
        if hasattr(item, "replica_id") and is_main_replica(item.replica_id)
    )
    everyone = [0] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    before = 0
    if previous is not None and (previous / MANIFEST).is_file():
        before = json.loads((previous / MANIFEST).read_text()).get("bytes", 0)
    return max(sum(everyone), before)


def no_space(directory: Path, step: int, needed: int, free: int) -> str:
    return (
        f"no space left on device for the checkpoint of step {step}: {directory} has {free:,} bytes free, "
        f"the checkpoint needs about {needed:,} bytes"
    )


def shortfall(directory: Path, step: int, needed: int) -> list[str]:
    """The problem, if ``directory`` has less free space than ``needed``."""
    free = shutil.disk_usage(directory).free
    return [no_space(directory, step, needed, free)] if free < needed else []


def out_of_space(error: BaseException, directory: Path, needed: int) -> Optional[int]:
    """The free bytes left if ``error`` came from a full disk (ENOSPC anywhere in its chain, or less room
    left than the save needs, the writer's own errors naming no cause); None for any other failure."""
    free = shutil.disk_usage(directory).free
    cause: Optional[BaseException] = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return free
        cause = cause.__cause__ or cause.__context__
    return free if free < needed else None
