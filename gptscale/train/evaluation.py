"""Scoring multiple-choice tasks with the training engine, at whatever layout it runs.

Every (example, choice) pair is one sequence. The sequences are dealt to data-parallel ranks in turn and
padded so that each rank runs the same number of micro-batches (expert-parallel all-to-alls and the
pipeline schedule need every rank in step); the last pipeline stage's log-likelihoods are then summed over
all ranks into one vector every rank holds, so the scores do not depend on the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from gptscale.data.manifest import DataError
from gptscale.data.tasks import Task, encode_choice, scoring_sequence
from gptscale.parallel.groups import ParallelContext
from gptscale.train.step import sequence_log_likelihoods


@dataclass
class TaskResult:
    task: str
    examples: int
    acc: float  # the choice with the highest log-likelihood is the answer
    acc_norm: float  # ... the highest log-likelihood per character of the choice
    log_likelihoods: list[list[float]] = field(repr=False)  # per example, per choice

    def summary(self) -> dict:
        return {"task": self.task, "examples": self.examples, "acc": self.acc, "acc_norm": self.acc_norm}


class TaskScorer:
    """Tokenizes the tasks once; ``score`` runs their sequences through the model (a collective call)."""

    def __init__(
        self,
        tasks: list[Task],
        tokenizer_file: Path | None,
        eod: int,
        vocab_size: int,
        seq_len: int,
        ctx: ParallelContext,
    ):
        if tokenizer_file is None:
            raise DataError("eval.tasks: the training data names no tokenizer to tokenize the tasks with")
        tokenizer = Tokenizer.from_file(str(tokenizer_file))

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text).ids

        self.tasks, self.ctx, self.layout, self.device = tasks, ctx, ctx.layout, ctx.device
        self.seq_len, self.eod, self.vocab_size = seq_len, eod, vocab_size
        self.sequences: list[tuple[list[int], int]] = []
        for task in tasks:
            for number, example in enumerate(task.examples, start=1):
                for choice in example.choices:
                    try:
                        self.sequences.append(
                            scoring_sequence(*encode_choice(encode, example.context, choice), seq_len)
                        )
                    except DataError as error:
                        raise DataError(f"{task.path}: example {number}: {error}") from None

    def _microbatches(self, indices: list[int]) -> list[dict]:
        """This rank's sequences, right-padded to ``seq_len``, ``layout.micro_batch`` to a micro-batch."""
        size = self.layout.micro_batch
        batches = []
        for start in range(0, len(indices), size):
            windows = torch.full((size, self.seq_len + 1), self.eod, dtype=torch.long)
            loss_mask = torch.zeros((size, self.seq_len))
            for row, index in enumerate(indices[start : start + size]):
                if index < 0:  # padding, so that every rank runs as many micro-batches
                    continue
                tokens, scored = self.sequences[index]
                windows[row, : len(tokens)] = torch.tensor(tokens)
                loss_mask[row, len(tokens) - 1 - scored : len(tokens) - 1] = 1.0
            batches.append(
                {
                    "tokens": windows[:, :-1],
                    "labels": windows[:, 1:],
                    "loss_mask": loss_mask,
                    "position_ids": torch.arange(self.seq_len).expand(size, -1),
                }
            )
        return batches

    @torch.no_grad()
    def log_likelihoods(self, engine, model) -> torch.Tensor:
        """Every sequence's continuation log-likelihood, the same on every rank."""
        layout, total = self.layout, len(self.sequences)
        per_rank = math.ceil(math.ceil(total / layout.dp) / layout.micro_batch) * layout.micro_batch
        mine = list(range(self.ctx.dp_rank, total, layout.dp))
        mine += [-1] * (per_rank - len(mine))
        values = sequence_log_likelihoods(
            engine,
            model,
            self._microbatches(mine),
            layout,
            self.seq_len,
            self.vocab_size,
            self.device,
            self.ctx.is_last_stage,
        )
        result = torch.zeros(total, dtype=torch.float64, device=self.device)
        if values is not None:
            owned = [index for index in mine if index >= 0]  # the padding follows them
            result[owned] = values[: len(owned)].double()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(result)
        # Every tensor-parallel rank of the last stage added it; context-parallel ranks added their parts.
        return (result / layout.tp).cpu()

    def score(self, engine, model) -> list[TaskResult]:
        values = iter(self.log_likelihoods(engine, model).tolist())
        results = []
        for task in self.tasks:
            per_example = [[next(values) for _ in example.choices] for example in task.examples]
            right = [int(np.argmax(lls)) == example.answer for lls, example in zip(per_example, task.examples)]
            right_norm = [
                int(np.argmax(np.array(lls) / [len(choice) for choice in example.choices])) == example.answer
                for lls, example in zip(per_example, task.examples)
            ]
            results.append(
                TaskResult(
                    task.name, len(task.examples), float(np.mean(right)), float(np.mean(right_norm)), per_example
                )
            )
        return results
