"""A checkpoint's model weights in one process, with no torch.distributed and no model: for conversion.

``load_model_state(path) -> (Config, tensors, tokenizer_file)``
    ``path`` is a checkpoint directory (``RUN_DIR/checkpoints/step_000012``) or a run or checkpoints
    directory (its newest complete checkpoint). Returns the Config the checkpoint was saved with, the full
    fp32 model weights (the optimizer's master copy, gathered over every TP/PP/DP shard) and the path of
    the checkpoint's ``tokenizer.json`` (None without one). A checkpoint whose save did not finish, or
    with a missing, truncated or corrupted file, raises CheckpointError naming the file.

``save_model_state(path, cfg, tensors, tokenizer_file=None) -> Path``
    Writes a complete checkpoint at ``path`` (which must not exist) holding model weights only: step 0,
    no optimizer state, no layout. The trainer starts from it at any layout with
    ``checkpoint.resume=PATH`` (weights loaded, optimizer fresh). Tensors are stored in fp32.

Keys are megatron-core's global sharded-state-dict keys, exactly as ``sharded_state_dict()`` names them,
with the transformer layers stacked on a leading axis of size ``num_layers``. For a Llama-style model::

    embedding.word_embeddings.weight                            [padded vocab, hidden]
    decoder.layers.self_attention.linear_qkv.layer_norm_weight  [layers, hidden]  (input RMSNorm)
    decoder.layers.self_attention.linear_qkv.weight             [layers, (heads + 2 groups) * head dim, hidden]
    decoder.layers.self_attention.linear_proj.weight            [layers, hidden, heads * head dim]
    decoder.layers.mlp.linear_fc1.layer_norm_weight             [layers, hidden]  (pre-MLP RMSNorm)
    decoder.layers.mlp.linear_fc1.weight                        [layers, 2 ffn, hidden]  ([gate; up])
    decoder.layers.mlp.linear_fc2.weight                        [layers, hidden, ffn]
    decoder.final_layernorm.weight                              [hidden]
    output_layer.weight                                         [padded vocab, hidden]  (untied models)

``linear_qkv`` is megatron-core's layout: for each query group, its query heads, then its key head, then
its value head. GPT-2-style models add ``embedding.position_embeddings.weight``, the norms' ``*_bias``
and the linear layers' ``.bias``, and have no ``output_layer.weight`` (tied to the embedding). The padded
vocabulary is ``model.vocab_size`` rounded up to ``model.vocab_multiple``.
"""

from __future__ import annotations

import os
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from gptscale.checkpoint.files import OPTIMIZER, SHARDS, copy_tokenizer, read_config, tokenizer_path, write_config
from gptscale.checkpoint.manifest import (
    CheckpointError,
    data_files,
    describe_file,
    find_damage,
    fsync_dir,
    read_manifest,
    write_manifest,
)
from gptscale.checkpoint.publish import new_nonce, resolve
from gptscale.config.schema import Config

_SINGLE_PROCESS = "torch.distributed is disabled"  # DCP's notice that it reads or writes in this process alone


def verified(path: Path) -> tuple[Path, dict]:
    """The checkpoint ``path`` designates and its manifest, once every file it lists is found intact."""
    root = resolve(str(path), Path(path))
    manifest = read_manifest(root)
    problems = find_damage(root, manifest, sorted(manifest["files"]))
    if problems:
        raise CheckpointError(f"{root} is damaged:\n  - " + "\n  - ".join(problems))
    return root, manifest


def load_model_state(path: str | os.PathLike) -> tuple[Config, dict[str, torch.Tensor], Optional[Path]]:
    root, _ = verified(Path(path))
    reader = FileSystemReader(str(root / SHARDS))
    metadata = reader.read_metadata().state_dict_metadata
    tensors = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if isinstance(meta, TensorStorageMetadata) and not key.startswith(f"{OPTIMIZER}.")
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS)
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    return read_config(root), {key: tensor.float() for key, tensor in tensors.items()}, tokenizer_path(root)


def save_model_state(
    path: str | os.PathLike, cfg: Config, tensors: dict[str, torch.Tensor], tokenizer_file: Optional[Path] = None
) -> Path:
    final = Path(path)
    if final.exists():
        raise CheckpointError(f"{final} exists; save_model_state does not overwrite")
    if any(key.startswith(f"{OPTIMIZER}.") for key in tensors):
        raise CheckpointError(f"save_model_state writes model weights only; keys under '{OPTIMIZER}.' are not")
    staging = final.with_name(f"{final.name}.tmp-{new_nonce()}")
    (staging / SHARDS).mkdir(parents=True)
    weights = {key: tensor.detach().to("cpu", torch.float32).contiguous() for key, tensor in tensors.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS)
        dcp.save(weights, storage_writer=FileSystemWriter(str(staging / SHARDS)), no_dist=True)
    save_config(CheckpointingConfig("torch_dist"), str(staging / SHARDS))  # megatron-core's format marker
    torch.save({}, staging / SHARDS / COMMON_STATE_FNAME)  # no common state: no optimizer step
    write_config(staging, cfg)
    copy_tokenizer(staging, tokenizer_file)
    files = {name: describe_file(staging / name) for name in data_files(staging)}
    write_manifest(
        staging,
        {
            "step": 0,
            "consumed_tokens": 0,
            "model": cfg.model.name,
            "layout": None,
            "contents": {"optimizer": False, "components": []},
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "bytes": sum(entry["bytes"] for entry in files.values()),
            "files": files,
        },
    )
    os.rename(staging, final)
    fsync_dir(final.parent)
    return final
