"""A corpus every machine has: the Python standard library's own source, prepared once into shards.

The default job needs no download: the first run trains a small byte-level BPE on the sources and writes a
sharded dataset into the cache, under a name derived from the content and the options, so a changed
Python, size or vocabulary gets its own dataset and a finished one is never rewritten. A file lock keeps
the ranks of one machine from preparing it at the same time; the write-then-rename in preparation keeps a
crash from leaving half a dataset behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Optional

from gptscale.data.manifest import MANIFEST
from gptscale.data.prepare import prepare_dataset

RECIPE = "stdlib/1"  # bump when the preparation below changes what it writes
SHARD_SIZE = 256_000  # several shards even for a small corpus, so the shard shuffle is exercised
VAL_FRACTION = 0.05


def default_cache_dir(configured: Optional[str] = None) -> Path:
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("GPTSCALE_CACHE"):
        return Path(os.environ["GPTSCALE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "gptscale"


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def embedded_documents(max_bytes: int) -> list[str]:
    """The standard library's top-level modules in a fixed order, one document each, ``max_bytes`` in all."""
    documents, total = [], 0
    for path in stdlib_sources():
        data = path.read_bytes()[: max_bytes - total]
        documents.append(data.decode("utf-8", errors="replace"))
        total += len(data)
        if total >= max_bytes:
            break
    if not documents:
        raise FileNotFoundError(f"no Python sources under {sysconfig.get_paths()['stdlib']}")
    return documents


def embedded_dataset(max_bytes: int, vocab_size: int, cache_dir: Path) -> Path:
    """The prepared embedded corpus, from the cache or prepared now (a few seconds)."""
    documents = embedded_documents(max_bytes)
    digest = hashlib.sha256(f"{RECIPE}|{vocab_size}|{SHARD_SIZE}|{VAL_FRACTION}".encode())
    for document in documents:
        digest.update(document.encode("utf-8") + b"\0")
    target = cache_dir / "embedded" / f"stdlib-v{vocab_size}-{digest.hexdigest()[:16]}"
    if (target / MANIFEST).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / MANIFEST).is_file():
            prepare_dataset(
                lambda: documents,
                target,
                vocab_size=vocab_size,
                shard_size=SHARD_SIZE,
                val_fraction=VAL_FRACTION,
                workers=1,
                inputs=["<python stdlib>"],
                progress=False,
                overwrite=True,
            )
    return target
