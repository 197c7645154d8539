"""What a run learns from its loss spikes, kept in RUN_DIR so that a rewind, even in a new process, uses it.

- ``skipped_documents.txt``: the documents of every step skipped as a spike, one identity a line with the
  step as a comment: a ``data.exclude`` file. They are excluded from the loader at once, and a rewind
  brings them back into the exclusion list of the state it reloads.
- ``rewinds.jsonl``: one line per rewind (from which step to which checkpoint, why, how many documents
  newly excluded), so that ``checkpoint.rewind=N`` left on a command line that is relaunched (a requeued
  job) rewinds once, not on every start.

Every rank reads both files and holds the same lists; global rank 0 writes them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

from gptscale.data.exclude import DocumentId, write_exclusions
from gptscale.files import replace_text

SKIPPED_DOCUMENTS = "skipped_documents.txt"
REWINDS = "rewinds.jsonl"
AT_START = "checkpoint.rewind"  # the reason of a rewind asked for on the command line


class SpikeRecord:
    def __init__(self, run_dir: Path, writes: bool):
        self.documents_file = Path(run_dir) / SKIPPED_DOCUMENTS
        self.rewinds_file = Path(run_dir) / REWINDS
        self.writes = writes
        self.documents: dict[DocumentId, str] = {}  # identity -> where it was seen
        if self.documents_file.is_file():
            for number, line in enumerate(self.documents_file.read_text(encoding="utf-8").splitlines(), start=1):
                text, _, comment = line.partition("#")
                if text.strip():
                    self.documents[DocumentId.parse(text, f"{self.documents_file} line {number}")] = comment.strip()
        self.rewinds: list[dict] = []
        if self.rewinds_file.is_file():
            self.rewinds = [json.loads(line) for line in self.rewinds_file.read_text().splitlines() if line.strip()]

    def add(self, identities: Iterable[DocumentId], where: str) -> None:
        for identity in identities:
            self.documents.setdefault(identity, where)
        if self.writes:
            self.documents_file.parent.mkdir(parents=True, exist_ok=True)
            write_exclusions(self.documents_file, sorted(self.documents.items()))

    def rewound_at_start_to(self, step: int) -> bool:
        return any(entry["reason"] == AT_START and entry["to_step"] == step for entry in self.rewinds)

    def automatic_rewinds(self) -> int:
        return sum(entry["reason"] != AT_START for entry in self.rewinds)

    def add_rewind(self, entry: dict) -> None:
        entry = {**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.rewinds.append(entry)
        if self.writes:
            self.rewinds_file.parent.mkdir(parents=True, exist_ok=True)
            replace_text(self.rewinds_file, "".join(json.dumps(line) + "\n" for line in self.rewinds))
