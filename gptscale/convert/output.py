"""Writing converter outputs safely, and the summary printed at the end.

Outputs are written next to their destination under a temporary name and renamed into place when complete,
so an interrupted conversion never leaves a half-written model where a consumer would load it. An output
that already holds something is refused unless the caller asks to overwrite it, and even then it is
replaced only when it is a previous output of the same kind: ``--out`` pointed at a run once replaced the
run's checkpoints and metrics with the export. An output that is, holds or lies inside the source is
refused before anything is read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from gptscale.checkpoint.manifest import MANIFEST
from gptscale.convert import ConversionError
from gptscale.tracking.jsonl import METRICS


@dataclass(frozen=True)
class OutputKind:
    """What a converter writes, and how a previous output of it is known: the one thing --overwrite replaces."""

    words: str
    recognise: Callable[[Path], bool]
    checkpoint: bool = False  # the output is a checkpoint: its own manifest is no run's


def _is_hf_export(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    )


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as file:
        return file.read(4) == b"GGUF"


def _is_import(path: Path) -> bool:
    """A checkpoint ``save_model_state`` wrote (weights only, no layout), not one a training run saved."""
    try:
        return json.loads((path / MANIFEST).read_text()).get("layout", "") is None
    except (OSError, ValueError, AttributeError):
        return False


HF_EXPORT = OutputKind("a Hugging Face export (a directory with config.json and model.safetensors)", _is_hf_export)
GGUF_FILE = OutputKind("a GGUF file", _is_gguf)
IMPORTED = OutputKind(
    "a checkpoint imported by gptscale-convert --from-hf (weights only, no training layout)",
    _is_import,
    checkpoint=True,
)


def check_output(out: Path, kind: OutputKind, sources: Sequence[Path], overwrite: bool) -> None:
    """Refuse ``out`` before converting when it is, holds or lies inside a source, lies inside a run or a
    checkpoint, or holds something ``--overwrite`` must not replace."""
    where = Path(out).resolve()
    for source in sources:
        read = Path(source).resolve()
        relation = (
            "is"
            if where == read
            else "lies inside"
            if read in where.parents
            else "contains"
            if where in read.parents
            else None
        )
        if relation is not None:
            raise ConversionError(
                f"--out {out} {relation} {source}, which this conversion reads; writing there "
                "would destroy or change it: choose a path outside it"
            )
    for above in where.parents:
        mark = next((above / name for name in (METRICS, MANIFEST) if (above / name).is_file()), None)
        if mark is not None:
            raise ConversionError(
                f"--out {out} lies inside {above}, a run's or a checkpoint's directory (it holds "
                f"{mark.name}): choose a path outside it"
            )
    _check_replaceable(Path(out), kind, overwrite)


def _check_replaceable(out: Path, kind: OutputKind, overwrite: bool) -> None:
    if not _occupied(out):
        return
    if not overwrite:
        raise ConversionError(
            f"{out} already exists and is not empty; pass --overwrite to replace it (only {kind.words})"
        )
    if not kind.recognise(out):
        raise ConversionError(f"--overwrite replaces only {kind.words}, and {out} is not one: choose another --out")
    kept = (
        [
            path
            for path in out.rglob("*")
            if path.name == METRICS or (path.name == MANIFEST and not (kind.checkpoint and path == out / MANIFEST))
        ]
        if out.is_dir()
        else []
    )
    if kept:
        raise ConversionError(
            f"{out} holds {kept[0]}, part of a run or a checkpoint, which --overwrite never "
            "replaces: choose another --out"
        )


def _occupied(path: Path) -> bool:
    return path.is_file() or path.is_symlink() or (path.is_dir() and any(path.iterdir()))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _with_umask(path: Path) -> None:
    """The modes a plain mkdir or open would have given (tempfile makes 0700 directories and 0600 files, which
    other users of a shared cluster could not read)."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def staged(out: Path, kind: OutputKind, overwrite: bool, make_dir: bool) -> Iterator[Path]:
    """A temporary path beside ``out``, moved to ``out`` when the block succeeds: an empty directory to
    fill (``make_dir``), or else a path that does not exist yet, for a writer that creates its output
    itself (a file, or a checkpoint directory that ``save_model_state`` publishes by rename). What is at
    ``out`` is checked again here: it may have changed since ``check_output``."""
    out = Path(out)
    _check_replaceable(out, kind, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    target = stage if make_dir else stage / out.name
    try:
        yield target
        _with_umask(target)
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
        head = [
            f"{self.kind}: {self.architecture}, {self.parameters / 1e6:.2f}M parameters, {self.dtype}",
            f"written to {self.out} ({len(self.files)} files, {_human(total)})",
        ]
        return head + [
            f"  {str(path.relative_to(root)):<48} {_human(path.stat().st_size):>12}" for path in sorted(self.files)
        ]


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"
