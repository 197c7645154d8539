"""torchrun, whose rendezvous failures, stop signals and failed ranks end in lines that say what happened
(launch/torchrun.sh runs it).

torchrun reports an unreachable rendezvous or a node that never joined as a bare ``RendezvousTimeoutError``
traceback. On a stop signal (SIGTERM, SIGUSR1, Ctrl-C's SIGINT) it would signal the ranks and then end with the
signal's exit status even when they saved and stopped cleanly; here the signal is passed to the ranks and
torchrun goes on watching them, so a clean stop exits 0 (and a rank that has not stopped after
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds is killed). When ranks fail, the one that failed first is named with
its host and the last line of its error (the ranks record their errors for torchrun:
gptscale/train/__main__.py), and the launch exits with that rank's exit code where it is one of gptscale's
(a hang, no progress: docs/faults.md).

With ``--max_restarts`` torchrun restarts the ranks after a failure, and they resume from the newest
checkpoint. Two things are added to its agent: a failure that restarting cannot mend (a configuration
error, restarts without progress, a failure while the launch is asked to stop) ends the launch instead, and
a rank that is stopped (SIGSTOP: it cannot act on SIGTERM) is killed at once rather than after torchrun's 30 s
grace. Everything else is torchrun.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import threading

import torch.distributed.launcher.api as launcher
from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousTimeoutError
from torch.distributed.run import main as torchrun
from torch.distributed.run import parse_args

from gptscale.config.validate import ConfigError
from gptscale.errors import HANG_EXIT_CODE, NO_PROGRESS_EXIT_CODE

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
FINAL_EXIT_CODES = {ConfigError.exit_code, NO_PROGRESS_EXIT_CODE}  # a restart would fail the same way
_killed_when_stopped: set[int] = set()  # ranks' pids the agent killed because they were stopped
_stop_signals: list[str] = []  # the stop signals passed to the ranks: a launch asked to stop restarts nothing


def _rdzv_timeout(rdzv_conf: str) -> str:
    options = dict(item.split("=", 1) for item in rdzv_conf.split(",") if "=" in item)
    return options.get("join_timeout", "600")


def _ranks() -> list[int]:
    """This agent's rank processes: its children, each the leader of its own process group."""
    children = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            children += map(int, f.read().split())
    ranks = []
    for pid in children:
        try:
            if os.getpgid(pid) == pid:
                ranks.append(pid)
        except ProcessLookupError:
            pass
    return ranks


def _signal_ranks(signum: int) -> None:
    for pid in _ranks():
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            pass


class StopForwarder:
    """Passes SIGTERM / SIGUSR1 to the ranks (their whole process groups, as torchrun would) and lets torchrun
    watch them stop; SIGKILLs them if they have not after the grace period."""

    def __init__(self):
        self.deadline: threading.Timer | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handle)

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not _ranks():
            raise SignalException(f"got {name} before the ranks started", sigval=signal.Signals(signum))
        print(f"gptscale: torchrun got {name} and passed it to the ranks (they save and stop)", file=sys.stderr)
        _stop_signals.append(name)
        _signal_ranks(signum)
        if self.deadline is None:
            self.deadline = threading.Timer(
                float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")), _signal_ranks, args=(signal.SIGKILL,)
            )
            self.deadline.daemon = True
            self.deadline.start()


def _first(failures: dict[int, ProcessFailure]) -> tuple[int, ProcessFailure]:
    """The rank that failed first and its failure."""
    # torchrun ends the other ranks with SIGTERM once one fails, and the agent kills stopped ones: those are
    # not what failed first, whatever their timestamps (whole seconds, so a tie could name one of them).
    causes = {
        rank: f for rank, f in failures.items() if f.exitcode != -signal.SIGTERM and f.pid not in _killed_when_stopped
    } or failures
    return min(causes.items(), key=lambda item: (item[1].timestamp, _recorded_ns(item[1]), item[0]))


def _recorded_ns(failure: ProcessFailure) -> float:
    """When the rank wrote its error file, to the nanosecond: it orders failures within the whole second of
    their timestamps (a rank's own error, then its peer's "connection closed" a moment later)."""
    try:
        return os.stat(failure.error_file).st_mtime_ns
    except (OSError, TypeError):
        return float("inf")


def _states() -> dict[int, str]:
    """Each rank process's state letter (R, S, D, T stopped, Z exited)."""
    states = {}
    for pid in _ranks():
        try:
            with open(f"/proc/{pid}/stat") as f:
                states[pid] = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            pass
    return states


def _kill_stopped(states: dict[int, str]) -> None:
    for pid, state in states.items():
        if state in ("T", "t"):
            _killed_when_stopped.add(pid)
            os.kill(pid, signal.SIGKILL)


class RestartingAgent(LocalElasticAgent):
    """torchrun's agent, which does not restart what a restart cannot mend and kills stopped ranks at once."""

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        states = _states()
        if "Z" in states.values():  # a rank ended: torchrun stops the others, and a stopped one cannot
            _kill_stopped(states)
        result = super()._monitor_workers(worker_group)
        if result.state == WorkerState.FAILED:
            rank, failure = _first(result.failures)
            if failure.exitcode in FINAL_EXIT_CODES or _stop_signals:
                self._remaining_restarts = 0
            elif self._remaining_restarts > 0:
                restart = worker_group.spec.max_restarts - self._remaining_restarts + 1
                print(
                    f"{first_failure(result.failures)}\ngptscale: restarting the ranks (restart {restart} of "
                    f"{worker_group.spec.max_restarts}); they resume from the newest complete checkpoint",
                    file=sys.stderr,
                )
        return result

    def _stop_workers(self, worker_group: WorkerGroup) -> None:
        _kill_stopped(_states())
        super()._stop_workers(worker_group)


def first_failure(failures: dict[int, ProcessFailure]) -> str:
    """One line: the rank that failed first, its host, and the last line of its error."""
    rank, failure = _first(failures)
    where = f"gptscale: rank {rank} on {socket.gethostname()} failed first"
    if failure.exitcode < 0:
        return f"{where} (killed by {failure.signal_name()})"
    if not os.path.isfile(failure.error_file):  # it recorded no error (its log has one)
        return f"{where} (exit code {failure.exitcode})"
    message = failure.message["message"] if isinstance(failure.message, dict) else failure.message
    return f"{where} (exit code {failure.exitcode}): {(message.strip().splitlines() or [''])[-1]}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    where = f"the rendezvous at {args.rdzv_endpoint} (id {args.rdzv_id}, {args.nnodes} nodes)"
    StopForwarder()
    launcher.LocalElasticAgent = RestartingAgent
    # The agent's store outlives restarts, and the ranks of a restart would read the previous ranks' keys as
    # their own (pytorch/pytorch#135712): rank 0 hosts a fresh store for each start instead.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # torchrun keeps the ranks' error files in a temporary directory it never removes: one of ours, removed at the end.
    logs = None if args.log_dir else tempfile.mkdtemp(prefix="gptscale-torchrun-")
    try:
        torchrun(argv if logs is None else ["--log-dir", logs, *argv])
    except RendezvousConnectionError as error:
        cause = str(error.__cause__ or error).splitlines()[0]
        sys.exit(
            f"gptscale: cannot reach {where}: {cause}\n"
            "Is node 0 running, and is the master address node 0's address as this node sees it?"
        )
    except RendezvousTimeoutError:
        sys.exit(
            f"gptscale: {where} timed out after {_rdzv_timeout(args.rdzv_conf)} s before every node joined.\n"
            "Did every node start, with the same --nnodes, master address, port and rendezvous id?"
        )
    except ChildFailedError as error:
        print(first_failure(error.failures), file=sys.stderr)
        code = _first(error.failures)[1].exitcode
        sys.exit(code if code in (HANG_EXIT_CODE, NO_PROGRESS_EXIT_CODE) else 1)
    except SignalException as error:
        print(f"gptscale: torchrun got {error.sigval.name} and ended the launch", file=sys.stderr)
        sys.exit(128 + int(error.sigval))
    finally:
        if logs is not None:
            shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()
