"""Multiple-choice task files: bad lines fail naming file and line; choices split into tokens as lm-eval splits them;
gptscale-eval refuses what it cannot evaluate before any work."""

import json

import pytest

from gptscale.config.validate import ConfigError
from gptscale.data.manifest import DataError
from gptscale.data.tasks import encode_choice, read_task, read_tasks, scoring_sequence
from gptscale.data.tokenizer import train_bpe
from gptscale.eval.cli import eval_config

GOOD = {"context": "What is 1 + 1? Answer:", "choices": ["2", "3"], "answer": 0}


def write(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.mark.parametrize(
    "record, message",
    [
        ({"context": "c", "choices": ["a", "b"]}, "missing field 'answer'"),
        ({"choices": ["a", "b"], "answer": 0}, "missing field 'context'"),
        ({**GOOD, "answer": 2}, "'answer' must be the index of the right choice, 0 to 1; got 2"),
        ({**GOOD, "answer": True}, "'answer' must be the index"),
        ({**GOOD, "choices": ["only"]}, "'choices' must be a list of at least two non-empty strings"),
        ({**GOOD, "context": ""}, "'context' must be a non-empty string"),
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_a_bad_line_names_file_and_line(tmp_path, record, message):
    path = write(tmp_path / "task.jsonl", GOOD, "", record)
    with pytest.raises(DataError) as error:
        read_task(path)
    assert f"{path}:3: " in str(error.value) and message in str(error.value)


def test_tasks_are_named_by_file_and_cut_to_max_examples(tmp_path):
    task = read_task(write(tmp_path / "arc.jsonl", *[GOOD] * 5), max_examples=3)
    assert task.name == "arc" and len(task.examples) == 3 and task.examples[0].choices == ("2", "3")
    (tmp_path / "other").mkdir()
    write(tmp_path / "other" / "arc.jsonl", GOOD)
    with pytest.raises(DataError, match="two files are named 'arc'"):
        read_tasks([str(tmp_path / "arc.jsonl"), str(tmp_path / "other" / "arc.jsonl")])
    with pytest.raises(DataError, match="missing.jsonl does not exist"):
        read_task(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="holds no examples"):
        read_task(write(tmp_path / "empty.jsonl", ""))


def test_choices_split_where_lm_eval_splits_them():
    tokenizer = train_bpe(["What is 1 + 1? Answer: 2", "the answer is 22 and 2"] * 50, vocab_size=300).tokenizer

    def encode(text):
        return tokenizer.encode(text).ids

    context, continuation = encode_choice(encode, "What is 1 + 1? Answer: ", "22")
    assert context == encode("What is 1 + 1? Answer:"), "the context's trailing space moves to the continuation"
    assert context + continuation == encode("What is 1 + 1? Answer:  22")
    tokens, scored = scoring_sequence(context, continuation, seq_len=4)
    assert len(tokens) == 5 and tokens[-scored:] == continuation, "cut on the left, as lm-eval does"
    with pytest.raises(DataError, match="does not fit train.seq_len=1"):
        scoring_sequence(context, [1, 2], seq_len=1)


def test_eval_refuses_a_path_without_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=f"--checkpoint {tmp_path}: no checkpoint"):
        eval_config(str(tmp_path), [], str(tmp_path / "run"))
