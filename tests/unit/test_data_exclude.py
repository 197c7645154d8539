"""Excluded documents: read as empty documents in place, the list in the loader state, bad lists refused."""

from collections import Counter

import pytest

from gptscale.config.schema import DataConfig
from gptscale.data import build_data
from gptscale.data.exclude import DocumentId, read_exclusions, write_exclusions
from gptscale.data.loader import Source, StreamingLoader
from gptscale.data.manifest import DataError, read_manifest
from tests.datasets import layout, make_dataset, random_documents, read_document, split_tokens

SEQ_LEN, GLOBAL_BATCH = 16, 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    documents = random_documents(120, 0, 1000, seed=5)
    directory = make_dataset(tmp_path_factory.mktemp("exclude") / "numbers", documents, shard_size=1500)
    return read_manifest(str(directory)), documents


def loader(manifest, exclude=(), dp=1, rank=0, workers=0):
    return StreamingLoader(
        [Source(manifest, "train", 1.0)],
        layout(dp, 1, GLOBAL_BATCH),
        rank,
        SEQ_LEN,
        seed=3,
        workers=workers,
        exclude=exclude,
    )


def epoch_labels(ranks) -> Counter:
    """Labels of one epoch served by ``ranks`` (plus the epoch's first input, nobody's label)."""
    served, first = Counter(), None
    for _ in range(ranks[0].orders[0].rows):
        for rank in ranks:
            for _ in range(rank.layout.num_microbatches):
                batch = next(rank)
                first = int(batch["tokens"][0, 0]) if first is None else first
                served.update(batch["labels"][batch["loss_mask"].bool()].tolist())
    served[first] += 1
    return served


def document_tokens(manifest, identities) -> Counter:
    """The tokens (end-of-document included) of the named documents."""
    return sum((Counter(read_document(manifest, identity)) for identity in identities), Counter())


def test_excluded_documents_leave_the_epoch_and_the_rest_stays(corpus):
    manifest, documents = corpus
    whole = loader(manifest)
    chosen = whole.documents_at(4)[:3] + whole.documents_at(9)[-2:]
    expected = Counter(split_tokens(documents, manifest.eod)) - document_tokens(manifest, chosen)
    ranks = [loader(manifest, exclude=chosen, dp=2, rank=rank, workers=1) for rank in range(2)]
    assert epoch_labels(ranks) == expected
    assert ranks[0].state_dict()["exclude"] == sorted(str(i) for i in set(chosen))
    assert not set(chosen) & set(ranks[0].documents_at(4))


def test_exclusions_resume_from_the_state_and_can_grow(corpus):
    manifest, _ = corpus
    first = loader(manifest)
    identities = first.documents_at(2)[:2]
    first.exclude(identities)
    for _ in range(3):
        next(first)
    resumed = loader(manifest, exclude=first.documents_at(7)[:1])
    resumed.load_state_dict(first.state_dict())
    assert resumed.excluded == set(identities) | set(first.documents_at(7)[:1])
    assert resumed.exclude(identities) == []  # nothing new


def test_exclusion_files_and_bad_lists(corpus, tmp_path):
    manifest, _ = corpus
    identities = loader(manifest).documents_at(0)[:2]
    listing = tmp_path / "excluded.txt"
    write_exclusions(listing, [(identity, "step 1") for identity in identities])
    assert read_exclusions([str(listing)]) == identities
    layout_1 = layout(1, 1, GLOBAL_BATCH)
    data = build_data(DataConfig(path=manifest.location, exclude=[str(listing)]), layout_1, 0, SEQ_LEN)
    assert data.train.excluded == set(identities)
    other = DocumentId("0123456789abcdef", identities[0].shard, 0)
    with pytest.raises(DataError, match=f"{other}.*no source has fingerprint 0123456789abcdef.*another dataset"):
        build_data(DataConfig(path=manifest.location, exclude=[str(other)]), layout_1, 0, SEQ_LEN)
    no_shard = DocumentId(identities[0].fingerprint, "nope.tar", 0)
    with pytest.raises(DataError, match="has no shard 'nope.tar'"):
        build_data(DataConfig(path=manifest.location, exclude=[str(no_shard)]), layout_1, 0, SEQ_LEN)
    too_far = DocumentId(identities[0].fingerprint, identities[0].shard, 10_000)
    with pytest.raises(DataError, match="no document 10000"):
        build_data(DataConfig(path=manifest.location, exclude=[str(too_far)]), layout_1, 0, SEQ_LEN)
    listing.write_text("garbage line\n")
    with pytest.raises(DataError, match=f"{listing} line 1: 'garbage line' is not a document identity"):
        read_exclusions([str(listing)])
