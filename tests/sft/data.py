"""A generated fine-tuning set the tests can reason about: sums of two digits as chat conversations, and the
held-out questions as a multiple-choice task."""

from __future__ import annotations

import json
import random
from pathlib import Path

from gptscale.data.chat import load_template, read_records
from gptscale.data.prepare import prepare_dataset

TEMPLATE = "plain"  # "User: ...\nAssistant: ...\n": the multiple-choice context below is its prefix


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


def write_choices(path: Path, pairs, seed: int = 1) -> Path:
    """Held-out sums as four-way multiple choice: the right sum and three others."""
    rng = random.Random(seed)
    lines = []
    for a, b in pairs:
        wrong = rng.sample([n for n in range(19) if n != a + b], 3)
        choices = [str(n) for n in wrong + [a + b]]
        rng.shuffle(choices)
        lines.append(json.dumps({"context": f"User: What is {a} + {b}?\nAssistant:", "choices": choices,
                                 "answer": choices.index(str(a + b))}))
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare_chat(directory: Path, chat_file: Path, vocab_size: int = 300, val_fraction: float = 0.1) -> Path:
    template = load_template(TEMPLATE, None)
    prepare_dataset(lambda: read_records(chat_file, "chat", template), directory, vocab_size=vocab_size,
                    val_fraction=val_fraction, progress=False)
    return directory
