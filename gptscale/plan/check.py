"""The plan beside the run: the trainer logs what this rank is predicted to hold, then what it holds after
the first step, and warns when they differ by more than 15 %.

On CPU the comparison is of model states (parameters, gradients, optimizer), whose prediction is exact:
the bytes the engine holds are counted (``gptscale.plan.held``). On GPU it is of the whole peak,
``torch.cuda.max_memory_allocated`` against model states plus in-flight activations plus the allocator
margin; activations are measured on the meta device in a fake process group, which a process inside a
job cannot form, so a spawned helper process computes them while the first steps run.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os

import torch
from megatron.core import parallel_state

from gptscale.config.layout import Layout
from gptscale.config.schema import Config
from gptscale.plan.counts import from_module
from gptscale.plan.held import gradient_storages, held_bytes
from gptscale.plan.memory import ALLOCATOR_MARGIN, states_of
from gptscale.plan.states import StateBytes

log = logging.getLogger("gptscale")

TOLERANCE = 0.15
GiB = 2**30


def _hide_gpus() -> None:
    """The helper plans on the meta device; it must not open a CUDA context on the training GPU."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _activations(cfg: Config, layout: Layout, vocab_size: int, pp_rank: int) -> int:
    from gptscale.plan.activations import stage_activation_bytes

    return stage_activation_bytes(cfg, layout, vocab_size, pp_rank)[1]


class MemoryCheck:
    """Built after the model and before the engine (ZeRO-3 would hide the parameters' sizes)."""

    def __init__(
        self,
        cfg: Config,
        layout: Layout,
        pp_rank: int,
        model: torch.nn.Module,
        vocab_size: int,
        device: torch.device,
        rank: int,
    ):
        dp_rank = (
            parallel_state.get_expert_data_parallel_rank()
            if layout.ep > 1
            else parallel_state.get_data_parallel_rank(with_context_parallel=True)
        )
        self.predicted: StateBytes = states_of(from_module(model), cfg, layout, dp_rank)
        self.device, self.rank, self.model = device, rank, model
        self.done = False
        self._gradients: dict[int, int] = {}
        self._activations = None
        if device.type == "cuda":
            pool = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_hide_gpus
            )
            self._activations = pool.submit(_activations, cfg, layout, vocab_size, pp_rank)
            pool.shutdown(wait=False)
        if rank == 0:
            p = self.predicted
            log.info(
                "plan: rank 0 is predicted to hold %.3f GiB of model states (parameters %.3f, gradients %.3f, "
                "optimizer %.3f)%s",
                p.total / GiB,
                p.parameters / GiB,
                p.gradients / GiB,
                p.optimizer / GiB,
                "; activations follow after the first step" if self._activations else "",
            )

    def watch(self, engine) -> None:
        """Record the gradient buffers just before the first update (they are freed after it)."""
        self.engine = engine
        engine.before_next_update(lambda: self._gradients.update(gradient_storages(self.model, engine.optimizer)))

    def after_step(self, last: bool = False) -> None:
        """Once, after the first step whose prediction is ready (on GPU the helper may need a few steps; the
        peak counts from the start; after the ``last`` step it is waited for): log measured beside predicted,
        warn past the tolerance."""
        if self.done or (self._activations is not None and not self._activations.done() and not last):
            return
        self.done = True
        if self.device.type == "cuda":
            predicted = self.predicted.total
            if self._activations is not None:
                try:
                    predicted += self._activations.result()
                except Exception as error:  # the check must never stop training
                    log.warning("plan: activation prediction failed (%s); comparing model states only", error)
            predicted = round(predicted * (1 + ALLOCATOR_MARGIN))
            measured, what = torch.cuda.max_memory_allocated(self.device), "peak allocated so far"
        else:
            held = held_bytes(self.model, self.engine.optimizer, self._gradients)
            predicted, measured, what = self.predicted.total, held.total, "model states held after the first step"
            if held != self.predicted:
                log.debug("plan: rank %d predicted %s, holds %s", self.rank, self.predicted, held)
        off = abs(predicted - measured) / max(measured, 1)
        if off > TOLERANCE:
            log.warning(
                "plan: rank %d %s %.3f GiB, predicted %.3f GiB (%.0f%% off; docs/planning.md)",
                self.rank,
                what,
                measured / GiB,
                predicted / GiB,
                100 * off,
            )
        elif self.rank == 0:
            log.info(
                "plan: rank 0 %s %.3f GiB, predicted %.3f GiB (%.1f%% off)",
                what,
                measured / GiB,
                predicted / GiB,
                100 * off,
            )
