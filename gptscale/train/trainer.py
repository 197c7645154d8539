"""The trainer: its setup is the system's table of contents, its loop calls one step at a time."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from gptscale.config.schema import Config
from gptscale.config.validate import check, padded_vocab_size
from gptscale.data import Data, build_data
from gptscale.model.build import build_model
from gptscale.model.fp8 import check_fp8
from gptscale.model.init import initialize
from gptscale.model.spec import resolve_backend
from gptscale.parallel.deepspeed import build_engine
from gptscale.parallel.grads import mark_pipeline_replicas, register_sequence_parallel_hooks
from gptscale.parallel.groups import choose_device, destroy_model_parallel, init_parallel, world_size_from_env
from gptscale.tracking import build_tracker
from gptscale.train.lr_schedule import LearningRateSchedule
from gptscale.train.metrics import ThroughputMeter, device_peak_tflops, flops_per_token
from gptscale.train.rng import RngState, seed_everything
from gptscale.train.step import eval_step, train_step

log = logging.getLogger("gptscale")


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.layout = check(cfg, world_size_from_env())
        self.run_dir = Path(cfg.run_dir)
        self.device = choose_device(cfg.train.device)
        backend = resolve_backend(cfg.model, on_gpu=self.device.type == "cuda")
        check_fp8(cfg.model, cfg.train, backend, self.device)
        seed_everything(cfg.train.seed)

        # Process groups: torch.distributed and megatron-core's TP / PP / DP groups.
        self.ctx = init_parallel(self.layout, self.device, cfg.train.seed)

        # Data: this data-parallel rank's share of every global batch.
        self.data = self.make_data()

        # Model: this rank's chunks of megatron-core's GPTModel, initialised the same under every layout.
        self.model = build_model(cfg.model, cfg.parallel, cfg.train, self.data.vocab_size, backend, self.device)
        initialize(self.model, cfg.train.seed, cfg.model.init_std, cfg.model.num_layers)

        # Parallelism: gradient sums across model-parallel ranks, then DeepSpeed (ZeRO, precision, clipping).
        register_sequence_parallel_hooks(self.model)
        mark_pipeline_replicas(self.model)
        self.engine = build_engine(self.model, self.layout, cfg.parallel.zero, cfg.optim, cfg.train)

        # Optimizer schedule and everything else a restart must restore.
        self.schedule = LearningRateSchedule(cfg.optim, cfg.train.steps)
        self.rng = RngState(self.device)
        self.step = 0

        # Metrics.
        self.tracker = build_tracker(self.run_dir, self.ctx.rank == 0)
        vocab = padded_vocab_size(self.data.vocab_size, cfg.model.vocab_multiple)
        tokens_per_step = self.layout.global_batch * cfg.train.seq_len
        self.meter = ThroughputMeter(
            tokens_per_step=tokens_per_step,
            flops_per_token=flops_per_token(cfg.model, vocab, cfg.train.seq_len),
            world_size=self.layout.world_size,
            peak_tflops=cfg.train.peak_tflops or device_peak_tflops(self.device, cfg.train.precision),
            device=self.device,
        )
        if self.ctx.rank == 0:
            params = sum(p.numel() for p in self.model.parameters())
            log.info("%s: %s ranks (tp %d, pp %d, vpp %d, dp %d), %d micro-batches of %d per step, zero %d, "
                     "%s backend, %.2fM parameters on rank 0, device %s", cfg.model.name, self.layout.world_size,
                     self.layout.tp, self.layout.pp, self.layout.vpp, self.layout.dp,
                     self.layout.num_microbatches, self.layout.micro_batch, cfg.parallel.zero, backend.value,
                     params / 1e6, self.device)

    def make_data(self) -> Data:
        """This data-parallel rank's loaders (gptscale-bench overrides it with synthetic tokens)."""
        return build_data(self.cfg.data, self.layout, self.ctx.dp_rank, self.cfg.train.seq_len)

    def train_one_step(self):
        lr = self.schedule.apply(self.engine.optimizer)
        result = train_step(self.engine, self.model, self.data.train, self.layout, self.cfg.train.seq_len,
                            self.device, self.ctx.is_last_stage)
        self.schedule.advance()
        self.step += 1
        self.meter.step_done()
        return lr, result

    def evaluate(self) -> float:
        self.engine.eval()
        losses = [eval_step(self.engine, self.model, self.data.valid, self.layout, self.cfg.train.seq_len,
                            self.device, self.ctx.is_last_stage) for _ in range(self.cfg.train.eval_batches)]
        self.engine.train()
        return torch.stack(losses).mean().item()

    def fit(self) -> dict[str, list[float]]:
        """Train until ``train.steps``; returns every step's loss and gradient norm (for tests and benchmarks).

        Both stay on the device between log lines, so steps queue up without waiting for the host.
        """
        train = self.cfg.train
        history = []
        self.meter.reset()
        while self.step < train.steps:
            lr, result = self.train_one_step()
            history.append(result)
            if self.step % train.log_interval == 0 or self.step == train.steps:
                loss = result.loss.item()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {self.step}")
                speed = self.meter.read()
                metrics = {
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": None if result.grad_norm is None else result.grad_norm.item(),
                    "tokens_per_s": speed.tokens_per_s,
                    "tflops_per_device": speed.tflops_per_device,
                    "mfu": speed.mfu,
                    "peak_memory_gib": speed.peak_memory_gib,
                    "consumed_tokens": self.step * self.layout.global_batch * train.seq_len,
                }
                self.tracker.log(self.step, metrics)
            if train.eval_interval and self.step % train.eval_interval == 0:
                self.tracker.log(self.step, {"eval_loss": self.evaluate()})
        return {
            "loss": [result.loss.item() for result in history],
            "grad_norm": [float("nan") if result.grad_norm is None else result.grad_norm.item() for result in history],
        }

    def close(self) -> None:
        """Release the trackers and megatron-core's groups (torch.distributed stays up for the next run)."""
        self.tracker.close()
        destroy_model_parallel()
