"""``gptscale-prepare``: raw text to a sharded token dataset (webdataset tar shards of zstd token arrays).

Documents are read in a fixed order (sorted files, file order within them), tokenized by a pool of worker
processes that return results in order, and written shard after shard: the output is byte-identical for
the same input and options whatever the number of workers. Validation documents are picked by index with
a low-discrepancy sequence, so the split is spread evenly over the corpus. Everything is written under a
temporary name and renamed into place at the end: a crash never leaves a dataset that looks complete.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
from tqdm import tqdm

from gptscale.data.inputs import expand_inputs, read_documents
from gptscale.data.manifest import (
    MANIFEST,
    TOKENIZER,
    DataError,
    Manifest,
    ShardInfo,
    check_vocab_fits,
    dtype_for_vocab,
)
from gptscale.data.shards import ShardWriter, compressor
from gptscale.data.tokenizer import TokenizerInfo, load_tokenizer, train_bpe

log = logging.getLogger("gptscale")

GOLDEN = 0.6180339887498949
CHUNK_CHARS = 1 << 20  # text per task handed to a worker


def is_validation(index: int, fraction: float) -> bool:
    """Document ``index`` goes to the validation split: an evenly spread, deterministic ``fraction``."""
    return ((index + 1) * GOLDEN) % 1.0 < fraction


def parse_size(text: str) -> int:
    """``64MB``, ``1GiB``, ``500k`` or a byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 64MB, 1GiB or 500000")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " kmgt".index(unit or " "))


# Worker side: each pool process holds the tokenizer and turns chunks of texts into compressed arrays.
_worker: dict = {}


def _init_worker(tokenizer_json: str, eod: int, dtype: str) -> None:
    from tokenizers import Tokenizer

    _worker.update(tokenizer=Tokenizer.from_str(tokenizer_json), eod=eod, dtype=np.dtype(dtype), zstd=compressor())


def _encode_chunk(chunk: list[tuple[int, str]]) -> list[tuple[int, bytes, int]]:
    """Per document: its index, its token ids plus the end-of-document id compressed, its token count."""
    encodings = _worker["tokenizer"].encode_batch_fast([text for _, text in chunk], add_special_tokens=False)
    results = []
    for (index, _), encoding in zip(chunk, encodings):
        tokens = np.array(encoding.ids + [_worker["eod"]], dtype=_worker["dtype"])
        results.append((index, _worker["zstd"].compress(tokens.tobytes()), len(tokens)))
    return results


def _chunks(texts: Iterable[tuple[int, str]]) -> Iterator[list[tuple[int, str]]]:
    chunk, chars = [], 0
    for item in texts:
        chunk.append(item)
        chars += len(item[1])
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

    def add(self, compressed: bytes, num_tokens: int) -> None:
        if self._writer is not None and self._writer.samples and \
                self._writer.size + len(compressed) + 1024 > self.shard_size:
            self.shards.append(self._writer.close())
            self._writer = None
        if self._writer is None:
            self._writer = ShardWriter(self.directory / f"{self.split}-{len(self.shards):06d}.tar")
        self._writer.add(f"{self.samples:09d}", compressed, num_tokens)
        self.samples += 1

    def close(self) -> list[ShardInfo]:
        if self._writer is not None:
            self.shards.append(self._writer.close())
            self._writer = None
        return self.shards


def prepare_dataset(
    documents: Callable[[], Iterable[str]],
    output: Path,
    *,
    tokenizer: Optional[str | Path] = None,
    vocab_size: Optional[int] = None,
    eod_token: Optional[str] = None,
    shard_size: int = 64_000_000,
    val_fraction: float = 0.01,
    workers: int = 1,
    dtype: str = "auto",
    tokenizer_train_chars: int = 1_000_000_000,
    inputs: Optional[list[str]] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Tokenize ``documents()`` (called once per pass over the corpus) into a dataset at ``output``."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise DataError(f"--output {output} exists and is not empty; remove it or pass --overwrite")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    started = time.perf_counter()

    def texts() -> Iterator[tuple[int, str]]:
        """Non-empty documents with their index, the index that decides their split."""
        index = 0
        for text in documents():
            if text.strip():
                yield index, text
                index += 1

    if tokenizer is not None:
        info = load_tokenizer(tokenizer, eod_token)
    elif vocab_size is not None:
        info = train_bpe(_budget((t for i, t in texts() if not is_validation(i, val_fraction)),
                                 tokenizer_train_chars), vocab_size, eod_token)
    else:
        raise DataError("give --tokenizer FILE_OR_DIR or --vocab-size N")
    token_dtype = dtype_for_vocab(info.vocab_size) if dtype == "auto" else dtype
    check_vocab_fits(info.vocab_size, token_dtype, f"tokenizer {info.source}")

    temporary = output.parent / f".{output.name}.tmp-{os.getpid()}"
    replaced = output.parent / f".{output.name}.old-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        splits = _tokenize_and_write(texts(), info, token_dtype, temporary, shard_size, val_fraction, workers,
                                     progress)
        manifest = Manifest(str(output), info.vocab_size, info.eod, token_dtype, _tokenizer_entry(info), splits)
        (temporary / TOKENIZER).write_bytes(info.json.encode("utf-8"))
        (temporary / MANIFEST).write_text(manifest.to_json(inputs or []), encoding="utf-8")
        if output.exists():
            os.replace(output, replaced)
        os.replace(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)
    tokens = sum(s.tokens for shards in splits.values() for s in shards)
    seconds = time.perf_counter() - started
    log.info("prepared %s: %d train + %d validation documents, %d tokens in %d shards, %.1fs (%.2fM tokens/s)",
             output, sum(s.samples for s in splits.get("train", [])), sum(s.samples for s in splits.get("val", [])),
             tokens, sum(len(v) for v in splits.values()), seconds, tokens / seconds / 1e6)
    return manifest


def _budget(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """The first ``max_chars`` characters of the training documents: enough to learn merges."""
    used = 0
    for text in texts:
        if used >= max_chars:
            return
        used += len(text)
        yield text


def _tokenizer_entry(info: TokenizerInfo) -> dict:
    return {"file": TOKENIZER, "sha256": hashlib.sha256(info.json.encode("utf-8")).hexdigest(),
            "eod_token": info.eod_token, "source": info.source}


def _tokenize_and_write(texts: Iterator[tuple[int, str]], info: TokenizerInfo, dtype: str, directory: Path,
                        shard_size: int, val_fraction: float, workers: int,
                        progress: bool) -> dict[str, list[ShardInfo]]:
    writers = {"train": _SplitWriter(directory, "train", shard_size), "val": _SplitWriter(directory, "val", shard_size)}
    bar = tqdm(unit="tok", unit_scale=True, desc="tokenize", disable=not progress, smoothing=0.1)
    init = (info.json, info.eod, dtype)
    if workers > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process, and no fork warning
        with multiprocessing.Pool(workers, initializer=_init_worker, initargs=init) as pool:
            _write_results(pool.imap(_encode_chunk, _chunks(texts)), writers, val_fraction, bar)
    else:
        _init_worker(*init)
        _write_results(map(_encode_chunk, _chunks(texts)), writers, val_fraction, bar)
    bar.close()
    splits = {name: writer.close() for name, writer in writers.items()}
    if not splits["train"] and not splits["val"]:
        raise DataError("the inputs hold no documents (every file is empty)")
    if not splits["train"]:
        raise DataError(f"every document went to the validation split; lower --val-fraction {val_fraction}")
    return {name: shards for name, shards in splits.items() if shards}


def _write_results(results: Iterable[list[tuple[int, bytes, int]]], writers: dict, val_fraction: float,
                   bar: tqdm) -> None:
    for chunk in results:
        for index, compressed, num_tokens in chunk:
            writers["val" if is_validation(index, val_fraction) else "train"].add(compressed, num_tokens)
        bar.update(sum(n for _, _, n in chunk))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="gptscale-prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", action="extend", required=True, metavar="PATH_OR_GLOB",
                        help="text files (one document each), .jsonl or .parquet (one per row), directories, globs")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", metavar="FILE_OR_DIR", help="a Hugging Face tokenizer.json (or its directory)")
    source.add_argument("--vocab-size", type=int, metavar="N", help="train a byte-level BPE of N tokens on the input")
    parser.add_argument("--shard-size", type=parse_size, default="64MB", metavar="SIZE",
                        help="target shard size (default 64MB)")
    parser.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                        help="share of documents held out for validation (default 0.01)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="tokenizer processes (default: one per CPU)")
    parser.add_argument("--text-field", default="text", help="JSON / Parquet field holding the text (default text)")
    parser.add_argument("--eod-token", help="end-of-document token (default: the tokenizer's own, e.g. <|endoftext|>)")
    parser.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto",
                        help="token storage (default: uint16 when the vocabulary fits)")
    parser.add_argument("--tokenizer-train-chars", type=parse_size, default="1G", metavar="SIZE",
                        help="characters of text the BPE learns from, from the start of the corpus (default 1G)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        files = expand_inputs(args.input)
        prepare_dataset(
            lambda: (text for path in files for text in read_documents(path, args.text_field)),
            args.output, tokenizer=args.tokenizer, vocab_size=args.vocab_size, eod_token=args.eod_token,
            shard_size=args.shard_size, val_fraction=args.val_fraction, workers=max(1, args.workers),
            dtype=args.dtype, tokenizer_train_chars=args.tokenizer_train_chars, inputs=args.input,
            overwrite=args.overwrite, progress=not args.quiet,
        )
    except DataError as error:
        sys.exit(f"gptscale-prepare: {error}")


if __name__ == "__main__":
    main()
