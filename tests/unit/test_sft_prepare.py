"""Fine-tuning preparation: conversations and prompt/completion pairs become shards whose masks train exactly
the assistant turns; bad records fail naming file and line (or are counted and passed over with
--on-error skip); packing keeps documents whole and apart."""

import json

import numpy as np
import pytest
import zstandard
from tokenizers import Tokenizer

from gptscale.config.schema import DataConfig
from gptscale.data import build_data
from gptscale.data.manifest import SFT_FORMAT, DataError, read_manifest
from gptscale.data.prepare import main as prepare_main
from gptscale.data.shards import load_shard
from tests.datasets import layout


def documents(directory):
    """(tokens, mask) of every train document, and the tokenizer."""
    manifest = read_manifest(str(directory))
    decompressor = zstandard.ZstdDecompressor()
    out = []
    for info in manifest.shards("train"):
        shard = load_shard(manifest.url(info.name), info, manifest.numpy_dtype)
        out += [
            (shard.decode(i, manifest.numpy_dtype, decompressor), shard.decode_mask(i, decompressor))
            for i in range(info.samples)
        ]
    return manifest, out, Tokenizer.from_file(str(directory / "tokenizer.json"))


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "and 2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
]


def test_chat_masks_train_assistant_content_and_end_of_turn_only(tmp_path):
    source = write(tmp_path / "chat.jsonl", CHATS)
    prepare_main(
        [
            "--input",
            str(source),
            "--output",
            str(tmp_path / "out"),
            "--vocab-size",
            "300",
            "--format",
            "chat",
            "--val-fraction",
            "0",
            "--quiet",
        ]
    )
    manifest, docs, tokenizer = documents(tmp_path / "out")
    assert manifest.format == SFT_FORMAT and manifest.shards("train")[0].lengths == [len(t) for t, _ in docs]
    (first, first_mask), (second, second_mask) = docs
    assert tokenizer.decode(first[first_mask].tolist()) == "Paris<|im_end|>\n"
    assert tokenizer.decode(first[~first_mask].tolist()) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.decode(second[second_mask].tolist()) == "2<|im_end|>\n4<|im_end|>\n"
    assert first[-1] == manifest.eod and first_mask[-1], "the end of document after an answer is trained"


def test_prompt_completion_trains_the_completion(tmp_path):
    source = write(tmp_path / "pairs.jsonl", [{"prompt": "Q: 2+2=", "completion": " 4"}] * 3)
    prepare_main(
        [
            "--input",
            str(source),
            "--output",
            str(tmp_path / "out"),
            "--vocab-size",
            "300",
            "--format",
            "prompt-completion",
            "--val-fraction",
            "0",
            "--quiet",
        ]
    )
    _, docs, tokenizer = documents(tmp_path / "out")
    tokens, mask = docs[0]
    assert tokenizer.decode(tokens[mask].tolist()) == " 4" and tokenizer.decode(tokens[~mask].tolist()) == "Q: 2+2="


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            "unknown role 'wizard'",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            "empty assistant turn",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "user"}]}, "lacks a 'role' or a 'content'"),
        ({"text": "hi"}, "no 'messages' list"),
    ],
)
def test_bad_conversations_name_file_and_line(tmp_path, record, message):
    source = write(tmp_path / "chat.jsonl", [CHATS[0], record])
    with pytest.raises(SystemExit) as error:
        prepare_main(
            [
                "--input",
                str(source),
                "--output",
                str(tmp_path / "out"),
                "--vocab-size",
                "300",
                "--format",
                "chat",
                "--quiet",
            ]
        )
    assert f"{source}:2: " in str(error.value) and message in str(error.value)


def test_on_error_skip_passes_over_bad_records_and_counts_them(tmp_path, caplog):
    source = tmp_path / "chat.jsonl"
    source.write_text(
        json.dumps(CHATS[0]) + "\n{not json\n" + json.dumps({"messages": []}) + "\n" + json.dumps(CHATS[1]) + "\n"
    )
    prepare_main(
        [
            "--input",
            str(source),
            "--output",
            str(tmp_path / "out"),
            "--vocab-size",
            "300",
            "--format",
            "chat",
            "--val-fraction",
            "0",
            "--on-error",
            "skip",
            "--quiet",
        ]
    )
    _, docs, tokenizer = documents(tmp_path / "out")
    assert [tokenizer.decode(tokens[mask].tolist()) for tokens, mask in docs] == [
        "Paris<|im_end|>\n",
        "2<|im_end|>\n4<|im_end|>\n",
    ]
    assert "skipped 2 bad lines" in caplog.text and f"{source}:2: not JSON" in caplog.text


def test_missing_completion_names_file_and_line(tmp_path):
    source = write(tmp_path / "pairs.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    with pytest.raises(SystemExit, match=r"pairs.jsonl:2: no string field 'completion'"):
        prepare_main(
            [
                "--input",
                str(source),
                "--output",
                str(tmp_path / "out"),
                "--vocab-size",
                "300",
                "--format",
                "prompt-completion",
                "--quiet",
            ]
        )


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """Conversations of very different lengths, a few longer than a 64-token sequence."""
    rng = np.random.default_rng(0)
    records = [
        {
            "messages": [
                {"role": "user", "content": "".join(rng.choice(list("abcdefgh"), int(n)))},
                {"role": "assistant", "content": "ok"},
            ]
        }
        for n in rng.integers(1, 70, 60)
    ]
    tmp = tmp_path_factory.mktemp("varied")
    prepare_main(
        [
            "--input",
            str(write(tmp / "chat.jsonl", records)),
            "--output",
            str(tmp / "out"),
            "--vocab-size",
            "260",
            "--format",
            "chat",
            "--chat-template",
            "plain",
            "--val-fraction",
            "0",
            "--quiet",
        ]
    )
    return tmp / "out"


def test_long_conversations_raise_drop_or_truncate(varied):
    lengths = np.concatenate([s.lengths for s in read_manifest(str(varied)).shards("train")])
    long = int((lengths > 65).sum())
    assert long >= 3
    with pytest.raises(DataError, match=r"train-000000.tar: document \d+ holds \d+ tokens, more than a sequence"):
        build_data(DataConfig(path=str(varied)), layout(1, 4, 4), 0, 64)
    for options, documents in (({"on_error": "skip"}, len(lengths) - long), ({"truncate_long": True}, len(lengths))):
        data = build_data(DataConfig(path=str(varied), **options), layout(1, 4, 4), 0, 64)
        assert data.train.order.long_documents == long
        assert sum(len(s) for s in data.train.order.epoch(0)) == documents


def test_packing_keeps_documents_whole_and_apart(varied):
    packed = build_data(DataConfig(path=str(varied)), layout(1, 4, 4), 0, 128).train
    single = build_data(DataConfig(path=str(varied), packing=False), layout(1, 4, 4), 0, 128).train
    assert packed.order.steps_in(0) < single.order.steps_in(0)
    trained_packed = trained_single = 0
    for _ in range(packed.order.steps_in(0)):
        batch = next(packed)
        starts = batch["position_ids"] == 0
        assert (batch["document_ids"].diff(dim=1)[~starts[:, 1:]] == 0).all()  # positions restart per document
        assert not batch["loss_mask"][batch["tokens"] == packed.eod].any()  # no label from the next document
        trained_packed += int(batch["loss_mask"].sum())
    for _ in range(single.order.steps_in(0)):
        trained_single += int(next(single)["loss_mask"].sum())
    assert trained_packed == trained_single > 0


def test_resumes_mid_epoch_with_another_data_parallel_split(varied):
    cfg = DataConfig(path=str(varied), truncate_long=True)
    one = build_data(cfg, layout(1, 2, 4), 0, 64).train
    batches = [[next(one) for _ in range(2)] for _ in range(3)]
    state = one.state_dict()
    expected = [next(one) for _ in range(2)]
    second = build_data(cfg, layout(2, 2, 4), 1, 64).train
    second.load_state_dict(state)
    assert batches and (next(second)["tokens"] == expected[1]["tokens"]).all()


def test_a_blend_with_fine_tuning_data_names_the_fine_tuning_dataset(varied, tmp_path):
    """The error named the first source, the plain-text one, as the fine-tuning data."""
    from gptscale.config.schema import DataSourceConfig

    text = tmp_path / "text.txt"
    text.write_text("plain text for pretraining\n" * 200)
    prepare_main(
        [
            "--input",
            str(text),
            "--output",
            str(tmp_path / "plain"),
            "--tokenizer",
            str(varied / "tokenizer.json"),
            "--val-fraction",
            "0",
            "--quiet",
        ]
    )
    sources = [DataSourceConfig(str(tmp_path / "plain"), 0.5), DataSourceConfig(str(varied), 0.5)]
    with pytest.raises(DataError, match=rf"fine-tuning data \({varied}\) is read from one dataset, not blended"):
        build_data(DataConfig(sources=sources), layout(1, 4, 4), 0, 64)
