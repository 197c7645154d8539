"""The shard format: webdataset tar files whose members are zstd-compressed token arrays, one per document.

Members are named ``<index>.tokens.zst`` so plain webdataset tools can list and read them. Each zstd frame
records its content size (the document's token count, without decompressing) and a content checksum.
Shards are written with webdataset's TarWriter and read whole, checked against the manifest (size, SHA-256, sample and token counts) before any
document is served, so a bad shard is refused or skipped as a unit.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import zstandard
from webdataset import TarWriter

from gptscale.data.manifest import DataError, ShardInfo, read_bytes

MEMBER_EXTENSION = "tokens.zst"
MASK_EXTENSION = "mask.zst"  # fine-tuning data: per token, 1 where it is trained as a label (uint8, zstd)


def compressor() -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)


class _HashingFile:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, file):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)


class ShardWriter:
    """Writes one shard under a temporary name; ``close()`` renames it into place and describes it."""

    def __init__(self, path: Path):
        self.path = path
        self.temporary = path.with_name(path.name + ".tmp")
        self._file = open(self.temporary, "wb")
        self._hashing = _HashingFile(self._file)
        # Fixed owner and time: re-running the preparation gives byte-identical shards.
        self._tar = TarWriter(self._hashing, user="gptscale", group="gptscale", mtime=0)
        self.samples = 0
        self.tokens = 0
        self.lengths: list[int] = []
        self.masked = False

    @property
    def size(self) -> int:
        return self._hashing.size

    def add(self, key: str, compressed: bytes, num_tokens: int, mask: Optional[bytes] = None) -> None:
        """One document; ``mask`` (compressed, one uint8 per token) makes the shard fine-tuning data."""
        sample = {"__key__": key, MEMBER_EXTENSION: compressed}
        if mask is not None:
            sample[MASK_EXTENSION] = mask
            self.masked = True
        self._tar.write(sample)
        self.samples += 1
        self.tokens += num_tokens
        self.lengths.append(num_tokens)

    def close(self) -> ShardInfo:
        self._tar.close()
        self._file.close()
        os.replace(self.temporary, self.path)
        return ShardInfo(
            self.path.name,
            self.samples,
            self.tokens,
            self._hashing.size,
            self._hashing.sha256.hexdigest(),
            self.lengths if self.masked else None,
        )


@dataclass
class LoadedShard:
    """The documents of one verified shard, still compressed; ``lengths`` in tokens, in shard order."""

    url: str
    members: list[memoryview]
    names: list[str]
    lengths: np.ndarray
    masks: Optional[list[memoryview]] = None  # fine-tuning data: each document's loss mask, compressed

    def decode(self, index: int, dtype: np.dtype, decompressor: zstandard.ZstdDecompressor) -> np.ndarray:
        """Token array of document ``index``; DataError naming shard and member if it does not decompress."""
        try:
            raw = decompressor.decompress(self.members[index])
        except zstandard.ZstdError as error:
            raise DataError(f"shard {self.url}: member {self.names[index]} is not valid zstd ({error})") from None
        tokens = np.frombuffer(raw, dtype=dtype)
        if len(tokens) != self.lengths[index]:
            raise DataError(
                f"shard {self.url}: member {self.names[index]} holds {len(tokens)} tokens, "
                f"its frame header says {self.lengths[index]}"
            )
        return tokens

    def decode_mask(self, index: int, decompressor: zstandard.ZstdDecompressor) -> np.ndarray:
        """Loss mask of document ``index`` (bool per token); DataError naming shard and member if it is bad."""
        name = self.names[index].removesuffix(MEMBER_EXTENSION) + MASK_EXTENSION
        try:
            mask = np.frombuffer(decompressor.decompress(self.masks[index]), dtype=np.uint8)
        except zstandard.ZstdError as error:
            raise DataError(f"shard {self.url}: member {name} is not valid zstd ({error})") from None
        if len(mask) != self.lengths[index]:
            raise DataError(
                f"shard {self.url}: member {name} masks {len(mask)} tokens, the document has {self.lengths[index]}"
            )
        return mask.astype(bool)


def _split_masks(url: str, names: list[str], members: list[memoryview]):
    """Token members and, where the shard has them, the mask member of each document (same key)."""
    masks = {
        name.removesuffix("." + MASK_EXTENSION): member
        for name, member in zip(names, members)
        if name.endswith("." + MASK_EXTENSION)
    }
    kept = [(name, member) for name, member in zip(names, members) if not name.endswith("." + MASK_EXTENSION)]
    names, members = [name for name, _ in kept], [member for _, member in kept]
    if not masks:
        return names, members, None
    keys = [name.removesuffix("." + MEMBER_EXTENSION) for name in names]
    missing = [name for name, key in zip(names, keys) if key not in masks]
    if missing or len(masks) != len(names):
        raise DataError(f"shard {url}: masks and token arrays do not pair up (e.g. {(missing or names)[0]})")
    return names, members, [masks[key] for key in keys]


def load_shard(url: str, info: ShardInfo, dtype: np.dtype, data: Optional[bytes] = None) -> LoadedShard:
    """Fetch and verify a shard; every failure is a DataError naming the shard (and member)."""
    try:
        data = read_bytes(url) if data is None else data
    except FileNotFoundError:
        raise DataError(f"shard {url} listed in the manifest is missing") from None
    except Exception as error:  # webdataset raises plain Exceptions for failed pipes and downloads
        raise DataError(f"shard {url} cannot be read ({error})") from error
    if len(data) != info.bytes:
        raise DataError(f"shard {url} is truncated or altered: {len(data)} bytes, the manifest says {info.bytes}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256:
        raise DataError(f"shard {url}: checksum {digest[:16]}... differs from the manifest's {info.sha256[:16]}...")
    # The whole shard is in memory: index it with tarfile's seekable reader and keep zero-copy views of the
    # members (a third cheaper than webdataset's streaming iterator, which copies each member out).
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            entries = [entry for entry in tar.getmembers() if entry.isreg()]
    except tarfile.TarError as error:
        raise DataError(f"shard {url} is not a readable tar file ({error})") from error
    view = memoryview(data)
    names = [entry.name for entry in entries]
    members = [view[entry.offset_data : entry.offset_data + entry.size] for entry in entries]
    if entries and entries[-1].offset_data + entries[-1].size > len(data):
        raise DataError(f"shard {url} is not a readable tar file (member {names[-1]} runs past its end)")
    names, members, masks = _split_masks(url, names, members)
    if len(members) != info.samples:
        raise DataError(f"shard {url} holds {len(members)} samples, the manifest says {info.samples}")
    lengths = np.empty(len(members), dtype=np.int64)
    for i, (name, member) in enumerate(zip(names, members)):
        if not name.endswith("." + MEMBER_EXTENSION):
            raise DataError(f"shard {url}: member {name} is not a .{MEMBER_EXTENSION} token array")
        try:
            size = zstandard.frame_content_size(member)
        except zstandard.ZstdError as error:
            raise DataError(f"shard {url}: member {name} is not valid zstd ({error})") from None
        if size < 0 or size % dtype.itemsize:
            raise DataError(f"shard {url}: member {name} does not hold whole {dtype} tokens")
        lengths[i] = size // dtype.itemsize
    if int(lengths.sum()) != info.tokens:
        raise DataError(f"shard {url} holds {int(lengths.sum())} tokens, the manifest says {info.tokens}")
    return LoadedShard(url, members, names, lengths, masks)
