"""Generated fine-tuning sets the tests can reason about: sums of two digits as chat conversations or as
prompt/completion pairs, and the held-out questions as a multiple-choice task; odd/even questions.

The multiple-choice context is the pair's prompt: a choice is scored as ``" " + choice`` after it, the
tokens the completion was trained as. (A chat template's assistant header ends in a space or a newline,
tokenized apart from the answer, so the same question in chat form is not the text the task scores.)"""

from __future__ import annotations

import json
import random
from pathlib import Path

from gptscale.data.chat import load_template, read_records
from gptscale.data.prepare import prepare_dataset

TEMPLATE = "plain"  # "User: ...\nAssistant: ...\n"


def sums(seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Every sum of two digits, shuffled: 80 to train on, 20 held out."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(pairs)
    return pairs[:80], pairs[80:]


def conversation(a: int, b: int, system: bool = False) -> dict:
    messages = [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]
    if system:
        messages.insert(0, {"role": "system", "content": "You add numbers."})
    return {"messages": messages}


def write_chat(path: Path, pairs, repeat: int = 1) -> Path:
    lines = [json.dumps(conversation(a, b, system=i % 3 == 0)) for _ in range(repeat) for i, (a, b) in enumerate(pairs)]
    path.write_text("\n".join(lines) + "\n")
    return path


def prompt(a: int, b: int) -> str:
    return f"What is {a} + {b}? Answer:"


def write_pairs(path: Path, pairs, repeat: int = 1) -> Path:
    lines = [json.dumps({"prompt": prompt(a, b), "completion": f" {a + b}"}) for _ in range(repeat) for a, b in pairs]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parity(path: Path, numbers) -> Path:
    """Odd/even questions as prompt/completion pairs: a model only guesses (loss ln 2 on its answer) until it
    learns to read the last digit."""
    lines = [
        json.dumps({"prompt": f"Is {n} odd or even? Answer:", "completion": " odd" if n % 2 else " even"})
        for n in numbers
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_choices(path: Path, pairs, seed: int = 1) -> Path:
    """Held-out sums as four-way multiple choice: the right sum and three others."""
    rng = random.Random(seed)
    lines = []
    for a, b in pairs:
        wrong = rng.sample([n for n in range(19) if n != a + b], 3)
        choices = [str(n) for n in wrong + [a + b]]
        rng.shuffle(choices)
        lines.append(json.dumps({"context": prompt(a, b), "choices": choices, "answer": choices.index(str(a + b))}))
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare_chat(directory: Path, chat_file: Path, vocab_size: int = 300, val_fraction: float = 0.1) -> Path:
    template = load_template(TEMPLATE, None)
    prepare_dataset(
        lambda: read_records(chat_file, "chat", template),
        directory,
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        progress=False,
    )
    return directory


def prepare_pairs(directory: Path, pairs_file: Path, vocab_size: int = 300, val_fraction: float = 0.1) -> Path:
    prepare_dataset(
        lambda: read_records(pairs_file, "prompt-completion", None),
        directory,
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        progress=False,
    )
    return directory
