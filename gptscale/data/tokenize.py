"""Tokenizing a stream of documents into the shards of both splits: the work of one part.

Documents are tokenized in chunks of about a megabyte of text, by this process or a pool of worker
processes that return results in order, and written shard after shard, each split rolled over at the
target size: the shards depend only on the documents, their indices (which decide the split) and the
options. Validation documents are picked by index with a low-discrepancy sequence, so the split is spread
evenly over the corpus.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
from tqdm import tqdm

from gptscale.data.chat import Piece
from gptscale.data.manifest import DataError, ShardInfo
from gptscale.data.shards import ShardWriter, compressor
from gptscale.data.tokenizer import TokenizerInfo

GOLDEN = 0.6180339887498949
CHUNK_CHARS = 1 << 20  # text per task handed to a worker


def is_validation(index: int, fraction: float) -> bool:
    """Document ``index`` goes to the validation split: an evenly spread, deterministic ``fraction``."""
    return ((index + 1) * GOLDEN) % 1.0 < fraction


# Worker side: each pool process holds the tokenizer and turns chunks of texts into compressed arrays.
_worker: dict = {}


def _init_worker(tokenizer_json: str, eod: int, dtype: str) -> None:
    from tokenizers import Tokenizer

    _use(Tokenizer.from_str(tokenizer_json), eod, dtype)


def _use(tokenizer, eod: int, dtype: str) -> None:
    _worker.update(tokenizer=tokenizer, eod=eod, dtype=np.dtype(dtype), zstd=compressor())


Document = str | list[Piece]  # text, or a fine-tuning record's masked and trained pieces


def text_of(document: Document) -> str:
    return document if isinstance(document, str) else "".join(piece.text for piece in document)


def _encode_pieces(pieces: list[Piece]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids plus the end-of-document id, and which are trained: each piece tokenized on its own. The
    end of document is trained when the record ends in a trained piece (the model learns to stop)."""
    encodings = _worker["tokenizer"].encode_batch_fast([piece.text for piece in pieces], add_special_tokens=False)
    ids = [token for encoding in encodings for token in encoding.ids] + [_worker["eod"]]
    mask = [piece.trained for piece, encoding in zip(pieces, encodings) for _ in encoding.ids] + [pieces[-1].trained]
    return np.array(ids, dtype=_worker["dtype"]), np.array(mask, dtype=np.uint8)


def _encode_chunk(chunk: list[tuple[int, Document]]) -> list[tuple[int, bytes, int, Optional[bytes]]]:
    """Per document: its index, its token ids plus the end-of-document id compressed, its token count, and
    its compressed loss mask (fine-tuning records; None for text)."""
    texts = [(index, document) for index, document in chunk if isinstance(document, str)]
    encodings = dict(
        zip(
            [index for index, _ in texts],
            _worker["tokenizer"].encode_batch_fast([text for _, text in texts], add_special_tokens=False),
        )
    )
    results = []
    for index, document in chunk:
        mask: Optional[bytes] = None
        if isinstance(document, str):
            tokens = np.array(encodings[index].ids + [_worker["eod"]], dtype=_worker["dtype"])
        else:
            tokens, trained = _encode_pieces(document)
            mask = _worker["zstd"].compress(trained.tobytes())
        results.append((index, _worker["zstd"].compress(tokens.tobytes()), len(tokens), mask))
    return results


def _chunks(texts: Iterable[tuple[int, Document]]) -> Iterator[list[tuple[int, Document]]]:
    chunk, chars = [], 0
    for item in texts:
        chunk.append(item)
        chars += len(text_of(item[1]))
        if chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class _SplitWriter:
    """Shards of one split, rolled over at the target size."""

    def __init__(self, directory: Path, split: str, shard_size: int):
        self.directory, self.split, self.shard_size = directory, split, shard_size
        self.shards: list[ShardInfo] = []
        self.samples = 0
        self._writer: Optional[ShardWriter] = None

    def add(self, compressed: bytes, num_tokens: int, mask: Optional[bytes] = None) -> None:
        if (
            self._writer is not None
            and self._writer.samples
            and self._writer.size + len(compressed) + 1024 > self.shard_size
        ):
            self.shards.append(self._writer.close())
            self._writer = None
        if self._writer is None:
            self._writer = ShardWriter(self.directory / f"{self.split}-{len(self.shards):06d}.tar")
        self._writer.add(f"{self.samples:09d}", compressed, num_tokens, mask)
        self.samples += 1

    def close(self) -> list[ShardInfo]:
        if self._writer is not None:
            self.shards.append(self._writer.close())
            self._writer = None
        return self.shards


def write_splits(
    texts: Iterator[tuple[int, Document]],
    info: TokenizerInfo,
    dtype: str,
    directory: Path,
    shard_size: int,
    val_fraction: float,
    workers: int,
    progress: bool,
) -> dict[str, list[ShardInfo]]:
    """The shards of both splits (either may be empty), written into ``directory``."""
    writers = {"train": _SplitWriter(directory, "train", shard_size), "val": _SplitWriter(directory, "val", shard_size)}
    bar = tqdm(unit="tok", unit_scale=True, desc="tokenize", disable=not progress, smoothing=0.1)
    if workers > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process, and no fork warning
        with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(info.json, info.eod, dtype)) as pool:
            _write_results(pool.imap(_encode_chunk, _chunks(texts)), writers, val_fraction, bar)
    else:
        _use(info.tokenizer, info.eod, dtype)  # this process's tokenizer: its word cache stays warm across parts
        _write_results(map(_encode_chunk, _chunks(texts)), writers, val_fraction, bar)
    bar.close()
    return {name: writer.close() for name, writer in writers.items()}


def check_splits(splits: dict[str, list[ShardInfo]], val_fraction: float) -> None:
    if not splits["train"] and not splits["val"]:
        raise DataError("the inputs hold no documents (every file is empty)")
    if not splits["train"]:
        raise DataError(f"every document went to the validation split; lower --val-fraction {val_fraction}")


def _write_results(
    results: Iterable[list[tuple[int, bytes, int, Optional[bytes]]]], writers: dict, val_fraction: float, bar: tqdm
) -> None:
    for chunk in results:
        for index, compressed, num_tokens, mask in chunk:
            writers["val" if is_validation(index, val_fraction) else "train"].add(compressed, num_tokens, mask)
        bar.update(sum(item[2] for item in chunk))
