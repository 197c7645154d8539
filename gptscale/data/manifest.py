"""The manifest of a prepared dataset: what ``gptscale-prepare`` wrote and what the loader trusts.

A dataset is a directory or URL prefix holding ``manifest.json``, ``tokenizer.json`` and tar shards. The
manifest lists every shard with its sample (document) and token counts, byte size and SHA-256, so the
loader can lay out the global order before reading a single shard and can prove each shard it reads.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from webdataset.gopen import gopen

from gptscale.errors import GptscaleError

FORMAT = "gptscale-tokens/1"
SFT_FORMAT = "gptscale-sft/1"  # documents carry a loss mask; the manifest lists each shard's document lengths
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class DataError(GptscaleError, ValueError):
    """Bad input data; the message names the file, shard or member at fault."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    tokens: int
    bytes: int
    sha256: str
    lengths: Optional[list[int]] = None  # tokens of each document, in shard order (fine-tuning data)


@dataclass(frozen=True)
class Manifest:
    location: str  # the directory, URL prefix or ``{}`` template the dataset was read from
    vocab_size: int
    eod: int
    dtype: str
    tokenizer: dict  # file, sha256, eod_token, source
    splits: dict[str, list[ShardInfo]]
    format: str = FORMAT

    @property
    def masked(self) -> bool:
        """Fine-tuning data: each document has a loss mask and is served whole, never split across sequences."""
        return self.format == SFT_FORMAT

    def url(self, name: str) -> str:
        return dataset_url(self.location, name)

    def shards(self, split: str) -> list[ShardInfo]:
        return self.splits.get(split, [])

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.dtype])

    def to_json(self, inputs: list[str]) -> str:
        splits = {
            name: {
                "samples": sum(s.samples for s in shards),
                "tokens": sum(s.tokens for s in shards),
                "shards": [{k: v for k, v in asdict(s).items() if v is not None} for s in shards],
            }
            for name, shards in self.splits.items()
        }
        body = {
            "format": self.format,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "dtype": self.dtype,
            "tokenizer": self.tokenizer,
            "inputs": inputs,
            "splits": splits,
        }
        return json.dumps(body, indent=1) + "\n"


def dataset_url(location: str, name: str) -> str:
    """Where file ``name`` of a dataset lives: ``{}`` in a template (``pipe:`` commands), else joined."""
    if "{}" in location:
        return location.replace("{}", name)
    if "://" in location:
        return location.rstrip("/") + "/" + name
    return os.path.join(location, name)


def read_bytes(url: str) -> bytes:
    """All bytes behind a local path or any URL webdataset opens (file:, http(s):, pipe:, ...)."""
    stream = gopen(url, "rb")
    try:
        return stream.read()
    finally:
        stream.close()  # a pipe's exit status is checked here


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def check_vocab_fits(vocab_size: int, dtype: str, what: str) -> None:
    limit = np.iinfo(DTYPES[dtype]).max + 1
    if vocab_size > limit:
        raise DataError(
            f"{what}: vocabulary of {vocab_size} tokens overflows {dtype} (at most {limit} ids); store tokens as uint32"
        )


def read_manifest(location: str) -> Manifest:
    """Read and check ``manifest.json`` of a dataset; every problem names the manifest."""
    location = str(location)
    url = dataset_url(location, MANIFEST)
    try:
        body = json.loads(read_bytes(url))
    except FileNotFoundError:
        raise DataError(f"{url}: no manifest; prepare the dataset with gptscale-prepare --output DIR") from None
    except (OSError, ValueError) as error:
        raise DataError(f"{url}: cannot read the manifest ({error})") from error
    if body.get("format") not in (FORMAT, SFT_FORMAT):
        raise DataError(f"{url}: format {body.get('format')!r} is not {FORMAT!r} or {SFT_FORMAT!r}")
    try:
        dtype = body["dtype"]
        if dtype not in DTYPES:
            raise DataError(f"{url}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
        vocab_size, eod = int(body["vocab_size"]), int(body["eod"])
        check_vocab_fits(vocab_size, dtype, url)
        if not 0 <= eod < vocab_size:
            raise DataError(f"{url}: end-of-document id {eod} is outside the vocabulary of {vocab_size}")
        splits = {name: [ShardInfo(**shard) for shard in split["shards"]] for name, split in body["splits"].items()}
        manifest = Manifest(location, vocab_size, eod, dtype, dict(body["tokenizer"]), splits, body["format"])
        if manifest.masked and any(
            s.lengths is None or len(s.lengths) != s.samples or sum(s.lengths) != s.tokens
            for shards in splits.values()
            for s in shards
        ):
            raise DataError(f"{url}: a {SFT_FORMAT} shard entry lacks document lengths matching its counts")
    except (KeyError, TypeError) as error:
        raise DataError(f"{url}: malformed manifest ({error!r})") from error
    if not manifest.shards("train") or sum(s.tokens for s in manifest.shards("train")) < 2:
        raise DataError(f"{url}: the train split holds no tokens")
    return manifest


def local_tokenizer_file(manifest: Manifest, cache_dir: Path) -> Path:
    """The tokenizer JSON the data was tokenized with, as a local file (fetched into the cache if remote)."""
    url = manifest.url(manifest.tokenizer["file"])
    if os.path.isfile(url):
        return Path(url)
    target = cache_dir / "tokenizers" / f"{manifest.tokenizer['sha256']}.json"
    if not target.is_file():
        data = read_bytes(url)
        if hashlib.sha256(data).hexdigest() != manifest.tokenizer["sha256"]:
            raise DataError(f"{url}: checksum differs from the manifest's tokenizer sha256")
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_suffix(f".tmp-{os.getpid()}")
        temporary.write_bytes(data)
        os.replace(temporary, target)
    return target
