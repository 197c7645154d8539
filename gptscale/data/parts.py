"""The input cut into parts: the unit of work of a distributed preparation, and of its output.

A part is a whole file, a run of a Parquet file's row groups, or a line-aligned byte range of an
uncompressed JSON-lines file, cut at ``--part-size``. The cut depends only on the files and the part size,
never on the number of tasks, so every part gives the same shards however the parts are spread over
tasks. Compressed files (gzip, zstd) are one part each: their frames are not indexed, so finding a cut
would mean decompressing the file. Every read error names the file and the line (or byte offset) or row
group.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

from gptscale.data.inputs import _kind, read_documents
from gptscale.data.manifest import DataError


@dataclass(frozen=True)
class Part:
    index: int
    path: str
    kind: str  # "file": read whole; "lines": JSON lines in bytes [start, stop); "row_groups": row groups [start, stop)
    start: int = 0
    stop: int = 0
    bytes: int = 0  # the size it stands for, to balance tasks

    def describe(self) -> str:
        if self.kind == "lines":
            return f"part {self.index} ({self.path} bytes {self.start}-{self.stop})"
        if self.kind == "row_groups":
            return f"part {self.index} ({self.path} row groups {self.start}-{self.stop - 1})"
        return f"part {self.index} ({self.path})"

    def to_dict(self) -> dict:
        return asdict(self)


def plan_parts(files: list[Path], part_size: int, data_format: str) -> list[Part]:
    """The parts of ``files`` (already sorted), in corpus order. Reads only sizes and Parquet footers."""
    parts: list[Part] = []
    for path in files:
        try:
            size = path.stat().st_size
        except OSError as error:
            raise DataError(f"{path}: cannot be read ({error.strerror})") from None
        kind = _kind(path) if data_format == "text" else "jsonl"
        compressed = path.suffix.lower() in (".gz", ".zst", ".zstd")
        if kind == "parquet":
            parts += _parquet_parts(path, part_size, len(parts))
        elif kind == "jsonl" and data_format == "text" and not compressed and size > part_size:
            for start in range(0, size, part_size):
                stop = min(size, start + part_size)
                parts.append(Part(len(parts), str(path), "lines", start, stop, stop - start))
        else:
            parts.append(Part(len(parts), str(path), "file", bytes=size))
    return parts


def _parquet_parts(path: Path, part_size: int, first: int) -> list[Part]:
    """Runs of row groups; a file whose footer does not read is one part, whose task names the fault."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception:  # pyarrow raises ArrowInvalid / OSError for files that are not Parquet
        return [Part(first, str(path), "file", bytes=path.stat().st_size)]
    parts: list[Part] = []
    start, size = 0, 0
    for group in range(metadata.num_row_groups):
        size += metadata.row_group(group).total_byte_size
        if size >= part_size or group == metadata.num_row_groups - 1:
            parts.append(Part(first + len(parts), str(path), "row_groups", start, group + 1, size))
            start, size = group + 1, 0
    return parts


class Skips:
    """Bad lines, row groups or files passed over under ``--on-error skip``: counted, the first few kept."""

    def __init__(self, on_error: str):
        self.on_error = on_error
        self.count = 0
        self.examples: list[str] = []

    def bad(self, message: str) -> None:
        if self.on_error != "skip":
            raise DataError(message)
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(message)


def read_part(part: Part, text_field: str, records: Optional[Callable[[Path], Iterator]], skips: Skips) -> Iterator:
    """The documents of one part, in file order. ``records``: reads a whole file of fine-tuning records."""
    path = Path(part.path)
    if not path.is_file():
        skips.bad(f"{path}: the input file is gone (it was there when the job was planned)")
        return
    if records is not None:
        yield from records(path)
    elif part.kind == "lines":
        yield from _read_lines(path, part.start, part.stop, text_field, skips)
    elif _kind(path) == "parquet":
        yield from _read_row_groups(
            path, part.start, part.stop if part.kind == "row_groups" else None, text_field, skips
        )
    elif _kind(path) == "jsonl":
        yield from _read_lines(path, 0, None, text_field, skips)
    else:
        yield from read_documents(path, text_field)


def _read_lines(path: Path, start: int, stop: Optional[int], text_field: str, skips: Skips) -> Iterator[str]:
    """JSON lines that begin in bytes [start, stop): a line straddling ``start`` belongs to the part before."""
    from gptscale.data.inputs import _open_text

    stream: IO[Any]
    lines: Iterator[tuple[int, Optional[int], str]]
    if stop is None:
        stream = _open_text(path)
        lines = ((number, None, line) for number, line in enumerate(stream, start=1))
    else:
        stream = open(path, "rb")
        lines = _byte_lines(stream, start, stop)
    with stream:
        for number, offset, line in lines:
            if not line.strip():
                continue
            where = f"{path}:{number}" if number else f"{path}: line at byte {offset}"
            try:
                record = json.loads(line)
            except ValueError as error:
                skips.bad(f"{where}: not JSON ({error})")
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                skips.bad(
                    f"{where}: no string field {text_field!r} in the JSON object; choose the field with --text-field"
                )
                continue
            yield text


def _byte_lines(stream: IO[bytes], start: int, stop: int) -> Iterator[tuple[int, Optional[int], str]]:
    """(line number or 0 when unknown, byte offset, text) of the lines beginning in [start, stop)."""
    number = 1 if start == 0 else 0
    if start > 0:
        stream.seek(start - 1)
        if stream.read(1) != b"\n":
            stream.readline()
    offset = stream.tell()
    while offset < stop:
        line = stream.readline()
        if not line:
            return
        yield number, offset, line.decode("utf-8", errors="replace")
        offset += len(line)
        number = number + 1 if number else 0


def _read_row_groups(path: Path, start: int, stop: Optional[int], text_field: str, skips: Skips) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for files that are not Parquet
        skips.bad(f"{path}: not a readable Parquet file ({error})")
        return
    if text_field not in parquet.schema_arrow.names:
        skips.bad(
            f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names}); choose one with --text-field"
        )
        return
    for group in range(start, parquet.num_row_groups if stop is None else stop):
        try:
            texts = parquet.read_row_group(group, columns=[text_field]).column(0).to_pylist()
        except Exception as error:  # pyarrow's errors for corrupt pages are plain ArrowInvalid / OSError
            skips.bad(f"{path}: row group {group} cannot be read ({error})")
            continue
        yield from (text or "" for text in texts)
