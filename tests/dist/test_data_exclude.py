"""Exclusions on real data-parallel processes: excluded at 2 ranks, resumed at 3 from the loader state alone;
the epoch serves the corpus minus the excluded documents, exactly."""

import json
from collections import Counter

from gptscale.data.loader import Source, StreamingLoader
from gptscale.data.manifest import read_manifest
from tests.datasets import layout, make_dataset, random_documents, read_document, split_tokens
from tests.dist.test_data_ranks import launch


def test_exclude_at_two_ranks_resume_at_three(tmp_path):
    documents = random_documents(200, 0, 1000, seed=22)
    dataset = make_dataset(tmp_path / "numbers", documents, shard_size=2500)
    manifest = read_manifest(str(dataset))
    whole = StreamingLoader([Source(manifest, "train", 1.0)], layout(1, 1, 6), 0, 16, seed=1234)
    rows = whole.orders[0].rows
    # Before and after the switch of layout; not the epoch's first document, whose first token is nobody's label.
    early = [identity for identity in whole.documents_at(2) if identity not in whole.documents_at(0)]
    excluded = early[:2] + whole.documents_at(rows - 3)[-2:]
    job = {"dataset": str(dataset), "global_batch": 6, "micro_batch": 1, "seq_len": 16}
    first_part, state = launch(
        2, tmp_path, "dp2", steps=6, resume=None, workers=1, exclude=[str(identity) for identity in excluded], **job
    )
    second_part, final_state = launch(3, tmp_path, "dp3", steps=rows - 6, resume=str(state), workers=2, **job)
    served = Counter(label for rank in first_part + second_part for label in rank["labels"])
    served[first_part[0]["first"]] += 1  # the epoch's first token is nobody's label
    removed = sum((Counter(read_document(manifest, identity)) for identity in excluded), Counter())
    assert sum(removed.values()) > 0
    assert served == Counter(split_tokens(documents, manifest.eod)) - removed
    assert json.loads(final_state.read_text())["exclude"] == sorted(str(identity) for identity in set(excluded))
