"""Runs a save's writes now, or in a background process while training goes on (megatron-core's async calls).

The snapshot is already in host memory when a write starts, so training may change the weights at once.
A background write is finalized (manifest, rename, ``latest``) by a later ``poll`` once every rank's writer
has finished, never before; ``poll`` and ``wait`` are collective.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest


class Writer:
    def __init__(self, asynchronous: bool):
        self.queue: Optional[AsyncCallsQueue] = AsyncCallsQueue() if asynchronous else None

    @property
    def asynchronous(self) -> bool:
        return self.queue is not None

    def submit(self, request: AsyncRequest) -> None:
        """Write (and finalize) now, or start writing in the background."""
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
