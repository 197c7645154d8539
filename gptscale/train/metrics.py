"""Throughput figures: tokens/s, model TFLOP/s per device, MFU and peak memory (FLOPs per token from
``gptscale.model.flops``, device peaks from ``gptscale.parallel.devices``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Throughput:
    tokens_per_s: float
    tflops_per_device: float
    mfu: Optional[float]
    peak_memory_gib: Optional[float]


class ThroughputMeter:
    """Times the steps between two log lines; reads the clock only there, so steps run without host syncs."""

    def __init__(
        self,
        tokens_per_step: int,
        flops_per_token: float,
        world_size: int,
        peak_tflops: Optional[float],
        device: torch.device,
    ):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.device = device
        self.reset()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._start, self._steps = time.perf_counter(), 0

    def step_done(self) -> None:
        self._steps += 1

    def read(self) -> Throughput:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        tokens_per_s = self.tokens_per_step * self._steps / elapsed
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        mfu = tflops / self.peak_tflops if self.peak_tflops else None
        memory = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        self._start, self._steps = time.perf_counter(), 0
        return Throughput(tokens_per_s, tflops, mfu, memory)
