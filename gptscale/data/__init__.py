"""Token data for training: prepared shards streamed to every data-parallel rank, resumable exactly."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from gptscale.config.layout import Layout
from gptscale.config.schema import DataConfig
from gptscale.data.embedded import default_cache_dir, embedded_dataset
from gptscale.data.manifest import DataError, local_tokenizer_file, read_manifest

log = logging.getLogger("gptscale")


@dataclass
class Data:
    train: Iterator
    valid: Optional[Iterator]
    vocab_size: int
    eod: int
    tokenizer_file: Optional[Path] = None  # the tokenizer JSON the data was tokenized with


def build_data(cfg: DataConfig, layout: Layout, dp_rank: int, seq_len: int, serves_tokens: bool = True) -> Data:
    """The train and validation loaders of this data-parallel rank.

    ``serves_tokens``: false on pipeline stages that neither embed tokens nor compute the loss; they get
    placeholders without reading (unless ``data.reset_attention_at_eod``: every stage builds the attention
    mask from the documents).
    Tensor-parallel ranks each read the same shards rather than wait for a broadcast.
    """
    from gptscale.data.loader import Source, StreamingLoader  # torch, only once training starts

    cache_dir = default_cache_dir(cfg.cache_dir)
    if cfg.sources:
        locations = [(source.path, source.weight) for source in cfg.sources]
    elif cfg.path:
        locations = [(cfg.path, 1.0)]
    else:
        locations = [(str(embedded_dataset(cfg.embedded_max_bytes, cfg.embedded_vocab_size, cache_dir)), 1.0)]
    manifests = [read_manifest(path) for path, _ in locations]
    first = manifests[0]
    for manifest in manifests[1:]:
        if manifest.tokenizer["sha256"] != first.tokenizer["sha256"]:
            raise DataError(
                f"data.sources: {manifest.location} and {first.location} were tokenized with "
                "different tokenizers; blended datasets must share one"
            )
    if any(manifest.masked for manifest in manifests):
        if cfg.exclude:
            raise DataError(
                f"data.exclude: {manifests[0].location} is fine-tuning data, whose loader serves "
                "whole conversations; exclusion lists apply to pretraining data"
            )
        return _fine_tuning_data(cfg, manifests, layout, dp_rank, seq_len, serves_tokens, cache_dir)
    train_sources = [Source(m, "train", w) for m, (_, w) in zip(manifests, locations)]
    val_sources = [Source(m, "val", w) for m, (_, w) in zip(manifests, locations) if m.shards("val")]
    exclude = _exclusions(cfg.exclude, train_sources + val_sources)
    options = dict(
        layout=layout,
        dp_rank=dp_rank,
        seq_len=seq_len,
        seed=cfg.seed,
        workers=cfg.workers,
        reset_attention_at_eod=cfg.reset_attention_at_eod,
        on_error=cfg.on_error,
        max_skipped_fraction=cfg.max_skipped_fraction,
        serves_tokens=serves_tokens or cfg.reset_attention_at_eod,
        exclude=exclude,
    )
    train = StreamingLoader(train_sources, **options)
    valid = None
    if val_sources:
        try:
            valid = StreamingLoader(val_sources, **options)
        except DataError as error:
            log.warning("no validation data: %s", error)
    return Data(
        train=train,
        valid=valid,
        vocab_size=first.vocab_size,
        eod=first.eod,
        tokenizer_file=local_tokenizer_file(first, cache_dir),
    )


def _exclusions(entries: list[str], sources: list) -> list:
    """``data.exclude``, each identity checked against the sources this run reads."""
    from gptscale.data.exclude import check_exclusions, read_exclusions

    identities = read_exclusions(entries)
    known = {
        source.fingerprint: {shard.name: shard.samples for shard in source.manifest.shards(source.split)}
        for source in sources
    }
    check_exclusions(identities, known, "data.exclude")
    if identities:
        log.info("data.exclude: %d documents are read as empty documents", len(set(identities)))
    return identities


def _fine_tuning_data(
    cfg: DataConfig, manifests: list, layout: Layout, dp_rank: int, seq_len: int, serves_tokens: bool, cache_dir: Path
) -> Data:
    """Loaders of fine-tuning data (``gptscale-prepare --format chat|prompt-completion``): whole documents."""
    from gptscale.data.packed import PackedLoader

    if len(manifests) > 1:
        tuning = ", ".join(str(m.location) for m in manifests if m.masked)
        raise DataError(
            f"data.sources: fine-tuning data ({tuning}) is read from one dataset, not blended with "
            "others; prepare the conversations together and give it as data.path"
        )
    manifest = manifests[0]
    options = dict(
        layout=layout,
        dp_rank=dp_rank,
        seq_len=seq_len,
        seed=cfg.seed,
        packing=cfg.packing,
        truncate_long=cfg.truncate_long,
        on_error=cfg.on_error,
        serves_tokens=serves_tokens,
    )
    train = PackedLoader(manifest, "train", **options)
    valid = PackedLoader(manifest, "val", **options) if manifest.shards("val") else None
    return Data(
        train=train,
        valid=valid,
        vocab_size=manifest.vocab_size,
        eod=manifest.eod,
        tokenizer_file=local_tokenizer_file(manifest, cache_dir),
    )
