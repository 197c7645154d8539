"""The streaming loader: every token once per epoch on any layout, exact resumption, blending, seeds."""

from collections import Counter

import pytest
import torch

from gptscale.data.batch import document_attention_mask
from gptscale.data.loader import Source, StreamingLoader
from gptscale.data.manifest import DataError, read_manifest
from gptscale.train.step import attention_mask
from tests.datasets import layout, make_dataset, random_documents, split_tokens

SEQ_LEN = 16
GLOBAL_BATCH = 12  # divisible by 2 and 3 data-parallel ranks with micro-batch 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    documents = random_documents(240, 0, 1000, seed=0)
    directory = make_dataset(tmp_path_factory.mktemp("loader") / "numbers", documents, shard_size=2000)
    manifest = read_manifest(str(directory))
    return manifest, Counter(split_tokens(documents, manifest.eod))


def loaders(manifest, dp, micro_batch=2, workers=0, seed=7, split="train", **options):
    return [
        StreamingLoader(
            [Source(manifest, split, 1.0)],
            layout(dp, micro_batch, GLOBAL_BATCH),
            rank,
            SEQ_LEN,
            seed=seed,
            workers=workers,
            **options,
        )
        for rank in range(dp)
    ]


def run_steps(ranks, steps):
    """Micro-batches of ``steps`` optimizer steps, per step the ranks' micro-batches in rank order."""
    per_rank = GLOBAL_BATCH // ranks[0].layout.dp // ranks[0].layout.micro_batch
    return [[next(loader) for loader in ranks for _ in range(per_rank)] for _ in range(steps)]


def served_labels(steps) -> Counter:
    counts = Counter()
    for batches in steps:
        for batch in batches:
            counts.update(batch["labels"][batch["loss_mask"].bool()].tolist())
    return counts


def step_sequences(batches) -> list[tuple]:
    """The step's sequences as a sorted list: the global batch as a set, whatever the split."""
    rows = [
        tuple(row.tolist()) for batch in batches for row in torch.cat([batch["tokens"], batch["labels"][:, -1:]], 1)
    ]
    return sorted(rows)


def close(ranks):
    for loader in ranks:
        loader.close()


@pytest.mark.parametrize("dp", [2, 3])
def test_one_epoch_serves_every_token_once(corpus, dp):
    """2 and 3 ranks x 2 worker processes: labels of one epoch plus its first input = the corpus."""
    manifest, tokens = corpus
    ranks = loaders(manifest, dp, workers=2)
    epoch = run_steps(ranks, ranks[0].orders[0].rows)
    close(ranks)
    served = served_labels(epoch)
    served[int(epoch[0][0]["tokens"][0, 0])] += 1  # the epoch stream's first token is nobody's label
    assert served == tokens


def test_global_batch_is_the_same_set_under_every_layout(corpus):
    manifest, _ = corpus
    reference = [step_sequences(step) for step in run_steps(loaders(manifest, 1, micro_batch=12), 5)]
    for dp, micro_batch, workers in [(1, 1, 0), (2, 3, 0), (3, 2, 2), (6, 1, 0)]:
        ranks = loaders(manifest, dp, micro_batch, workers)
        assert [step_sequences(step) for step in run_steps(ranks, 5)] == reference, (dp, micro_batch, workers)
        close(ranks)


def test_resume_continues_with_exactly_the_next_batches(corpus):
    manifest, _ = corpus
    [straight] = loaders(manifest, 1, micro_batch=3)
    expected = [next(straight) for _ in range(30)]
    [first] = loaders(manifest, 1, micro_batch=3)
    for _ in range(10):  # 2.5 steps: stops inside a step
        next(first)
    state = first.state_dict()
    [resumed] = loaders(manifest, 1, micro_batch=3, workers=2, seed=999)  # seed comes from the state
    resumed.load_state_dict(state)
    for want in expected[10:]:
        got = next(resumed)
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), name
    resumed.close()


def test_state_is_small_and_the_same_on_every_rank(corpus):
    manifest, _ = corpus
    ranks = loaders(manifest, 3)
    run_steps(ranks, 4)
    states = [loader.state_dict() for loader in ranks]
    assert states[0] == states[1] == states[2]
    assert states[0]["step"] == 4 and states[0]["sources"][0]["sequences"] == 4 * GLOBAL_BATCH
    assert len(repr(states[0])) < 1000


def test_resume_on_three_ranks_after_two_covers_the_rest_exactly_once(corpus):
    manifest, tokens = corpus
    before = loaders(manifest, 2, workers=2)
    rows = before[0].orders[0].rows
    first_part = run_steps(before, 9)
    state = before[1].state_dict()
    close(before)
    after = loaders(manifest, 3, workers=1)
    for loader in after:
        loader.load_state_dict(state)
    second_part = run_steps(after, rows - 9)
    close(after)
    served = served_labels(first_part) + served_labels(second_part)
    served[int(first_part[0][0]["tokens"][0, 0])] += 1
    assert served == tokens


def test_same_seed_same_order_other_seed_other_order(corpus):
    manifest, _ = corpus
    first, again, other = (loaders(manifest, 1, seed=seed)[0] for seed in (1, 1, 2))
    a, b, c = ([next(loader)["tokens"] for _ in range(6)] for loader in (first, again, other))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, z) for x, z in zip(a, c))


def test_blending_follows_the_weights(tmp_path):
    low = make_dataset(tmp_path / "low", random_documents(60, 0, 500, seed=1), shard_size=4000)
    high = make_dataset(tmp_path / "high", random_documents(30, 500, 1000, seed=2), shard_size=4000)
    sources = [Source(read_manifest(str(low)), "train", 0.7), Source(read_manifest(str(high)), "train", 0.3)]
    loader = StreamingLoader(sources, layout(1, 8, 8), 0, 8, seed=3)
    from_low = 0
    for _ in range(1250):  # 10,000 sequences
        batch = next(loader)
        real = batch["tokens"] < 1000  # not the end-of-document id
        from_low += int(((batch["tokens"] < 500) & real).any(dim=1).sum())
    assert abs(from_low / 10_000 - 0.7) < 0.02
    state = loader.state_dict()
    assert [s["weight"] for s in state["sources"]] == [0.7, 0.3]
    assert abs(state["sources"][0]["sequences"] - 7000) <= 8


def test_documents_reset_positions_and_attention(corpus):
    manifest, _ = corpus
    [loader] = loaders(manifest, 1, micro_batch=12, reset_attention_at_eod=True)
    batch = next(loader)
    eod = manifest.eod
    tokens, positions = batch["tokens"], batch["position_ids"]
    mask = document_attention_mask(batch["document_ids"])
    assert mask.shape == (12, 1, SEQ_LEN, SEQ_LEN) and mask.dtype == torch.bool
    assert (tokens == eod).any(), "the test needs a document boundary inside a sequence"
    for row in range(12):
        document = 0
        start = 0
        for t in range(SEQ_LEN):
            if t > 0 and tokens[row, t - 1] == eod:
                document, start = document + 1, t
            assert positions[row, t] == t - start
            for s in range(SEQ_LEN):
                same_document = s >= start and (s <= t)
                assert bool(mask[row, 0, t, s]) == (not same_document), (row, t, s)


def test_the_step_hands_the_model_the_document_mask(corpus):
    """Document ids leave the loader; the model gets the mask built from them where the step runs."""
    manifest, _ = corpus
    [loader] = loaders(manifest, 1, micro_batch=4, reset_attention_at_eod=True)
    batch = next(loader)
    mask = attention_mask(batch)
    assert torch.equal(mask, document_attention_mask(batch["document_ids"]))
    past = torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril()
    assert (mask[:, 0] & past).any(), "some token must not see an earlier document"
    [plain] = loaders(manifest, 1, micro_batch=4)
    assert attention_mask(next(plain)) is None  # causal attention without a mask tensor


def test_pipeline_middle_stages_get_placeholders_without_reading(corpus, tmp_path):
    manifest, _ = corpus
    [middle] = loaders(manifest, 1, micro_batch=4, serves_tokens=False)
    [reader] = loaders(manifest, 1, micro_batch=4)
    for _ in range(5):
        placeholder, real = next(middle), next(reader)
        assert {k: v.shape for k, v in placeholder.items()} == {k: v.shape for k, v in real.items()}
    assert middle.state_dict() == reader.state_dict()


def test_resume_refuses_another_global_batch(corpus):
    manifest, _ = corpus
    [loader] = loaders(manifest, 1)
    state = loader.state_dict()
    other = StreamingLoader([Source(manifest, "train", 1.0)], layout(1, 2, 8), 0, SEQ_LEN, seed=7)
    with pytest.raises(DataError, match="global_batch=12"):
        other.load_state_dict(state)


def test_too_little_data_names_the_dataset(corpus):
    manifest, _ = corpus
    with pytest.raises(DataError, match="fewer than one global batch"):
        StreamingLoader([Source(manifest, "train", 1.0)], layout(1, 1, 4096), 0, 512, seed=0)
