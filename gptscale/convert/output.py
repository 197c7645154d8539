"""Writing converter outputs safely, and the summary printed at the end.

Outputs are written next to their destination under a temporary name and renamed into place when complete,
so an interrupted conversion never leaves a half-written model where a consumer would load it. An output
that already holds something is refused unless the caller asks to overwrite it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from gptscale.convert import ConversionError


def _occupied(path: Path) -> bool:
    return path.is_file() or path.is_symlink() or (path.is_dir() and any(path.iterdir()))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def staged(out: Path, overwrite: bool, make_dir: bool) -> Iterator[Path]:
    """A temporary path beside ``out``, moved to ``out`` when the block succeeds: an empty directory to
    fill (``make_dir``), or else a path that does not exist yet, for a writer that creates its output
    itself (a file, or a checkpoint directory that ``save_model_state`` publishes by rename)."""
    out = Path(out)
    if _occupied(out) and not overwrite:
        raise ConversionError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    target = stage if make_dir else stage / out.name
    try:
        yield target
        if out.exists() or out.is_symlink():
            _remove(out)
        os.replace(target, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


@dataclass
class Summary:
    """What a conversion wrote, for the closing report."""

    kind: str
    architecture: str
    parameters: int
    dtype: str
    out: Path
    files: list[Path] = field(default_factory=list)

    def lines(self) -> list[str]:
        total = sum(path.stat().st_size for path in self.files)
        root = self.out if self.out.is_dir() else self.out.parent
        head = [f"{self.kind}: {self.architecture}, {self.parameters / 1e6:.2f}M parameters, {self.dtype}",
                f"written to {self.out} ({len(self.files)} files, {_human(total)})"]
        return head + [f"  {str(path.relative_to(root)):<48} {_human(path.stat().st_size):>12}"
                       for path in sorted(self.files)]


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"
