"""The loader on real data-parallel processes: 3 ranks serve part of an epoch, 2 ranks resume from the
saved state and finish it; together every token of the epoch is served exactly once."""

import json
from collections import Counter

from gptscale.data.loader import Source, StreamingLoader
from gptscale.data.manifest import read_manifest
from tests.datasets import layout, make_dataset, random_documents, split_tokens
from tests.helpers import torchrun


def launch(nprocs, tmp_path, name, **job):
    output = tmp_path / name
    output.mkdir()
    job_file = tmp_path / f"{name}.json"
    job_file.write_text(json.dumps({**job, "output": str(output)}))
    torchrun(nprocs, ["tests/dist/run_data.py", str(job_file)], timeout=600)
    ranks = [json.loads(p.read_text()) for p in sorted(output.glob("rank*.json"))]
    assert len(ranks) == nprocs
    return ranks, output / "state.json"


def test_three_ranks_then_two_cover_one_epoch_exactly_once(tmp_path):
    documents = random_documents(200, 0, 1000, seed=21)
    dataset = make_dataset(tmp_path / "numbers", documents, shard_size=2500)
    manifest = read_manifest(str(dataset))
    job = {"dataset": str(dataset), "global_batch": 6, "micro_batch": 1, "seq_len": 16, "workers": 1}
    rows = StreamingLoader([Source(manifest, "train", 1.0)], layout(1, 1, 6), 0, 16, seed=1234).orders[0].rows
    first_part, state = launch(3, tmp_path, "dp3", steps=7, resume=None, **job)
    second_part, _ = launch(2, tmp_path, "dp2", steps=rows - 7, resume=str(state), **job)
    served = Counter(label for rank in first_part + second_part for label in rank["labels"])
    served[first_part[0]["first"]] += 1  # the epoch's first token is nobody's label
    assert served == Counter(split_tokens(documents, manifest.eod))
