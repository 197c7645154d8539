"""The trainer's checkpointer: when to save, what a save holds, and where a run resumes from.

The model's master weights and optimizer state come through the engine adapter's ``OptimizerState``
(``shards.py``); everything else that must survive a restart is a component the trainer registers by name
(lr schedule, data loaders, RNG, progress, trackers, ...): anything with ``state_dict()`` /
``load_state_dict()``. Components are saved per rank and need no special case here. Every method is
collective: all ranks call it at the same step.
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Protocol

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from gptscale.checkpoint.async_writer import Writer
from gptscale.checkpoint.files import (
    copy_tokenizer,
    describe_model,
    read_config,
    write_config,
    write_rank_state,
)
from gptscale.checkpoint.load import (
    check_fits,
    check_same_architecture,
    raise_everywhere,
    read_components,
    read_shards,
    verify,
)
from gptscale.checkpoint.manifest import CheckpointError
from gptscale.checkpoint.publish import (
    complete_checkpoints,
    remove_unfinished,
    resolve,
    resume_candidates,
    set_aside,
)
from gptscale.checkpoint.save import (
    SaveTarget,
    publisher,
    sharded_strategy,
    stage,
    write_shards,
)
from gptscale.checkpoint.shards import (
    HostCopies,
    global_shapes,
    parameter_shards,
    restore,
    snapshot,
)
from gptscale.checkpoint.space import bytes_needed, no_space, out_of_space, shortfall
from gptscale.config.layout import describe_saved
from gptscale.config.schema import Config
from gptscale.model.build import ModelChunks
from gptscale.parallel.engine import OptimizerState
from gptscale.parallel.groups import ParallelContext

log = logging.getLogger("gptscale")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Checkpointer:
    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        ctx: ParallelContext,
        model: ModelChunks,
        optimizer: OptimizerState,
        components: dict[str, Optional[Stateful]],
        tokenizer_file: Optional[Path] = None,
    ):
        self.cfg = cfg
        self.settings = cfg.checkpoint
        self.root = Path(run_dir) / "checkpoints"
        self.ctx = ctx
        self.components = {name: c for name, c in components.items() if c is not None}
        self.tokenizer_file = tokenizer_file
        self.shards = parameter_shards(model)
        self.optimizer = optimizer
        self.host = HostCopies()
        self.writer = Writer(asynchronous=self.settings.async_save)
        if self.writer.asynchronous and self.settings.interval > 0:  # saves will come: start the writers' helper
            self.writer.prepare()  # now rather than in the first save (0.1 s on an idle CPU, seconds under load)
        self.strategy = sharded_strategy(ctx.layout.dp * ctx.layout.cp)
        self.saved_step: Optional[int] = None  # the step of the newest checkpoint this run wrote or resumed
        self.saved_at = time.monotonic()  # when this process last saved (or started)
        self.last_complete: Optional[Path] = None  # the newest checkpoint known to be complete
        self.writing: Optional[tuple[SaveTarget, int]] = None  # a save not yet published, and its size estimate
        if ctx.rank == 0:
            for path in remove_unfinished(self.root):
                log.warning("deleted %s, left by an interrupted save", path)

    @property
    def layout(self) -> dict:
        return {**self.ctx.layout.saved(), "precision": self.cfg.train.precision.value}

    def resume(self) -> Optional[Path]:
        """Restore model, optimizer and components from ``checkpoint.resume``; returns the checkpoint used.

        Every check runs before anything is loaded, so a bad checkpoint leaves the run untouched. With
        ``auto`` a damaged checkpoint is skipped, saying why, for the next older one: a requeued job whose
        newest checkpoint was damaged would otherwise fail at every relaunch. A named one is never replaced.
        """
        auto = self.settings.resume == "auto"
        found = [None]
        if self.ctx.rank == 0:
            found = [resume_candidates(self.root) if auto else [resolve(self.settings.resume, self.root)]]
        dist.broadcast_object_list(found, src=0)
        candidates = [path for path in found[0] if path is not None]
        if not candidates:
            if self.ctx.rank == 0:
                start = (
                    f"starting from the weights of task.init={self.cfg.task.init}"
                    if self.cfg.task.init
                    else "training from scratch"
                )
                log.info(
                    "no checkpoint of this run to resume from (checkpoint.resume=%s): %s", self.settings.resume, start
                )
            return None
        *newer, oldest = candidates
        for path in newer:  # auto only: a named checkpoint is the one candidate
            try:
                manifest = verify(path)
            except CheckpointError as error:
                if self.ctx.rank == 0:
                    log.warning(
                        "checkpoint.resume=auto skips a damaged checkpoint: %s\n  trying the next older one", error
                    )
                continue
            return self.load(path, manifest)
        return self.load(oldest)

    def rewind(self, step: int) -> Path:
        """Load the newest complete checkpoint of this run at or before ``step`` (collective); the newer ones
        are set aside under ``checkpoints/rewound/`` so that no later resume picks a checkpoint of the
        abandoned steps."""
        self.wait()
        found = [complete_checkpoints(self.root) if self.ctx.rank == 0 else None]
        dist.broadcast_object_list(found, src=0)
        older = [at for at in found[0] if at <= step]
        if not older:
            present = ", ".join(str(at) for at in found[0]) or "none"
            raise CheckpointError(
                f"cannot rewind to step {step}: {self.root} holds no complete checkpoint at or "
                f"before it (checkpoints present at steps: {present})"
            )
        if self.ctx.rank == 0:
            for path in set_aside(self.root, max(older)):
                log.warning("rewind: set %s aside (its steps are abandoned)", path)
        dist.barrier()
        return self.load(found[0][max(older)])

    def load(self, path: Path, manifest: Optional[dict] = None) -> Path:
        """Restore model, optimizer and components from the checkpoint at ``path`` (collective); ``manifest``
        is the one ``verify`` returned, when the caller verified it already."""
        start = time.perf_counter()
        manifest = manifest or verify(path)
        saved_config = read_config(path)
        saved_model = saved_config.model
        check_fits(path, global_shapes(self.shards), describe_model(saved_model), describe_model(self.cfg.model))
        check_same_architecture(path, saved_model, self.cfg.model, self.tokenizer_file)
        saved = read_components(path, manifest, self.layout)
        with_optimizer = manifest["contents"]["optimizer"]
        if with_optimizer and saved_config.optim.name != self.cfg.optim.name:
            raise CheckpointError(
                f"{path} holds the state of optim.name={saved_config.optim.name}, this run uses "
                f"optim.name={self.cfg.optim.name}: its state cannot continue it (to start a new "
                "optimizer from these weights, give the checkpoint as task.init)"
            )
        state_names = self.optimizer.state_names if with_optimizer else ()
        restore(self.shards, read_shards(path, self.shards, state_names), self.optimizer, with_optimizer)
        for name, state in saved.items():
            if name in self.components:
                self.components[name].load_state_dict(state)
        missing = [name for name in self.components if name not in saved]
        self.saved_step, self.last_complete = manifest["step"], path
        if self.ctx.rank == 0:
            log.info(
                "resumed from %s (step %d, %d tokens, saved at %s) in %.1f s%s%s",
                path,
                manifest["step"],
                manifest["consumed_tokens"],
                _layout_text(manifest["layout"]),
                time.perf_counter() - start,
                "" if with_optimizer else "; weights only, fresh optimizer",
                f"; no saved state for {', '.join(missing)}" if missing else "",
            )
        return path

    def initialize_from(self, spec: str) -> Path:
        """Load only the model weights of checkpoint ``spec`` (a checkpoint, run or checkpoints directory):
        the start of a fine-tuning run, whose optimizer, schedule and data begin afresh (collective)."""
        path = resolve(spec, Path(spec))
        manifest = verify(path)
        saved_model = read_config(path).model
        check_fits(path, global_shapes(self.shards), describe_model(saved_model), describe_model(self.cfg.model))
        check_same_architecture(path, saved_model, self.cfg.model, self.tokenizer_file)
        restore(self.shards, read_shards(path, self.shards, ()), self.optimizer, False)
        if self.ctx.rank == 0:
            log.info(
                "weights from %s (step %d, %s); optimizer, schedule and data start fresh",
                path,
                manifest["step"],
                saved_model.name,
            )
        return path

    def save(self, step: int, consumed_tokens: int) -> None:
        """Write a checkpoint of this step. With ``async_save`` training goes on once the snapshot is in host
        memory, and the checkpoint is published when every rank's background write has finished."""
        start = time.perf_counter()
        self.wait()  # one save at a time: it also frees the host buffers for this snapshot
        self.writer.prepare()
        target = stage(self.root, step)
        state = snapshot(self.shards, self.optimizer, self.host)
        self.writing = (target, bytes_needed(state, self.last_complete))
        with self._failures_named():
            raise_everywhere(shortfall(self.root, step, self.writing[1]), f"cannot save step {step}:")
            problems = []
            try:
                write_rank_state(
                    target.staging,
                    self.ctx.rank,
                    {"tp": self.ctx.tp_rank, "pp": self.ctx.pp_rank, "dp": self.ctx.dp_rank},
                    self.components,
                )
                if self.ctx.rank == 0:
                    write_config(target.staging, self.cfg)
                    copy_tokenizer(target.staging, self.tokenizer_file)
            except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
                problems = [f"{target.staging}: {error}"]
            raise_everywhere(problems, f"cannot save step {step}:")
            request = write_shards(state, target, self.strategy)
        manifest = {
            "step": step,
            "consumed_tokens": consumed_tokens,
            "model": self.cfg.model.name,
            "layout": self.layout,
            "contents": {"optimizer": True, "components": sorted(self.components)},
        }

        def published(path: Path) -> None:
            self.last_complete, self.writing = path, None
            if self.ctx.rank == 0:
                log.info("checkpoint %s complete, %.1f s after the save began", path, time.perf_counter() - start)

        request.add_finalize_fn(
            publisher(target, manifest, self.settings.keep_last, self.settings.keep_every, published)
        )
        with self._failures_named():
            self.writer.submit(request)
        self.saved_step, self.saved_at = step, time.monotonic()
        if self.writer.asynchronous and self.ctx.rank == 0:
            log.info(
                "checkpoint of step %d: training waited %.2f s, writing in the background",
                step,
                time.perf_counter() - start,
            )

    def due_by_time(self) -> bool:
        """Whether ``checkpoint.interval_minutes`` have passed since the last save (this rank's clock: the
        trainer agrees on it across ranks with the stop flag)."""
        minutes = self.settings.interval_minutes
        return minutes > 0 and time.monotonic() - self.saved_at >= 60 * minutes

    def after_step(self, step: int, consumed_tokens: int, force: bool = False) -> None:
        """Save when ``checkpoint.interval`` says so (or ``force``); otherwise finalize finished background saves."""
        interval = self.settings.interval
        if (force or (interval > 0 and step % interval == 0)) and self.saved_step != step:
            self.save(step, consumed_tokens)
        else:
            with self._failures_named():
                self.writer.poll()

    def finish(self, step: int, consumed_tokens: int) -> None:
        """The final save (``checkpoint.save_final``) unless this step is saved already; waits for every write."""
        if self.settings.save_final and self.saved_step != step:
            self.save(step, consumed_tokens)
        self.wait()

    def wait(self) -> None:
        """Block until every background save is written and published."""
        with self._failures_named():
            self.writer.wait()

    @contextmanager
    def _failures_named(self):
        """A save that fails (collectively) loses only itself: its half-written directory is removed, and a
        full disk is named as such, with the directory and the bytes the checkpoint needs."""
        try:
            yield
        except (Exception, CheckpointException) as error:  # DCP's CheckpointException is a BaseException
            if self.writing is None:
                raise
            (target, needed), self.writing = self.writing, None
            free = out_of_space(error, self.root, needed)
            if self.ctx.rank == 0:
                shutil.rmtree(target.staging, ignore_errors=True)
            if free is None:
                raise
            intact = f"; the newest complete checkpoint, {self.last_complete}, is intact" if self.last_complete else ""
            raise CheckpointError(
                f"{no_space(self.root, target.step, needed, free)}; the half-written "
                f"{target.staging} was removed{intact}"
            ) from None

    def close(self) -> None:
        """Release the writer without any collective: after an exception other ranks may not be there.
        A normal end has already waited for every save in ``finish``."""
        self.writer.close()


def _layout_text(layout: Optional[dict]) -> str:
    if not layout:
        return "no particular layout"
    return f"{describe_saved(layout)}, {layout['precision']}"
