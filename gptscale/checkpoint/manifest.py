"""The manifest, ``checkpoint.json``: written last, its presence is what makes a checkpoint complete.

It records the format version, the step and consumed tokens, the layout the checkpoint was saved at, what
it holds (optimizer state, per-rank component states) and the size and CRC-32 of every other file. A
checkpoint is usable when the manifest exists and every file it lists is there with that size and
checksum, so a truncated, corrupted or missing file is found and named before anything is loaded.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

from gptscale.errors import GptscaleError

FORMAT = "gptscale-checkpoint"
VERSION = 1
MANIFEST = "checkpoint.json"
_CHUNK = 16 << 20


class CheckpointError(GptscaleError, RuntimeError):
    """A checkpoint that cannot be used: incomplete, damaged, or for another model. Names the file and why."""


def checksum(path: Path) -> str:
    crc = 0
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def describe_file(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "crc32": checksum(path)}


def data_files(root: Path) -> list[str]:
    """Every file of a checkpoint directory except the manifest, as sorted relative paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def fsync_dir(path: Path) -> None:
    """Make a rename or new file in ``path`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(root: Path, manifest: dict) -> None:
    path = root / MANIFEST
    partial = root / f"{MANIFEST}.partial"
    with open(partial, "w") as file:
        json.dump({"format": FORMAT, "version": VERSION, **manifest}, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    fsync_dir(root)


def read_manifest(root: Path) -> dict:
    """The manifest of checkpoint ``root``; CheckpointError if there is none (an unfinished save) or it is damaged."""
    path = root / MANIFEST
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such checkpoint directory")
    if not path.is_file():
        if re.fullmatch(r"step_\d+", root.name):  # published names are given only once the manifest is written
            raise CheckpointError(
                f"{root} is damaged: {MANIFEST} is missing (a published checkpoint always has "
                "one: it was deleted or lost since)"
            )
        raise CheckpointError(f"{root} is incomplete: {MANIFEST} is missing (the save did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is damaged: {error}") from error
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gptscale checkpoint manifest")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has format version {manifest['version']}; this gptscale reads up to {VERSION}")
    return manifest


def find_damage(root: Path, manifest: dict, names: list[str], checksums: bool = True) -> list[str]:
    """Problems with the listed files among ``names``: missing, wrong size, wrong checksum."""
    problems = []
    for name in names:
        expected, path = manifest["files"][name], root / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != expected["bytes"]:
            problems.append(f"{path} is truncated or damaged: {size} bytes, the manifest says {expected['bytes']}")
        elif checksums and checksum(path) != expected["crc32"]:
            problems.append(f"{path} is corrupted: its CRC-32 differs from the manifest's ({expected['crc32']})")
    return problems
