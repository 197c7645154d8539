"""Reading whole checkpoints in the test process (weights, optimizer state, per-rank states) to compare them."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata


def all_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, model and optimizer, gathered, plus Adam's step as ``"step"``."""
    reader = FileSystemReader(str(checkpoint / "shards"))
    metadata = reader.read_metadata().state_dict_metadata
    tensors = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    tensors["step"] = torch.tensor(torch.load(checkpoint / "shards" / "common.pt")["optimizer"]["step"])
    return tensors


def rank_state(checkpoint: Path, rank: int = 0) -> dict:
    return torch.load(checkpoint / "ranks" / f"rank_{rank:05d}.pt", weights_only=True)


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def assert_resumed_exactly(straight: dict, first: dict, resumed: dict, what: str) -> None:
    """A run split in two halves by a checkpoint has the losses and gradient norms of the straight run, bit for bit."""
    steps = len(straight["loss"])
    assert len(first["loss"]) == steps // 2 and len(resumed["loss"]) == steps - steps // 2, what
    assert first["loss"] == straight["loss"][: steps // 2], f"{what}: first half differs from the straight run"
    assert resumed["loss"] == straight["loss"][steps // 2 :], (
        f"{what}: resumed losses {resumed['loss']} differ from the straight run's {straight['loss'][steps // 2 :]}"
    )
    assert resumed["grad_norm"] == straight["grad_norm"][steps // 2 :], what
