"""Token data for training: where batches come from, split over data-parallel ranks, resumable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from gptscale.config.schema import DataConfig
from gptscale.config.validate import ConfigError, Layout
from gptscale.data.embedded import BYTE_VOCAB_SIZE, EOD, embedded_tokens
from gptscale.data.loader import WindowLoader


@dataclass
class Data:
    train: Iterator
    valid: Optional[Iterator]
    vocab_size: int
    eod: int


def build_data(cfg: DataConfig, layout: Layout, dp_rank: int, seq_len: int) -> Data:
    """The train and validation loaders of this data-parallel rank."""
    if cfg.path is not None or cfg.sources:
        raise ConfigError("data.path / data.sources: sharded datasets are not supported by this build")
    tokens = embedded_tokens(cfg.embedded_max_bytes)
    split = int(len(tokens) * 0.95)
    train = WindowLoader(tokens[:split], seq_len, layout, dp_rank, cfg.seed)
    valid = WindowLoader(tokens[split:], seq_len, layout, dp_rank, cfg.seed + 1)
    return Data(train=train, valid=valid, vocab_size=BYTE_VOCAB_SIZE, eod=EOD)
