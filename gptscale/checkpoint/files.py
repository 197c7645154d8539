"""The files of a checkpoint directory besides the manifest.

::

    step_000012/
      checkpoint.json      the manifest (manifest.py), written last
      config.yaml          the run's resolved configuration
      tokenizer.json       the data's tokenizer, when it has one
      shards/              megatron-core distributed checkpoint (torch_dist: PyTorch DCP files): fp32 master
                           weights and optimizer state under global keys, its step count in common.pt
      ranks/rank_00003.pt  each rank's component states (data loader position, RNG, lr schedule, ...)
"""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from gptscale.checkpoint.manifest import CheckpointError
from gptscale.config.schema import Config, ModelConfig

SHARDS = "shards"
RANKS = "ranks"
CONFIG = "config.yaml"
# Keys of the configurations older checkpoints were saved with that are settings no more, dropped on reading.
RETIRED_KEYS = ("train.inject_nan_steps",)  # a test hook, now in tests/faults
TOKENIZER = "tokenizer.json"
OPTIMIZER = "optimizer"  # shard keys under this prefix are optimizer state: optimizer.exp_avg.<model key>, ...


def moment_key(moment: str, key: str) -> str:
    """Shard key of the optimizer state ``moment`` (Adam's exp_avg, ...) of the weight stored under ``key``."""
    return f"{OPTIMIZER}.{moment}.{key}"


def write_config(root: Path, cfg: Config) -> None:
    (root / CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def saved_config(root: Path) -> DictConfig:
    """A checkpoint's config.yaml without the keys that are settings no more (RETIRED_KEYS)."""
    saved = OmegaConf.load(root / CONFIG)
    assert isinstance(saved, DictConfig)
    for key in RETIRED_KEYS:
        group, name = key.rsplit(".", 1)
        node = OmegaConf.select(saved, group)
        if isinstance(node, DictConfig) and name in node:
            del node[name]
    return saved


def read_config(root: Path) -> Config:
    """The typed Config a checkpoint was saved with (missing keys take today's defaults)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), saved_config(root)))


def describe_model(model: ModelConfig) -> str:
    return (
        f"{model.name}: {model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} heads, "
        f"{model.query_groups} query groups, "
        f"ffn {model.ffn_size}, {model.activation.value}"
        + (f", {model.moe.num_experts} experts (top-{model.moe.top_k})" if model.moe.num_experts else "")
    )


def copy_tokenizer(root: Path, tokenizer_file: Optional[Path]) -> None:
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, root / TOKENIZER)


def tokenizer_path(root: Path) -> Optional[Path]:
    path = root / TOKENIZER
    return path if path.is_file() else None


def _rank_file(root: Path, rank: int) -> Path:
    return root / RANKS / f"rank_{rank:05d}.pt"


def write_rank_state(root: Path, rank: int, position: dict, components: dict) -> None:
    """This rank's place in the layout and the ``state_dict()`` of every registered component."""
    state = {"rank": rank, "position": position, "components": {name: c.state_dict() for name, c in components.items()}}
    torch.save(state, _rank_file(root, rank))


def read_rank_state(root: Path, rank: int) -> dict:
    """A rank's saved states, unpickled as plain data only: a checkpoint from elsewhere cannot run code here.

    Components keep their states to tensors, numbers, strings, lists, tuples and dicts, which is all
    ``weights_only`` admits; a file that asks for anything else is refused before any of it is built."""
    path = _rank_file(root, rank)
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        wanted = re.search(r"GLOBAL (\S+)", str(error))
        raise CheckpointError(
            f"{path} is refused: it holds more than plain data (tensors, numbers, strings, lists, "
            f"dicts){f', it asks for {wanted.group(1)}' if wanted else ''}, and loading it "
            "could run code"
        ) from None
