"""One benchmark config: the trainer's own step on synthetic tokens, warm-up excluded, then an optional profile.

The step is ``Trainer.train_one_step`` unchanged, so the figures are those of the stack users run
(megatron-core model, DeepSpeed engine, optimizer); only the data is replaced, by ``SyntheticTokens``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from gptscale.bench.memory import PeakMemory
from gptscale.bench.syncs import host_syncs
from gptscale.config.schema import Config
from gptscale.data import Data
from gptscale.data.synthetic import SyntheticTokens
from gptscale.train.trainer import Trainer

PACKAGES = ("torch", "megatron-core", "deepspeed", "torchao", "transformer-engine")


class BenchTrainer(Trainer):
    """The trainer with random tokens in place of the configured data."""

    def make_data(self) -> Data:
        vocab = self.cfg.model.vocab_size
        tokens = SyntheticTokens(vocab, self.cfg.train.seq_len, self.layout, self.cfg.train.seed + self.ctx.dp_rank)
        return Data(train=tokens, valid=None, vocab_size=vocab, eod=vocab - 1)


@dataclass
class BenchResult:
    label: str
    world_size: int
    layout: str
    tokens_per_step: int
    tokens_per_s: float
    tflops_per_device: float
    mfu: Optional[float]
    step_time_s: float  # the median of the timed windows
    window_step_times_s: list[float]  # each window's (bench.repeats of bench.steps steps)
    peak_memory_gib: float
    memory_kind: str
    losses: list[float] = field(default_factory=list)  # every step's loss, warm-up included
    profile: Optional[str] = None  # torch.profiler's top ops (rank 0)
    host_syncs: dict[str, int] = field(default_factory=dict)  # call site -> count in one step (rank 0)
    loop_host_syncs: dict[str, int] = field(default_factory=dict)  # the same in one non-log iteration of fit

    def to_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "profile"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return f"CPU {line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads per rank"
    return f"CPU, {torch.get_num_threads()} threads per rank"


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "absent"
    return found


def _wait_for_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_over_ranks(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _profile(trainer: Trainer, steps: int) -> str:
    """torch.profiler over ``steps`` more steps; the ops that took the most self time."""
    on_gpu = trainer.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            trainer.train_one_step()
        _wait_for_device(trainer.device)
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=20)


def measure(cfg: Config, label: str) -> BenchResult:
    """Run the loop users run (``Trainer.fit``) for ``bench.warmup`` untimed steps, then ``bench.repeats``
    timed windows of ``bench.steps`` steps; read throughput and peak memory, then profile if asked.

    A window's step time is the slowest rank's, the result the median window's; tokens/s, TFLOP/s and MFU
    follow from it with the trainer's accounting (``gptscale.train.metrics``). With ``bench.host_syncs`` the
    host waits of the step function and of one whole loop iteration that logs nothing are listed.
    """
    bench = cfg.bench
    timed_end = bench.warmup + bench.steps * bench.repeats
    probe, steps = -1, timed_end
    if bench.host_syncs:
        # The loop iteration whose host waits are counted: after the timed steps, one that logs nothing
        # (config.check asks for a log interval above 1 with bench.host_syncs, so there is one).
        probe = next(step for step in itertools.count(max(timed_end, 1)) if step % cfg.train.log_interval)
        steps = probe + 1
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints its set-up notes; stdout carries the table
        trainer = BenchTrainer(cfg)
    try:
        layout = trainer.layout
        memory = PeakMemory(trainer.device)
        losses, marks, counting = [], {}, contextlib.ExitStack()
        probed: list = []  # the host-sync counts of the probed loop iteration, once counting starts
        window_ends = {bench.warmup + k * bench.steps for k in range(bench.repeats + 1)}

        def mark(step: int) -> None:
            _wait_for_device(trainer.device)
            marks[step] = time.perf_counter()
            if step == bench.warmup:
                memory.reset()

        def on_step(step, result) -> None:
            losses.append(result.loss)
            if step in window_ends:
                mark(step)
            if bench.host_syncs and step == probe:
                probed.append(counting.enter_context(host_syncs()))  # the rest of this iteration and the next step
            elif bench.host_syncs and step == probe + 1:
                counting.close()

        if bench.warmup == 0:
            mark(0)
        trainer.fit(on_step=on_step)
        windows = [
            _max_over_ranks(
                (marks[bench.warmup + (k + 1) * bench.steps] - marks[bench.warmup + k * bench.steps]) / bench.steps,
                trainer.device,
            )
            for k in range(bench.repeats)
        ]
        step_time = statistics.median(windows)
        peak = _max_over_ranks(memory.read_gib(), trainer.device)
        meter = trainer.meter
        tokens_per_s = meter.tokens_per_step / step_time
        tflops = tokens_per_s * meter.flops_per_token / meter.world_size / 1e12
        profile = _profile(trainer, bench.profile_steps) if bench.profile_steps else None
        syncs = {}
        if bench.host_syncs:
            with host_syncs() as counts:
                trainer.train_one_step()
            syncs = dict(counts)
        return BenchResult(
            label=label,
            world_size=layout.world_size,
            layout=layout.describe(),
            tokens_per_step=meter.tokens_per_step,
            tokens_per_s=tokens_per_s,
            tflops_per_device=tflops,
            mfu=tflops / meter.peak_tflops if meter.peak_tflops else None,
            step_time_s=step_time,
            window_step_times_s=windows,
            peak_memory_gib=peak,
            memory_kind=memory.kind,
            losses=[loss.item() for loss in losses[:timed_end]],
            profile=profile,
            host_syncs=syncs,
            loop_host_syncs=dict(probed[0]) if probed else {},
        )
    finally:
        trainer.close()
