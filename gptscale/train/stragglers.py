"""Stragglers: ranks the others wait for, named with their host.

In synchronous training every rank's step takes as long as the slowest rank's, since all of them wait for it
in the step's collectives; only time spent before a rank waits for its peers tells them apart. Each rank
times its forward passes (compute: no data-parallel collective runs in them) and its wait for batches (data
wait). At each log step one small all-gather brings every rank's figures per step to every rank; a rank whose
compute + data wait exceeds ``train.straggler.factor`` times the median of the other ranks of its pipeline
stage (stages differ in their work) for ``patience`` log intervals in a row is a straggler. Ranks that wait
for each other inside the forward pass (tensor- and expert-parallel groups, ZeRO-3's parameter gathers)
share their slowest member's time, so a straggler there shows as its whole group.
"""

from __future__ import annotations

import logging
import socket
import statistics
import time
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
import torch.distributed as dist

from gptscale.config.schema import StragglerConfig

log = logging.getLogger("gptscale")


class RankTimes:
    """This rank's forward compute and data wait since the last read, timed without waiting for the device:
    the host's clock on CPU, CUDA events on GPU, read at log steps (where the host waits for the device anyway).
    ``RankTimes(None)`` times nothing."""

    def __init__(self, device: Optional[torch.device]):
        self.enabled = device is not None
        self.cuda = device is not None and device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.steps, self.data_s, self.compute_s = 0, 0.0, 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def step_done(self) -> None:
        self.steps += 1

    def data(self):
        """Around the wait for one micro-batch (host work on every device)."""
        return self._host_timer("data_s") if self.enabled else nullcontext()

    def compute(self):
        """Around one forward pass."""
        if not self.enabled:
            return nullcontext()
        return self._device_timer() if self.cuda else self._host_timer("compute_s")

    @contextmanager
    def _host_timer(self, total: str):
        start = time.perf_counter()
        yield
        setattr(self, total, getattr(self, total) + time.perf_counter() - start)

    @contextmanager
    def _device_timer(self):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.events.append((start, end))

    def read(self) -> tuple[float, float]:
        """Seconds per step of compute and data wait since the last read (waits for the recorded events)."""
        compute = self.compute_s + sum(start.elapsed_time(end) for start, end in self.events) / 1000
        per_step = (compute / self.steps, self.data_s / self.steps) if self.steps else (0.0, 0.0)
        self.reset()
        return per_step


class Stragglers:
    """Compares every rank's times at log steps and names persistent stragglers (collective; rank 0 logs)."""

    def __init__(
        self, settings: StragglerConfig, times: RankTimes, rank: int, world_size: int, stage: int, device: torch.device
    ):
        self.factor, self.patience = settings.factor, settings.patience
        self.times, self.rank, self.stage, self.device = times, rank, stage, device
        self.enabled = bool(self.factor) and world_size > 1
        self.slow_for = [0] * world_size  # log intervals in a row each rank was slow
        self.named: list[int] = []
        self.hosts = [""] * world_size
        if self.enabled:
            dist.all_gather_object(self.hosts, socket.gethostname())

    def check(self) -> dict:
        """Per-step compute and data wait since the last check, the slowest rank, and the stragglers named."""
        compute, data = self.times.read()
        if not self.enabled:
            return {}
        mine = torch.tensor([compute, data, self.stage], dtype=torch.float64, device=self.device)
        rows = [torch.empty_like(mine) for _ in self.hosts]
        dist.all_gather(rows, mine)
        figures = torch.stack(rows).tolist()
        totals = [row[0] + row[1] for row in figures]
        ratios = [self._ratio(rank, totals, figures) for rank in range(len(totals))]
        for rank, ratio in enumerate(ratios):
            self.slow_for[rank] = self.slow_for[rank] + 1 if ratio is not None and ratio > self.factor else 0
        named = [rank for rank, count in enumerate(self.slow_for) if count >= self.patience]
        self._report(named, figures, ratios, totals)
        slowest = max(range(len(totals)), key=lambda rank: ratios[rank] or 0.0)
        metrics = {
            "straggler/compute_s": statistics.median(row[0] for row in figures),
            "straggler/data_s": statistics.median(row[1] for row in figures),
            "straggler/slowest_rank": slowest,
            "straggler/slowest_ratio": ratios[slowest],
            "straggler/count": len(named),
        }
        if named:  # lists go to metrics.jsonl only (W&B and TensorBoard take numbers)
            metrics.update({"straggler/ranks": named, "straggler/hosts": [self.hosts[rank] for rank in named]})
        return metrics

    def _ratio(self, rank: int, totals: list[float], figures: list[list[float]]) -> Optional[float]:
        """``rank``'s time per step over the median of the other ranks of its pipeline stage (None: it has none)."""
        others = [
            total for other, total in enumerate(totals) if other != rank and figures[other][2] == figures[rank][2]
        ]
        if not others or statistics.median(others) <= 0:
            return None
        return totals[rank] / statistics.median(others)

    def _report(self, named: list[int], figures: list[list[float]], ratios: list, totals: list[float]) -> None:
        if self.rank == 0:
            for rank in sorted(set(named) - set(self.named)):
                compute, data, _ = figures[rank]
                log.warning(
                    "straggler: rank %d on %s is %.1fx slower than the median of the other ranks of its "
                    "stage for %d log intervals (per step: compute %.3f s, data wait %.3f s; others' median "
                    "%.3f s)",
                    rank,
                    self.hosts[rank],
                    ratios[rank],
                    self.slow_for[rank],
                    compute,
                    data,
                    totals[rank] / ratios[rank],
                )
            for rank in sorted(set(self.named) - set(named)):
                log.info("rank %d on %s is no longer a straggler", rank, self.hosts[rank])
        self.named = named
