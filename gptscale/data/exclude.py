"""Excluded documents: identities that hold whatever the layout, and the list a run never trains on again.

A document is named by ``FINGERPRINT:SHARD:INDEX``: the fingerprint of its source (one split of one
dataset, ``loader.Source.fingerprint``: the data, not where it lives), the shard's name and the document's
index in that shard. The global order knows where each document lies, so the identity is the same under
any number of ranks, workers or micro-batches, and so is its effect: an excluded document is read as an
empty document in place (masked padding, then its end-of-document token, which the next document's first
token follows as usual), so every other token stays where the order puts it and is served as before: an
epoch serves the corpus minus the excluded documents, exactly. ``data.exclude`` lists identities or files
of them (one a line, ``#`` starts a comment); each loader keeps its list in its checkpointed state.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from gptscale.data.manifest import DataError
from gptscale.files import replace_text

_IDENTITY = re.compile(r"^([0-9a-f]{16}):(.+):(\d+)$")


@dataclass(frozen=True, order=True)
class DocumentId:
    fingerprint: str
    shard: str
    document: int

    def __str__(self) -> str:
        return f"{self.fingerprint}:{self.shard}:{self.document}"

    @classmethod
    def parse(cls, text: str, where: str) -> "DocumentId":
        match = _IDENTITY.match(text.strip())
        if match is None:
            raise DataError(
                f"{where}: {text.strip()!r} is not a document identity FINGERPRINT:SHARD:INDEX "
                "(16 hex digits, a shard name, a document index)"
            )
        return cls(match.group(1), match.group(2), int(match.group(3)))


def read_exclusions(entries: Iterable[str]) -> list[DocumentId]:
    """``data.exclude``: each entry an identity, or a file holding one identity a line."""
    found = []
    for number, entry in enumerate(entries):
        if os.path.isfile(entry):
            for line_number, line in enumerate(Path(entry).read_text(encoding="utf-8").splitlines(), start=1):
                line = line.split("#", 1)[0].strip()
                if line:
                    found.append(DocumentId.parse(line, f"{entry} line {line_number}"))
        else:
            found.append(DocumentId.parse(entry, f"data.exclude[{number}] (not a file either)"))
    return found


def write_exclusions(path: Path, identities: Iterable[tuple[DocumentId, str]]) -> None:
    """Write ``(identity, comment)`` lines to ``path`` through a temporary name (``data.exclude`` reads it)."""
    replace_text(path, "".join(f"{identity}  # {comment}\n" for identity, comment in identities))


def check_exclusions(identities: Iterable[DocumentId], sources: dict[str, dict[str, int]], what: str) -> None:
    """Every identity names a source of this run, one of its shards and a document that shard holds.

    ``sources``: fingerprint -> {shard name: documents}, of every split this run reads."""
    for identity in identities:
        shards = sources.get(identity.fingerprint)
        if shards is None:
            raise DataError(
                f"{what}: {identity} names data this run does not read: no source has fingerprint "
                f"{identity.fingerprint} (this run's: {', '.join(sorted(sources))}); the list was "
                "made for another dataset"
            )
        if identity.shard not in shards:
            raise DataError(f"{what}: {identity}: source {identity.fingerprint} has no shard {identity.shard!r}")
        if identity.document >= shards[identity.shard]:
            raise DataError(
                f"{what}: {identity}: shard {identity.shard} holds {shards[identity.shard]} documents, "
                f"no document {identity.document}"
            )
