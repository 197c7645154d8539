"""One load, run by every rank: check the checkpoint whole and fitting before touching anything, then read.

Checks come first so that a bad checkpoint fails with the file and the mismatch named, on every rank at
once, while the run's own state is still untouched: the manifest must exist (an unfinished save has none),
every listed file must have its recorded size and CRC-32 (ranks share the checksumming), and every global
key this model needs must be in the checkpoint with the same global shape. Then megatron-core's
``dist_checkpointing.load`` reads each rank's shards, whatever layout wrote them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from gptscale.checkpoint.files import OPTIMIZER, SHARDS, TOKENIZER, read_rank_state
from gptscale.checkpoint.manifest import CheckpointError, find_damage, read_manifest
from gptscale.checkpoint.shards import ParameterShard, load_request
from gptscale.config.schema import ModelConfig


def raise_everywhere(problems: list[str], headline: str) -> None:
    """Gather every rank's problems so that all ranks raise the same error (none is left waiting)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problems)
    found = [problem for part in everyone for problem in part]
    if found:
        raise CheckpointError(headline + "\n  - " + "\n  - ".join(found))


def verify(path: Path) -> dict:
    """The manifest of ``path`` once every file it lists has been found intact (collective)."""
    try:
        manifest, problems = read_manifest(path), []
    except CheckpointError as error:
        manifest, problems = None, [str(error)]
    if manifest is not None:
        names = sorted(manifest["files"])
        problems = find_damage(path, manifest, names[dist.get_rank() :: dist.get_world_size()])
    raise_everywhere(problems, f"cannot resume from {path}:")
    return manifest


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor in a checkpoint, from its DCP metadata."""
    metadata_file = path / SHARDS / ".metadata"
    try:
        metadata = FileSystemReader(str(path / SHARDS)).read_metadata()
    except Exception as error:  # a damaged pickle raises anything from EOFError to UnpicklingError
        raise CheckpointError(f"{metadata_file} cannot be read: {error}") from error
    return {
        key: tuple(meta.size)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }


def check_fits(path: Path, expected: dict[str, tuple[int, ...]], saved_model: str, this_model: str) -> None:
    """Every model key this run needs, with the same global shape, and no model key it does not know.

    ``expected`` holds this rank's keys; the check runs on the union over ranks (collective)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, expected)
    expected = {key: shape for part in everyone for key, shape in part.items()}
    stored = {k: v for k, v in stored_shapes(path).items() if not k.startswith(f"{OPTIMIZER}.")}
    problems = [f"{key}: missing from the checkpoint" for key in expected if key not in stored]
    problems += [
        f"{key}: global shape {stored[key]} in the checkpoint, {shape} in this model"
        for key, shape in expected.items()
        if key in stored and stored[key] != shape
    ]
    problems += [f"{key}: in the checkpoint but not in this model" for key in stored if key not in expected]
    if problems:
        raise CheckpointError(
            f"{path / SHARDS / '.metadata'} holds another model ({saved_model}) than this run's ({this_model}):"
            + "\n  - "
            + "\n  - ".join(problems[:20])
            + ("\n  - ..." if len(problems) > 20 else "")
        )


# Settings that change what the weights compute without changing any shape: a shape check cannot see them.
_SHAPELESS_ARCHITECTURE = ("position_embedding", "rotary_base", "normalization", "norm_eps", "activation")


def check_same_architecture(path: Path, saved: ModelConfig, this: ModelConfig, tokenizer_file: Optional[Path]) -> None:
    """The checkpoint's model computes what this run's model computes, and reads the same tokens.

    Weights resumed under another RoPE base, norm epsilon or activation, or with another tokenizer whose
    vocabulary pads to the same size, would load without complaint and train a different model."""
    problems = [
        f"model.{name}: {getattr(saved, name)} in the checkpoint's config.yaml, {getattr(this, name)} here"
        for name in _SHAPELESS_ARCHITECTURE
        if getattr(saved, name) != getattr(this, name)
    ]
    saved_tokenizer = path / TOKENIZER
    if (
        tokenizer_file is not None
        and saved_tokenizer.is_file()
        and (_sha256(saved_tokenizer) != _sha256(tokenizer_file))
    ):
        problems.append(
            f"{saved_tokenizer} differs from this run's tokenizer {tokenizer_file}: the data is "
            "tokenized differently from what the weights were trained on"
        )
    if problems:
        raise CheckpointError(
            f"{path} holds a model this run would not compute the same way:\n  - " + "\n  - ".join(problems)
        )


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_shards(path: Path, shards: list[ParameterShard], state_names: tuple[str, ...]) -> dict:
    """This rank's master weights (and the optimizer state ``state_names`` and step count) from the
    checkpoint, in host memory."""
    return dist_checkpointing.load(load_request(shards, state_names), str(path / SHARDS))


_SAME_RANKS = ("world_size", "tp", "pp", "dp")  # layouts that agree on these map rank to rank


def read_components(path: Path, manifest: dict, layout: dict) -> dict:
    """This rank's saved component states, by name (collective: a refused rank file stops every rank).

    At the layout it was saved at, each rank gets back its own states. At another layout there is no rank
    to match, so every rank takes global rank 0's: exact for global counters (step, schedule, a loader
    whose position is a global sample count); per-rank RNG streams restart from rank 0's.
    """
    if not manifest["contents"]["components"]:
        return {}
    saved_layout = manifest.get("layout") or {}
    same_layout = all(saved_layout.get(key) == layout[key] for key in _SAME_RANKS)
    try:
        saved, problems = read_rank_state(path, dist.get_rank() if same_layout else 0)["components"], []
    except CheckpointError as error:
        saved, problems = {}, [str(error)]
    raise_everywhere(problems, f"cannot resume from {path}:")
    return saved
