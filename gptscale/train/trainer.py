"""The trainer: its setup is the system's table of contents, its loop calls one step at a time."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from gptscale.checkpoint.adopt import adopt_model
from gptscale.checkpoint.checkpointer import Checkpointer
from gptscale.checkpoint.manifest import CheckpointError
from gptscale.checkpoint.publish import latest
from gptscale.checkpoint.run_lock import RunLock
from gptscale.config.schema import Config
from gptscale.config.validate import check, padded_vocab_size
from gptscale.data import Data, build_data
from gptscale.data.tasks import read_tasks
from gptscale.fault.restarts import NoProgress, record_start
from gptscale.fault.watchdog import CHECKPOINT_LOAD, CHECKPOINT_SAVE, EVAL, FAULTS_DIR, STEP, Watchdog
from gptscale.model.build import build_model
from gptscale.model.flops import flops_per_token
from gptscale.model.fp8 import check_fp8
from gptscale.model.init import initialize
from gptscale.model.moe import expert_parameters, prepare_routers, update_expert_bias
from gptscale.model.spec import resolve_backend
from gptscale.parallel.devices import device_peak_tflops
from gptscale.parallel.engine import Engine, UpdateLimits
from gptscale.parallel.grads import (
    mark_pipeline_replicas,
    register_expert_parallel_hooks,
    register_sequence_parallel_hooks,
)
from gptscale.parallel.groups import choose_device, destroy_model_parallel, init_parallel, world_size_from_env
from gptscale.plan.check import MemoryCheck
from gptscale.tracking import build_tracker
from gptscale.tracking.goodput import GoodputLog
from gptscale.train.evaluation import TaskResult, TaskScorer
from gptscale.train.guard import LossGuard, SpikeDetector, TooManyBadSteps
from gptscale.train.lr_schedule import LearningRateSchedule
from gptscale.train.metrics import ThroughputMeter
from gptscale.train.preemption import StopRequest
from gptscale.train.progress import Progress
from gptscale.train.rewind import SpikeRecord
from gptscale.train.rng import RngState, seed_everything
from gptscale.train.router_metrics import router_metrics
from gptscale.train.spikes import SpikeHandling
from gptscale.train.step import StepResult, eval_step, train_step
from gptscale.train.stragglers import RankTimes, Stragglers

log = logging.getLogger("gptscale")


class Trainer:
    def __init__(self, cfg: Config):
        cfg = adopt_model(cfg)  # model=from_checkpoint: the model task.init / checkpoint.resume was saved with
        self.cfg = cfg
        self.layout = check(cfg, world_size_from_env())
        self.run_dir = Path(cfg.run_dir)
        self.device = choose_device(cfg.train.device)
        backend = resolve_backend(cfg.model, on_gpu=self.device.type == "cuda")
        check_fp8(cfg.model, cfg.train, backend, self.device)
        seed_everything(cfg.train.seed)

        # Process groups: torch.distributed and megatron-core's TP / PP / DP groups, whose collectives wait at
        # most fault.collective_timeout_s.
        self.ctx = init_parallel(self.layout, self.device, cfg.train.seed, cfg.fault.collective_timeout_s)

        # Hangs: from here on a watchdog thread holds every phase (setup, step, data wait, checkpoint, eval) to
        # its timeout and ends a job that stopped progressing, naming the stuck ranks (RUN_DIR/faults/).
        self.watchdog = Watchdog(cfg.fault, self.run_dir, self.ctx.rank, self.layout.world_size)

        # Run directory: this run alone writes in it until close() (RUN_DIR/.lock), or every rank stops here.
        self.run_lock = RunLock.take(self.run_dir, self.ctx.rank == 0, self.layout.world_size)
        # Goodput: where the wall time goes, appended to RUN_DIR/goodput.jsonl from the process start on (rank 0).
        self.goodput = GoodputLog(self.run_dir, self.ctx.rank == 0)

        # Restarts: this start is recorded; too many restarts in a row without a new checkpoint stop the job.
        self.record_start()

        # Data: this data-parallel rank's share of every global batch, and the multiple-choice tasks scored
        # at train.eval_interval.
        self.data = self.make_data()
        # The model reads the data's vocabulary: the saved config says so (not the preset's vocab_size).
        self.cfg = cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=self.data.vocab_size))
        tasks = read_tasks(cfg.eval.tasks, cfg.eval.max_examples)
        self.tasks = (
            TaskScorer(
                tasks, self.data.tokenizer_file, self.data.eod, self.data.vocab_size, cfg.train.seq_len, self.ctx
            )
            if tasks
            else None
        )

        # Model: this rank's chunks of megatron-core's GPTModel, initialised the same under every layout.
        self.model = build_model(cfg.model, cfg.parallel, cfg.train, self.data.vocab_size, backend, self.device)
        initialize(self.model, cfg.train.seed, cfg.model.init_std, cfg.model.num_layers)
        self.moe_model = cfg.model if prepare_routers(self.model) else None  # router losses and load counts

        # Parallelism: gradient sums across model-parallel ranks, then DeepSpeed (ZeRO, precision, clipping).
        register_sequence_parallel_hooks(self.model)
        register_expert_parallel_hooks(self.model, expert_parameters(self.model))
        mark_pipeline_replicas(self.model)
        self.memory_check = MemoryCheck(
            cfg, self.layout, self.ctx.pp_rank, self.model, self.data.vocab_size, self.device, self.ctx.rank
        )  # the plan's prediction, checked after step 1
        self.engine = Engine(self.model, self.layout, cfg.optim, cfg.train)
        self.memory_check.watch(self.engine)

        # Optimizer schedule and everything else a restart must restore.
        self.schedule = LearningRateSchedule(cfg.optim, cfg.train.steps)
        self.rng = RngState(self.device)
        self.progress = Progress()
        self.guard = LossGuard(cfg.train.max_bad_steps, cfg.train.bad_step_window)
        spike = cfg.train.spike
        self.spikes = SpikeDetector(spike.zscore, spike.window, spike.min_relative_std, spike.signal)

        # Metrics: console, metrics.jsonl, W&B, TensorBoard (rank 0).
        self.tracker = build_tracker(cfg, self.ctx.rank == 0)
        vocab = padded_vocab_size(self.data.vocab_size, cfg.model.vocab_multiple)
        self.tokens_per_step = self.layout.global_batch * cfg.train.seq_len
        self.meter = ThroughputMeter(
            tokens_per_step=self.tokens_per_step,
            flops_per_token=flops_per_token(cfg.model, vocab, cfg.train.seq_len),
            world_size=self.layout.world_size,
            peak_tflops=cfg.train.peak_tflops or device_peak_tflops(self.device, cfg.train.precision),
            device=self.device,
        )
        # Stragglers: each rank's forward compute and data wait, compared across ranks at log steps.
        self.rank_times = RankTimes(self.device)
        self.stragglers = Stragglers(
            cfg.train.straggler, self.rank_times, self.ctx.rank, self.layout.world_size, self.ctx.pp_rank, self.device
        )
        if self.ctx.rank == 0:
            params = sum(p.numel() for p in self.model.parameters())
            log.info(
                "%s: %d ranks (%s), %s backend, %.2fM parameters on rank 0, device %s",
                cfg.model.name,
                self.layout.world_size,
                self.layout.describe(),
                backend.value,
                params / 1e6,
                self.device,
            )

        # Checkpoint: model and optimizer under layout-independent keys, plus the components above; resume.
        self.checkpointer = Checkpointer(
            cfg,
            self.run_dir,
            self.ctx,
            self.model,
            self.engine.state,
            components={
                "progress": self.progress,
                "schedule": self.schedule,
                "rng": self.rng,
                "guard": self.guard,
                "spikes": self.spikes,
                "train_data": self.data.train,
                "valid_data": self.data.valid,
                "tracker": self.tracker,
            },
            tokenizer_file=self.data.tokenizer_file,
        )
        # Spikes: skipped batches' documents excluded and recorded, streaks rewound (or accepted), rewind at start.
        self.spike_handling = SpikeHandling(
            spike,
            self.spikes,
            SpikeRecord(self.run_dir, self.ctx.rank == 0),
            self.data.train,
            self.checkpointer,
            self.tracker,
            lambda: self.step,
            self.ctx.rank,
            self.layout.world_size,
        )
        self.watchdog.enter(CHECKPOINT_LOAD, self.step)
        if (
            not self.spike_handling.rewind_at_start(cfg.checkpoint.rewind)
            and self.checkpointer.resume() is None
            and cfg.task.init
        ):
            self.checkpointer.initialize_from(cfg.task.init)  # fine-tuning: weights only
        self.reported_checkpoint = self.checkpointer.saved_step
        self.stop_request = StopRequest(self.device)  # SIGTERM / SIGUSR1 / first Ctrl-C: checkpoint and exit 0
        self.goodput.started(self.checkpointer.saved_step)

    @property
    def step(self) -> int:
        return self.progress.step

    def record_start(self) -> None:
        """Rank 0 records this start in RUN_DIR/faults/starts.jsonl and judges the restarts before it; every
        rank stops (NoProgress) when restarts in a row found no new checkpoint (collective)."""
        verdict = [None]
        if self.ctx.rank == 0:
            newest = latest(self.run_dir / "checkpoints")
            verdict = [
                record_start(
                    self.run_dir / FAULTS_DIR,
                    newest.name if newest else None,
                    self.cfg.fault.max_restarts_without_progress,
                )
            ]
        if self.layout.world_size > 1:
            dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise NoProgress(verdict[0])

    def make_data(self) -> Data:
        """This data-parallel rank's loaders (a subclass may serve other tokens, e.g. synthetic ones for timing)."""
        return build_data(
            self.cfg.data,
            self.layout,
            self.ctx.dp_rank,
            self.cfg.train.seq_len,
            serves_tokens=self.ctx.is_first_stage or self.ctx.is_last_stage,
        )

    def train_one_step(self):
        lr = self.schedule.apply(self.engine.optimizer)
        limits = UpdateLimits(*self.spikes.limits(), require_both=self.spikes.require_both)
        batches = self.watchdog.waiting_for_data(self.data.train, self.step + 1)
        result = train_step(
            self.engine,
            self.model,
            batches,
            self.layout,
            self.cfg.train.seq_len,
            self.device,
            self.ctx.is_last_stage,
            limits,
            self.moe_model,
            self.rank_times,
        )
        update_expert_bias(self.model)
        self.schedule.advance()
        self.progress.advance(self.tokens_per_step)
        self.meter.step_done()
        self.rank_times.step_done()
        return lr, result

    def evaluate(self) -> tuple[Optional[float], list[TaskResult]]:
        """Held-out loss (mean per token of ``train.eval_batches`` global batches of the validation split; None
        without one) and each task's result."""
        self.watchdog.enter(EVAL, self.step)
        self.engine.eval()
        loss = None
        if self.data.valid is not None:
            losses = [
                eval_step(
                    self.engine,
                    self.model,
                    self.data.valid,
                    self.layout,
                    self.cfg.train.seq_len,
                    self.device,
                    self.ctx.is_last_stage,
                )
                for _ in range(self.cfg.train.eval_batches)
            ]
            loss = torch.stack(losses).mean().item()
        results = self.tasks.score(self.engine, self.model) if self.tasks is not None else []
        self.engine.train()
        return loss, results

    def check_step(self, result) -> None:
        """Count a step skipped for a non-finite loss or gradient norm (DeepSpeed applied no update), or for a
        spike (the update gate skipped it); a step that updated joins the spike detector's window."""
        flags = [t for t in (result.grad_norm, result.skipped) if t is not None]
        loss, *rest = torch.stack([t.detach().float().reshape(()) for t in (result.loss, *flags)]).tolist()  # one wait
        grad_norm = rest.pop(0) if result.grad_norm is not None else None
        skipped = result.skipped is None or bool(rest[0])  # None: DeepSpeed skipped before the gate
        zscores = self.spikes.zscores(loss, grad_norm)
        if self.guard.record(self.step, loss, grad_norm):
            log.warning(
                "step %d skipped: loss %s, gradient norm %s (%d skipped in the last %d steps, %d in all)",
                self.step,
                loss,
                grad_norm,
                len(self.guard.recent),
                self.guard.window,
                self.guard.skipped,
            )
        elif skipped:
            self.spike_handling.skipped(loss, grad_norm, zscores)
        else:
            self.spikes.add(loss, grad_norm)
        self.last_zscores = zscores

    def too_many_bad_steps(self) -> TooManyBadSteps:
        self.checkpointer.wait()  # so that the message names the newest complete checkpoint
        return TooManyBadSteps(
            f"stopping at step {self.step}: {len(self.guard.recent)} steps in the last {self.guard.window} had a "
            f"non-finite loss or gradient norm (train.max_bad_steps={self.guard.max_bad_steps}); last good "
            f"checkpoint: {self.checkpointer.last_complete or 'none'}"
        )

    def report_checkpoint(self) -> None:
        """Log the step of a checkpoint once, when it is saved (trackers show where a run can resume)."""
        if self.checkpointer.saved_step != self.reported_checkpoint:
            self.reported_checkpoint = self.checkpointer.saved_step
            self.tracker.log(self.step, {"checkpoint_step": self.reported_checkpoint})

    def save_at_stop(self) -> None:
        """Save the step a stop signal ends the run at and wait until it is published; if it cannot be, say so
        and name the checkpoint the run will resume from (left intact: a failed save is never published)."""
        try:
            self.checkpointer.after_step(self.step, self.progress.consumed_tokens, force=True)
            self.checkpointer.wait()
        except Exception as error:
            raise CheckpointError(
                f"stop requested by signal, but the checkpoint of step {self.step} could not be saved "
                f"({type(error).__name__}: {error}); the run resumes from "
                f"{self.checkpointer.last_complete or 'the start (no complete checkpoint)'}"
            ) from error

    def fit(self, on_step: Optional[Callable[[int, StepResult], None]] = None) -> None:
        """Train until ``train.steps`` or a stop signal. Too many non-finite steps stop the run; spikes in a row
        rewind it or, where it cannot rewind, restart the spike detector (``SpikeHandling.end_streak``).

        Nothing is kept per step. ``on_step(step, result)`` sees each step's result as it is made (a rewound
        step is seen again when it is trained again). The host waits for the device where a decision needs
        it: the loss and gradient norm each step for the loss guard and spike detector, the stop and timed-save
        flags' all-reduce; the log line's figures on log steps."""
        train = self.cfg.train
        first_step = self.step
        self.meter.reset()
        stop = False
        while self.step < train.steps and not stop:
            self.watchdog.enter(STEP, self.step + 1)
            lr, result = self.train_one_step()
            self.memory_check.after_step()
            if on_step is not None:
                on_step(self.step, result)
            self.check_step(result)
            self.goodput.mark("step", self.step)
            if self.step % train.log_interval == 0 or self.step == train.steps:
                loss = result.loss.item()
                speed = self.meter.read()
                metrics = {
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": None if result.grad_norm is None else result.grad_norm.item(),
                    "tokens_per_s": speed.tokens_per_s,
                    "tflops_per_device": speed.tflops_per_device,
                    "mfu": speed.mfu,
                    "peak_memory_gib": speed.peak_memory_gib,
                    "consumed_tokens": self.progress.consumed_tokens,
                    "skipped_steps": self.guard.skipped,
                    "spike/skipped": self.spikes.skipped,
                    "spike/zscore_loss": self.last_zscores[0],
                    "spike/zscore_grad_norm": self.last_zscores[1],
                }
                if self.moe_model is not None:
                    metrics.update(router_metrics(self.moe_model, result.router_losses, self.model))
                metrics.update(self.stragglers.check())
                metrics.update(self.goodput.metrics())
                self.tracker.log(self.step, metrics)
            if train.eval_interval and self.step % train.eval_interval == 0:
                loss, results = self.evaluate()
                metrics = {} if loss is None else {"eval_loss": loss}
                for task in results:
                    metrics[f"eval/{task.task}/acc"] = task.acc
                    metrics[f"eval/{task.task}/acc_norm"] = task.acc_norm
                if metrics:
                    self.tracker.log(self.step, metrics)
                self.goodput.mark("eval", self.step)
            if self.guard.exceeded():
                raise self.too_many_bad_steps()
            if self.spike_handling.streak_too_long():
                self.watchdog.enter(CHECKPOINT_LOAD, self.step)  # a rewind loads a checkpoint
                if self.spike_handling.end_streak():
                    continue  # the steps after the checkpoint are trained again
            self.watchdog.enter(CHECKPOINT_SAVE, self.step)  # agreeing on a save, saving, publishing
            stop, save_due = self.stop_request.agreed(self.checkpointer.due_by_time())
            if stop:
                log.warning("stop requested by signal: saving at step %d and exiting", self.step)
                self.save_at_stop()
            else:
                self.checkpointer.after_step(self.step, self.progress.consumed_tokens, force=save_due)
            if self.checkpointer.saved_step == self.step:
                self.goodput.mark("checkpoint", self.step)  # the time the loop waited for the save
            self.report_checkpoint()
        if self.step > first_step:
            self.memory_check.after_step(last=True)
        self.watchdog.enter(CHECKPOINT_SAVE, self.step)
        self.checkpointer.finish(self.step, self.progress.consumed_tokens)
        self.goodput.mark("checkpoint", self.step, finished=self.step >= train.steps)
        self.report_checkpoint()
        self.tracker.log(self.step, self.goodput.metrics())

    def close(self) -> None:
        """Release the watchdog, checkpointer, trackers, signal handlers, megatron-core's groups and, last, the
        run directory (torch.distributed stays up for the next run)."""
        self.watchdog.close()
        self.checkpointer.close()
        self.stop_request.close()
        self.tracker.close()
        self.goodput.close()
        destroy_model_parallel()
        self.engine.close()
        self.run_lock.release()
