"""Multiple-choice tasks: JSON lines of ``{"context", "choices", "answer"}`` (HellaSwag/ARC-style), and the
token sequences that score them.

A choice is scored the way lm-eval-harness scores ``output_type: multiple_choice`` with its default
``target_delimiter`` (a space): the continuation is ``" " + choice``, the context's trailing whitespace
moves into the continuation, the pair is tokenized whole and the continuation's tokens are those after
the context's own tokenization. Its log-likelihood is the sum of the continuation tokens' log-probabilities;
``acc`` picks the choice with the highest, ``acc_norm`` the highest per character of the choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gptscale.data.inputs import _open_text
from gptscale.data.manifest import DataError

DELIMITER = " "
FIELDS = ("context", "choices", "answer")


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class Task:
    name: str  # the file's stem: metrics are eval/<name>/acc and eval/<name>/acc_norm
    path: Path
    examples: tuple[Example, ...]


def _example(record, where: str) -> Example:
    """One line's example, or a DataError naming ``where`` (file:line) and what is wrong."""
    if not isinstance(record, dict):
        raise DataError(f'{where}: not a JSON object (a line is {{"context", "choices", "answer"}})')
    missing = [name for name in FIELDS if name not in record]
    if missing:
        raise DataError(
            f"{where}: missing field {', '.join(repr(name) for name in missing)} "
            '(a line is {"context", "choices", "answer"})'
        )
    context, choices, answer = (record[name] for name in FIELDS)
    if not isinstance(context, str) or not context:
        raise DataError(f"{where}: 'context' must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(
            f"{where}: 'answer' must be the index of the right choice, 0 to {len(choices) - 1}; got {answer!r}"
        )
    return Example(context, tuple(choices), answer)


def read_task(path: str | Path, max_examples: Optional[int] = None) -> Task:
    """The first ``max_examples`` examples (all when None) of one task file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"eval.tasks: {path} does not exist")
    examples: list[Example] = []
    with _open_text(path) as stream:
        for number, line in enumerate(stream, start=1):
            if max_examples is not None and len(examples) >= max_examples:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise DataError(f"{path}:{number}: not JSON ({error})") from None
            examples.append(_example(record, f"{path}:{number}"))
    if not examples:
        raise DataError(f"eval.tasks: {path} holds no examples")
    name = path.name.split(".")[0]
    return Task(name, path, tuple(examples))


def read_tasks(paths: list[str], max_examples: Optional[int] = None) -> list[Task]:
    tasks = [read_task(path, max_examples) for path in paths]
    names = [task.name for task in tasks]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"eval.tasks: two files are named {repeated[0]!r}; metrics are keyed by file name")
    return tasks


def encode_choice(encode, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) of one choice, split as lm-eval-harness splits them."""
    continuation = DELIMITER + choice
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    whole = encode(stripped + continuation)
    context_tokens = encode(stripped)
    return context_tokens, whole[len(context_tokens) :]


def scoring_sequence(context_tokens: list[int], continuation_tokens: list[int], seq_len: int) -> tuple[list[int], int]:
    """The ``seq_len + 1`` or fewer tokens that score a continuation (cut on the left, as lm-eval does), and how
    many of the last labels are the continuation's."""
    if not continuation_tokens:
        raise DataError("a choice tokenizes to no tokens after its context")
    if len(continuation_tokens) > seq_len:
        raise DataError(f"a choice of {len(continuation_tokens)} tokens does not fit train.seq_len={seq_len}")
    return (context_tokens + continuation_tokens)[-(seq_len + 1) :], len(continuation_tokens)
