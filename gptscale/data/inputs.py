"""Raw documents for preparation: text files (one document each), JSON lines and Parquet (one per row).

Paths, directories (searched recursively) and glob patterns expand to a sorted file list, so the document
order, and with it every shard, does not depend on the file system's listing order.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from pathlib import Path
from typing import IO, Iterator

import zstandard

from gptscale.data.manifest import DataError

JSON_LINES = {".jsonl", ".ndjson", ".json"}
TEXT = {".txt", ".text", ".md", ".rst"}
CODE = {".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts", ".sh"}  # read as text
PARQUET = {".parquet"}
COMPRESSED = {".gz", ".zst", ".zstd"}
KNOWN = JSON_LINES | TEXT | CODE | PARQUET  # what a directory given as --input contributes


def _format_suffix(path: Path) -> str:
    """The suffix that names the format, looking through a compression suffix (``a.jsonl.zst``: ``.jsonl``)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _kind(path: Path) -> str:
    suffix = _format_suffix(path)
    if suffix in PARQUET:
        return "parquet"
    return "jsonl" if suffix in JSON_LINES else "text"


def _known(path: Path) -> bool:
    return _format_suffix(path) in KNOWN


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Every input file, sorted and unique. Directories contribute the files with a known suffix."""
    files: set[Path] = set()
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matched = [p for p in path.rglob("*") if p.is_file() and _known(p)]
        elif path.is_file():
            matched = [path]
        else:
            matched = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
        if not matched:
            looked_for = " ".join(sorted(KNOWN)) if path.is_dir() else "files matching it"
            raise DataError(
                f"--input {pattern}: no input files there (looked for {looked_for}; each may also end "
                f"in {' or '.join(sorted(COMPRESSED))})"
            )
        files.update(p.resolve() for p in matched)
    return sorted(files)


def _open_text(path: Path) -> IO[str]:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if suffix in (".zst", ".zstd"):
        stream = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.TextIOWrapper(stream, encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one input file, in file order."""
    kind = _kind(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if text_field not in parquet.schema_arrow.names:
            raise DataError(
                f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names}); "
                "choose one with --text-field"
            )
        for batch in parquet.iter_batches(columns=[text_field]):
            yield from (text or "" for text in batch.column(0).to_pylist())
        return
    with _open_text(path) as stream:
        if kind == "text":
            yield stream.read()
            return
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record[text_field]
            except (ValueError, KeyError, TypeError) as error:
                raise DataError(
                    f"{path}:{number}: no JSON object with a {text_field!r} field ({error!r}); "
                    "choose the field with --text-field"
                ) from None
            if not isinstance(text, str):
                raise DataError(f"{path}:{number}: field {text_field!r} is not a string")
            yield text
