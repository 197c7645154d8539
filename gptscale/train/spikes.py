"""Loss spikes, from detection to rewind: what a skipped step's batch held, and what a streak of them does.

The detector (``guard.SpikeDetector``) says how far a step's loss is from normal and sets the update gate's
limits; here a step the gate skipped has its whole global batch's documents named (rank 0 reads them from
the order, a pure function of the step) and excluded from then on, and ``train.spike.max_consecutive``
skips in a row rewind to the newest checkpoint before the streak, or, where none is left to rewind to,
make the detector accept the new loss level. ``checkpoint.rewind=N`` rewinds once at start. Every method is
collective. docs/spikes.md.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch.distributed as dist

from gptscale.checkpoint.checkpointer import Checkpointer
from gptscale.checkpoint.manifest import CheckpointError
from gptscale.config.schema import SpikeConfig
from gptscale.tracking import Tracker
from gptscale.train.guard import SpikeDetector
from gptscale.train.rewind import AT_START, SpikeRecord

log = logging.getLogger("gptscale")


class SpikeHandling:
    def __init__(
        self,
        settings: SpikeConfig,
        detector: SpikeDetector,
        record: SpikeRecord,
        loader,
        checkpointer: Checkpointer,
        tracker: Tracker,
        step: Callable[[], int],
        rank: int,
        world_size: int,
    ):
        self.settings, self.detector, self.record, self.loader = settings, detector, record, loader
        self.checkpointer, self.tracker, self.step = checkpointer, tracker, step
        self.rank, self.world_size = rank, world_size

    def skipped(self, loss: float, grad_norm, zscores) -> None:
        """The update gate skipped this step as a spike: count it, exclude its documents, say so."""
        step = self.step()
        self.detector.count_skip(step)
        documents = self._exclude_batch(step)
        log.warning(
            "step %d skipped as a spike: loss %.4f (z-score %s), gradient norm %s (z-score %s); "
            "%d spikes skipped in all",
            step,
            loss,
            _score(zscores[0]),
            grad_norm,
            _score(zscores[1]),
            self.detector.skipped,
        )
        self.tracker.log(
            step,
            {
                "spike/skipped_step": 1,
                "spike/loss": loss,
                "spike/zscore_loss": zscores[0],
                "spike/zscore_grad_norm": zscores[1],
                "spike/skipped": self.detector.skipped,
                "spike/documents": len(documents),
            },
        )

    def _exclude_batch(self, step: int) -> list:
        """The documents of the skipped step's whole global batch (rank 0 names them from the order; every
        rank gets the list): recorded in RUN_DIR and excluded from the loader from the next step on."""
        if not hasattr(self.loader, "documents_at"):  # synthetic or fine-tuning data
            return []
        found = [self.loader.documents_at(self.loader.step - 1) if self.rank == 0 else None]
        if self.world_size > 1:
            dist.broadcast_object_list(found, src=0)
        documents: list = found[0] or []
        self.record.add(documents, f"step {step}")
        self.loader.exclude(documents)
        if self.rank == 0:
            log.warning(
                "step %d: its %d documents are excluded from now on and listed in %s",
                step,
                len(documents),
                self.record.documents_file,
            )
        return documents

    def streak_too_long(self) -> bool:
        bound = self.settings.max_consecutive
        return bound > 0 and self.detector.consecutive >= bound

    def end_streak(self) -> bool:
        """``train.spike.max_consecutive`` spikes in a row: rewind to before the first of them and return True.
        Where the run cannot (no checkpoint early enough, or ``train.spike.max_rewinds`` used), the spikes are
        the model's own level, not a batch's: the detector restarts from it and training goes on, as it would
        with no spike handling at all."""
        spike, start = self.settings, self.detector.streak_start
        if start is None:  # no streak
            return False
        what = (
            f"{self.detector.consecutive} steps in a row since step {start} were skipped "
            f"as loss spikes (train.spike.max_consecutive={spike.max_consecutive})"
        )
        if self.record.automatic_rewinds() >= spike.max_rewinds:
            why_not = (
                f"the run has rewound train.spike.max_rewinds={spike.max_rewinds} times already "
                f"({self.record.rewinds_file})"
            )
        else:
            try:
                self.rewind(start - 1, what)
                return True
            except CheckpointError as error:
                why_not = f"the run cannot rewind: {error}"
        if self.rank == 0:
            log.warning(
                "step %d: %s, and %s; training goes on from this loss level, which the spike detector "
                "takes as the new normal once %d updated steps fill its window again",
                self.step(),
                what,
                why_not,
                spike.window,
            )
        self.detector.restart()
        self.tracker.log(self.step(), {"spike/restarted": 1})
        return False

    def rewind(self, target: int, reason: str) -> None:
        """Reload the newest checkpoint at or before step ``target`` and go on with every recorded document
        excluded."""
        from_step = self.step()
        path = self.checkpointer.rewind(target)
        new = self.loader.exclude(self.record.documents) if hasattr(self.loader, "exclude") else []
        self.record.add_rewind(
            {
                "from_step": from_step,
                "to_step": target,
                "checkpoint": str(path),
                "resumed_step": self.step(),
                "reason": reason,
                "excluded": len(new),
            }
        )
        if self.rank == 0:
            what = "at start" if reason == AT_START else f"from step {from_step}"
            log.warning(
                "rewound %s to the checkpoint of step %d (%s; %s): %d more documents excluded",
                what,
                self.step(),
                path,
                reason,
                len(new),
            )
        self.tracker.log(self.step(), {"rewind/from_step": from_step, "rewind/excluded": len(new)})

    def rewind_at_start(self, target) -> bool:
        """``checkpoint.rewind=N``: start from the newest checkpoint at or before N, once per run directory (a
        relaunch with the same command line then resumes as usual)."""
        if target is None:
            return False
        if self.record.rewound_at_start_to(target):
            if self.rank == 0:
                log.info(
                    "checkpoint.rewind=%d was done before (%s): resuming as usual", target, self.record.rewinds_file
                )
            return False
        self.rewind(target, AT_START)
        return True


def _score(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"
