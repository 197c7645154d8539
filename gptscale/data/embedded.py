"""A corpus every machine has: the Python standard library's own source, as bytes.

Used by the default job (no download, no preparation step). Tokens are bytes plus one end-of-document id.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

BYTE_VOCAB_SIZE = 257
EOD = 256


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def embedded_tokens(max_bytes: int) -> np.ndarray:
    """Byte tokens of the standard library's top-level modules, in a fixed order, each followed by EOD."""
    chunks, total = [], 0
    for path in stdlib_sources():
        data = path.read_bytes()
        chunks.append(np.frombuffer(data, dtype=np.uint8).astype(np.uint16))
        chunks.append(np.array([EOD], dtype=np.uint16))
        total += len(data) + 1
        if total >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError(f"no Python sources under {sysconfig.get_paths()['stdlib']}")
    return np.concatenate(chunks)[:max_bytes]
