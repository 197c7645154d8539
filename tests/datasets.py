"""Small prepared datasets whose tokens the tests know: documents are numbers, a word-level tokenizer maps
``"17"`` to id 17, so every served token can be traced back to the corpus."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from gptscale.config.layout import Layout
from gptscale.data.manifest import MANIFEST, read_manifest
from gptscale.data.prepare import is_validation, prepare_dataset

EOD_TOKEN = "<|endoftext|>"


def number_tokenizer(path: Path, vocab: int) -> Path:
    """Ids 0..vocab-1 for the words "0".."vocab-1", and ``vocab`` for the end-of-document token."""
    words = {str(i): i for i in range(vocab)}
    words[EOD_TOKEN] = vocab
    tokenizer = Tokenizer(models.WordLevel(words, unk_token=EOD_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([EOD_TOKEN])
    tokenizer.save(str(path))
    return path


def random_documents(count: int, low: int, high: int, seed: int, max_len: int = 60) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(low, high, rng.integers(1, max_len))) for _ in range(count)]


def counting_documents(count: int, high: int, seed: int, max_len: int = 30) -> list[list[int]]:
    """Documents that count up from a random start (mod ``high``): a pattern a tiny model learns in a few
    dozen steps, so that a document of anything else stands out in the loss."""
    rng = np.random.default_rng(seed)
    return [
        [(int(start) + i) % high for i in range(int(length))]
        for start, length in zip(rng.integers(0, high, count), rng.integers(2, max_len, count))
    ]


def make_dataset(
    directory: Path,
    documents: list[list[int]],
    vocab: int = 1000,
    shard_size: int = 600,
    val_fraction: float = 0.05,
    workers: int = 1,
    dtype: str = "auto",
) -> Path:
    """Prepare ``documents`` (lists of ids below ``vocab``) with the number tokenizer; small shards."""
    tokenizer = number_tokenizer(directory.parent / f"{directory.name}-tokenizer.json", vocab)
    texts = [" ".join(map(str, doc)) for doc in documents]
    prepare_dataset(
        lambda: texts,
        directory,
        tokenizer=tokenizer,
        shard_size=shard_size,
        val_fraction=val_fraction,
        workers=workers,
        dtype=dtype,
        progress=False,
    )
    return directory


def split_tokens(documents: list[list[int]], eod: int, val_fraction: float = 0.05, split: str = "train") -> list[int]:
    """Every token of a split, each document followed by the end-of-document id."""
    tokens = []
    for index, doc in enumerate(documents):
        if is_validation(index, val_fraction) == (split == "val"):
            tokens.extend(doc + [eod])
    return tokens


def layout(dp: int, micro_batch: int, global_batch: int) -> Layout:
    return Layout(world_size=dp, tp=1, pp=1, vpp=1, dp=dp, micro_batch=micro_batch, global_batch=global_batch)


def rewrite_manifest_entry(directory: Path, shard_name: str) -> None:
    """Make the manifest agree with a shard that was altered on purpose (size and checksum)."""
    manifest = json.loads((directory / MANIFEST).read_text())
    data = (directory / shard_name).read_bytes()
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if shard["name"] == shard_name:
                shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (directory / MANIFEST).write_text(json.dumps(manifest))
    read_manifest(str(directory))


def with_garbage(
    documents: list[list[int]], low: int, high: int, length: int, seed: int = 0, val_fraction: float = 0.05
) -> list[list[int]]:
    """``documents`` with one garbage document planted mid-corpus in the train split: ``length`` random ids
    from [low, high), a range the other documents never use, so every one of its tokens is a surprise."""
    index = len(documents) // 2
    while is_validation(index, val_fraction):
        index += 1
    garbage = [int(token) for token in np.random.default_rng(seed).integers(low, high, length)]
    return documents[:index] + [garbage] + documents[index:]


def read_document(manifest, identity) -> list[int]:
    """The tokens (end-of-document included) of document ``identity`` (``data/exclude.py``), from its shard."""
    import zstandard

    from gptscale.data.shards import load_shard

    info = next(shard for split in manifest.splits.values() for shard in split if shard.name == identity.shard)
    loaded = load_shard(manifest.url(info.name), info, manifest.numpy_dtype)
    return loaded.decode(identity.document, manifest.numpy_dtype, zstandard.ZstdDecompressor()).tolist()
