"""Runs a save's writes now, or in a background process while training goes on (megatron-core's async calls).

The snapshot is already in host memory when a write starts, so training may change the weights at once.
A background write is finalized (manifest, rename, ``latest``) by a later ``poll`` once every rank's writer
has finished, never before; ``poll`` and ``wait`` are collective.

The writer's helper processes (the forked writer, its forked workers, and the multiprocessing manager whose
queue carries their results) start shielded (``gptscale.processes``): a stop signal sent to the rank's whole
process group leaves them writing the save it asks for, and none outlives its rank.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.managers import SyncManager
from typing import Optional

from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest

from gptscale.processes import helper_starts, shielded


class Writer:
    def __init__(self, asynchronous: bool):
        self.queue: Optional[AsyncCallsQueue] = AsyncCallsQueue() if asynchronous else None

    @property
    def asynchronous(self) -> bool:
        return self.queue is not None

    @staticmethod
    def prepare() -> None:
        """Before a save's writes are planned: megatron-core's writers report through the queue of a spawned
        multiprocessing manager, which it would start unshielded; start it here, shielded (one per process)."""
        if filesystem_async._results_queue is None:
            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            with shielded():
                manager.start(initializer=helper_starts)
            filesystem_async._results_queue = manager.Queue()

    def submit(self, request: AsyncRequest) -> None:
        """Write (and finalize) now, or start writing in the background."""
        with shielded():
            if self.queue is None:
                request.execute_sync()
            else:
                self.queue.schedule_async_request(request)

    def pending(self) -> bool:
        return self.queue is not None and self.queue.get_num_unfinalized_calls() > 0

    def poll(self) -> None:
        """Finalize background saves that every rank has finished writing."""
        if self.pending():
            self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until every background save is written and finalized."""
        if self.pending():
            self.queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        """Stop tracking background saves without waiting for other ranks: one still being written is never
        published (its staging directory is removed by the next run)."""
        if self.queue is not None:
            self.queue.close(abort=True)
            self.queue = None
