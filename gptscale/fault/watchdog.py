"""The hang watchdog: a thread per rank that ends a job whose progress has stopped, and says where.

The training thread says which phase it is in (``enter``): start-up, a checkpoint load, a step, a wait for
data, an evaluation, a checkpoint save. Every ``fault.heartbeat_s`` (and at once when the phase or step
changes) the thread publishes that phase, its step and how long it has lasted in the job's key-value store
(torch.distributed's TCPStore, which every node reaches; no collective), and holds its own phase to the
phase's timeout. The step timeout is learned from the run's own steps (``StepTimeout``).

The thread keeps running while the training thread waits in a collective, but a rank frozen whole (SIGSTOP,
a wedged host) publishes nothing. So the first rank whose phase overruns reads every rank's heartbeat twice,
two heartbeats apart, and names the ranks whose heartbeat stood still (else the ranks past their own
timeout). It claims the hang in the store, so that one report is written (``RUN_DIR/faults/hang-*.json``);
every live rank dumps its Python stacks (faulthandler) beside it, and exits with HANG_EXIT_CODE, well before
the process groups' timeout would end the job without naming anyone.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Optional

import torch.distributed as dist

from gptscale.config.schema import FaultConfig
from gptscale.config.validate import DETECTION_HEARTBEATS
from gptscale.errors import HANG_EXIT_CODE
from gptscale.files import replace_text

log = logging.getLogger("gptscale")

SETUP, CHECKPOINT_LOAD, STEP, DATA_WAIT, EVAL, CHECKPOINT_SAVE = (
    "setup",
    "checkpoint_load",
    "step",
    "data_wait",
    "eval",
    "checkpoint_save",
)
STORE_HEARTBEATS = 5  # a store operation may take this many heartbeats before the store counts as gone
FAULTS_DIR = "faults"  # under RUN_DIR: hang reports, their stacks, the record of starts
_current: list["Watchdog"] = []  # this process's watchdog: a new run's ends the one a failed start left running


class StepTimeout:
    """How long one step may take: ``fault.step_timeout_s`` until ``fault.step_warmup`` steps are timed, then
    ``fault.step_timeout_factor`` x the 99th percentile of the last ``WINDOW`` steps, at least
    ``fault.step_timeout_floor_s`` and at most ``fault.step_timeout_s``. The first step of a process is not
    timed (allocations, first communicators)."""

    WINDOW = 100

    def __init__(self, fault: FaultConfig):
        self.fault = fault
        self.times: deque[float] = deque(maxlen=self.WINDOW)
        self.untimed = 1
        self.seconds = fault.step_timeout_s

    def add(self, seconds: float) -> None:
        if self.untimed:
            self.untimed -= 1
            return
        self.times.append(seconds)
        if len(self.times) >= self.fault.step_warmup:
            ordered = sorted(self.times)
            p99 = ordered[math.ceil(0.99 * len(ordered)) - 1]
            self.seconds = min(
                max(self.fault.step_timeout_factor * p99, self.fault.step_timeout_floor_s), self.fault.step_timeout_s
            )


def job_store(timeout_s: float) -> dist.Store:
    """A connection of this rank's own to the job's store (torchrun's, at MASTER_ADDR:MASTER_PORT); a lone
    process has a store of its own."""
    if "MASTER_ADDR" not in os.environ:
        return dist.HashStore()
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def _where(frame) -> str:
    """The innermost gptscale frame and the innermost frame of a stack, in one line."""
    frames = traceback.extract_stack(frame)
    ours = [f for f in frames if f"{os.sep}gptscale{os.sep}" in f.filename]
    shown = ([ours[-1]] if ours else []) + ([frames[-1]] if frames and (not ours or frames[-1] is not ours[-1]) else [])
    return " > ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in shown)


def _in(phase: str, step: int) -> str:
    """Where a rank is, in words: "step 5", "eval at step 8"."""
    return f"step {step}" if phase == STEP else f"{phase} at step {step}"


def _moved(before: Optional[dict], after: Optional[dict]) -> bool:
    """Whether a rank's heartbeat went on between two readings."""
    return before is not None and after is not None and after["n"] != before["n"]


class Watchdog:
    def __init__(self, fault: FaultConfig, run_dir: Path, rank: int, world_size: int):
        self.fault = fault
        self.dir = Path(run_dir) / FAULTS_DIR
        self.rank, self.world_size = rank, world_size
        self.host = socket.gethostname()
        self.restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        nonce = [uuid.uuid4().hex[:8]]  # this run's, the same on every rank (collective)
        if world_size > 1:
            dist.broadcast_object_list(nonce, src=0)
        self.nonce = nonce[0]
        self.prefix = f"gptscale/fault/{self.nonce}"
        self.timeouts = {
            SETUP: fault.setup_timeout_s,
            CHECKPOINT_LOAD: fault.checkpoint_timeout_s,
            CHECKPOINT_SAVE: fault.checkpoint_timeout_s,
            EVAL: fault.eval_timeout_s,
            DATA_WAIT: fault.data_timeout_s,
        }
        self.step_timeout = StepTimeout(fault)
        now = time.monotonic()
        # (phase, step, when it began (a step's data waits are part of the step), when its current segment
        # began (a data wait's start), computing time of the step before that segment): one tuple, replaced
        # whole, so that the thread never reads half an update
        self.state = (SETUP, 0, now, now, 0.0)
        self.started_wall = time.time() - now  # monotonic -> unix time
        self.beats = 0
        self.published = SETUP  # the phase the store last heard of
        self.changed = threading.Event()
        self.stopped = threading.Event()
        self.main = threading.main_thread().ident or 0
        self.thread: Optional[threading.Thread] = None
        for previous in _current:
            previous.close()
        _current[:] = [self]
        if fault.detect_hangs:
            self.store = job_store(STORE_HEARTBEATS * fault.heartbeat_s)
            self.thread = threading.Thread(target=self._watch, name="gptscale-watchdog", daemon=True)
            self.thread.start()
            threading.Thread(target=self._last_resort, name="gptscale-watchdog-last-resort", daemon=True).start()

    def enter(self, phase: str, step: int) -> None:
        """The training thread is now in ``phase`` of ``step`` (cheap: called several times a step)."""
        current, current_step, began, segment, spent = self.state
        now = time.monotonic()
        if current == STEP:
            spent += now - segment
        if step == current_step and {phase, current} <= {STEP, DATA_WAIT}:  # within one step
            self.state = (phase, step, began, now, spent)
            if self.published == DATA_WAIT:  # the store says it waits for data: not any more
                self.changed.set()
            return
        if current in (STEP, DATA_WAIT):
            self.step_timeout.add(spent)
        self.state = (phase, step, now, now, 0.0)
        self.changed.set()

    def waiting_for_data(self, batches: Iterator[dict], step: int) -> Iterator[dict]:
        """``batches`` with each wait for the next batch timed as a data wait of ``step``."""
        while True:
            self.enter(DATA_WAIT, step)
            batch = next(batches, None)
            self.enter(STEP, step)
            if batch is None:
                return
            yield batch

    def timeout(self, phase: str) -> float:
        return self.step_timeout.seconds if phase == STEP else self.timeouts[phase]

    def _elapsed(self, state, now: float) -> float:
        """Seconds the phase has lasted toward its timeout (a step's: computing, its data waits apart)."""
        phase, _, _, segment, spent = state
        return spent + now - segment if phase == STEP else now - segment

    def _beat(self) -> dict:
        state = self.state
        phase, step, began, _, _ = state
        elapsed = self._elapsed(state, time.monotonic())
        self.beats += 1
        beat = {
            "n": self.beats,
            "phase": phase,
            "step": step,
            "elapsed": elapsed,
            "timeout": self.timeout(phase),
            "started": self.started_wall + began,
            "host": self.host,
            "pid": os.getpid(),
        }
        self.store.set(f"{self.prefix}/beat/{self.rank}", json.dumps(beat))
        self.published = phase
        return beat

    def _beats(self) -> dict[int, Optional[dict]]:
        keys = [f"{self.prefix}/beat/{rank}" for rank in range(self.world_size)]
        present = [key for key in keys if self.store.check([key])]
        values = dict(zip(present, self.store.multi_get(present))) if present else {}
        return {rank: json.loads(values[key]) if key in values else None for rank, key in enumerate(keys)}

    def _watch(self) -> None:
        while not self.stopped.is_set():
            self.changed.wait(self.fault.heartbeat_s)
            self.changed.clear()
            if self.stopped.is_set():
                return
            try:
                beat = self._beat()
                if self.store.check([f"{self.prefix}/hang"]):
                    self._join(json.loads(self.store.get(f"{self.prefix}/hang")))
                elif beat["elapsed"] > beat["timeout"]:
                    self._detect(self.state)
            except Exception as error:  # the store is gone (its host ended): judge alone
                if self._elapsed(self.state, time.monotonic()) > self.timeout(self.state[0]):
                    self._alone(error)

    def _last_resort(self) -> None:
        """End this rank when the watchdog could not, STORE_HEARTBEATS heartbeats after its phase overran: an
        operation on a store whose host froze whole (SIGSTOP) waits forever."""
        while not self.stopped.wait(self.fault.heartbeat_s):
            state = self.state
            late = self._elapsed(state, time.monotonic()) - self.timeout(state[0])
            if late > DETECTION_HEARTBEATS * self.fault.heartbeat_s:
                self._alone(TimeoutError(f"no answer for {late:.0f} s"))

    def _detect(self, stuck_state) -> None:
        """This rank's phase overran: find who stopped, claim the hang, have every live rank dump its stacks,
        write the report, exit."""
        first = self._beats()
        for _ in range(2):  # beating on: another rank may be looking at this one's heartbeat just now
            if self.stopped.wait(self.fault.heartbeat_s) or self.state is not stuck_state:
                return  # the phase ended meanwhile: slow, not stuck
            self._beat()
        second = self._beats()
        silent = [rank for rank in range(self.world_size) if not _moved(first[rank], second[rank])]
        overdue = [rank for rank, beat in second.items() if beat and beat["elapsed"] > beat["timeout"]]
        stuck = silent or [rank for rank in overdue if rank not in silent] or [self.rank]
        if self.store.add(f"{self.prefix}/claim", 1) != 1:
            return  # another rank reports it; this one joins at its next heartbeat
        detected_at = time.time()
        hang_id = f"hang-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(detected_at))}-{self.nonce}"
        live = [rank for rank in range(self.world_size) if rank not in silent]
        self.store.set(f"{self.prefix}/hang", json.dumps({"id": hang_id}))
        self._dump(hang_id)
        deadline = time.monotonic() + 2 * self.fault.heartbeat_s
        while int(self.store.add(f"{self.prefix}/dumped", 0)) < len(live) and time.monotonic() < deadline:
            time.sleep(0.05)
        doing = {
            rank: self.store.get(f"{self.prefix}/doing/{rank}").decode()
            for rank in live
            if self.store.check([f"{self.prefix}/doing/{rank}"])
        }
        named = [second[rank] or first[rank] for rank in stuck]
        seen = [beat for beat in named if beat is not None]
        report = {
            "detected_at": detected_at,
            "last_progress_at": min((beat["started"] for beat in seen), default=detected_at),
            "ranks": stuck,
            "hosts": sorted({beat["host"] for beat in seen}),
            "phase": seen[0]["phase"] if seen else None,
            "step": seen[0]["step"] if seen else None,
            "detected_by": self.rank,
            "restart": self.restart,
            "stacks": f"{FAULTS_DIR}/{hang_id}/",
            "rank_states": {
                str(rank): {
                    **(second[rank] or first[rank] or {}),
                    "heartbeat": "silent" if rank in silent else "live",
                    **({"doing": doing[rank]} if rank in doing else {}),
                }
                for rank in range(self.world_size)
            },
        }
        replace_text(self.dir / f"{hang_id}.json", json.dumps(report, indent=1) + "\n")
        where = ", ".join(
            f"rank {rank} on {beat['host']} ({_in(beat['phase'], beat['step'])}, heartbeat "
            f"{'silent' if rank in silent else 'live'})"
            for rank, beat in zip(stuck, named)
            if beat
        )
        self._exit(
            f"hang: no progress for {self.timeout(stuck_state[0]):.0f} s in {_in(*stuck_state[:2])}; "
            f"stuck: {where or ', '.join(map(str, stuck))}; report "
            f"{self.dir / (hang_id + '.json')}, stacks in {self.dir / hang_id}"
        )

    def _join(self, hang: dict) -> None:
        """Another rank found a hang: dump this rank's stacks and exit."""
        self._dump(hang["id"])
        self._exit(f"hang reported by another rank: stacks in {self.dir / hang['id']}", quiet=True)

    def _dump(self, hang_id: str) -> None:
        """This process's Python stacks to RUN_DIR/faults/HANG_ID/rankR.txt, and where its training thread is
        to the store (on gloo, what the step was doing)."""
        directory = self.dir / hang_id
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / f".rank{self.rank}.txt.partial"
        with open(partial, "w") as out:
            out.write(f"rank {self.rank} on {self.host}, pid {os.getpid()}: {_in(*self.state[:2])}\n")
            out.flush()
            faulthandler.dump_traceback(out, all_threads=True)
        os.replace(partial, directory / f"rank{self.rank}.txt")
        frame = sys._current_frames().get(self.main)
        if frame is not None:
            self.store.set(f"{self.prefix}/doing/{self.rank}", _where(frame))
        self.store.add(f"{self.prefix}/dumped", 1)

    def _alone(self, error: Exception) -> None:
        """This rank's phase overran and the store does not answer: the process hosting it stopped too (rank 0,
        unless torchrun's agent hosts it). Every live rank dumps its stacks; the first to claim the report (a
        file created only if absent) writes it."""
        phase, step, began, _, _ = self.state
        detected_at = time.time()
        hang_id = f"hang-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(detected_at))}-{self.nonce}"
        directory = self.dir / f"hang-{self.nonce}"
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / f"rank{self.rank}.txt", "w") as out:
            faulthandler.dump_traceback(out, all_threads=True)
        host_rank = [] if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else [0]
        try:
            os.close(os.open(directory / "claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            self._exit(f"hang, and the job's store is unreachable ({error}); stacks in {directory}", quiet=True)
        report = {
            "detected_at": detected_at,
            "last_progress_at": self.started_wall + began,
            "ranks": host_rank,
            "hosts": [],
            "phase": phase,
            "step": step,
            "detected_by": self.rank,
            "restart": self.restart,
            "stacks": f"{FAULTS_DIR}/{directory.name}/",
            "store_unreachable": str(error),
        }
        replace_text(self.dir / f"{hang_id}.json", json.dumps(report, indent=1) + "\n")
        self._exit(
            f"hang: no progress for {self.timeout(phase):.0f} s in {_in(phase, step)}, and the job's "
            f"store does not answer ({error}): the process that hosts it (rank 0, unless torchrun's agent "
            f"does) stopped; report {self.dir / (hang_id + '.json')}, stacks in {directory}"
        )

    def _exit(self, message: str, quiet: bool = False) -> None:
        (log.info if quiet else log.error)("rank %d: %s", self.rank, message)
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        os._exit(HANG_EXIT_CODE)

    def close(self) -> None:
        self.stopped.set()
        self.changed.set()
        if self.thread is not None:
            self.thread.join(timeout=STORE_HEARTBEATS * self.fault.heartbeat_s)
