"""Small files written whole or not at all: through a temporary name beside the target, then renamed, so a
reader (a resumed run, a relaunched job, a user) never takes half a file for the file."""

from __future__ import annotations

import os
from pathlib import Path


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8), replacing what was there in one rename."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
