"""Reads a W&B run file (``run-<id>.wandb``) back: wandb 0.31 writes but no longer reads them in Python.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of
chunks, each ``crc32(type + data)`` (4 bytes), length (2), type (1: full, 2: first, 3: middle, 4: last) and
data; a chunk never crosses a block, whose tail of fewer than 7 bytes is padding. Joined chunks are
``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    ident, magic, version = HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B run file"
    records, payload, position = [], b"", HEADER.size
    while position + CHUNK.size <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < CHUNK.size:
            position += left_in_block
            continue
        checksum, length, kind = CHUNK.unpack_from(data, position)
        chunk = data[position + CHUNK.size : position + CHUNK.size + length]
        position += CHUNK.size + length
        if kind == 0:  # the zero-filled rest of a block
            continue
        assert zlib.crc32(bytes([kind]) + chunk) == checksum, f"{path}: bad checksum at byte {position}"
        payload = chunk if kind in (FULL, FIRST) else payload + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
    return records


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


@dataclass
class WandbRun:
    """What a run file says: the run's id, project, group, tags and config, and its history by step."""

    run_id: str = ""
    project: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: dict[int, dict] = field(default_factory=dict)


def read_run(path: Path) -> WandbRun:
    run = WandbRun()
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project, run.group = record.run.run_id, record.run.project, record.run.run_group
            run.tags = list(record.run.tags)
            run.config.update({_key(item): json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run.config.update({_key(item): json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            values = {_key(item): json.loads(item.value_json) for item in record.history.item}
            run.history.setdefault(values["_step"], {}).update(values)
    return run
