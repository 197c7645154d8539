"""A real one-node SLURM cluster for tests: munged, slurmctld and slurmd from Debian's slurm-wlm and munge.

Everything lives in one temporary directory (configuration, munge key and socket, state, logs) and listens
on free ports, so a cluster never touches /etc or another test session's cluster. The daemons run in the
foreground as children of the test process; ``stop`` cancels every job, waits for their processes to
finish, and ends the daemons.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.helpers import free_port
from tests.processes import keep_running

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2):
        search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # daemons live in sbin
        self.programs = {name: shutil.which(name, path=search) for name in PROGRAMS}
        missing = [name for name, path in self.programs.items() if path is None]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not found: install Debian's slurm-wlm and munge (.ci/run does)")
        if os.geteuid() != 0:
            raise RuntimeError("the test SLURM cluster runs slurmd as root; run the tests as root (CI does)")
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []
        self._write_config(cpus)

    def _write_config(self, cpus: int) -> None:
        munge = self.root / "munge"
        for directory in (munge, self.root / "state", self.root / "spool"):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=gptscale-test",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # Requeued jobs wait for their credential to expire before they start again (default 120 s).
                    f"AuthInfo=socket={munge / 'munge.socket'},cred_expire=10",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"StateSaveLocation={self.root / 'state'}",
                    f"SlurmdSpoolDir={self.root / 'spool'}",
                    f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.root / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "MpiDefault=none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "JobCompType=jobcomp/none",
                    "ReturnToService=2",
                    "SchedulerParameters=sched_interval=2",
                    "KillWait=10",
                    "MinJobAge=3600",
                    # The node counts as having `cpus` CPUs even on a smaller machine.
                    "SlurmdParameters=config_overrides",
                    f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
                    f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
                ]
            )
            + "\n"
        )

    def start(self, timeout: float = 120) -> None:
        munge = self.root / "munge"
        self._spawn(
            "munged",
            "--foreground",
            "--force",
            f"--key-file={munge / 'munge.key'}",
            f"--socket={munge / 'munge.socket'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={munge / 'munged.log'}",
            f"--seed-file={munge / 'munged.seed'}",
        )
        self._wait(lambda: (munge / "munge.socket").exists(), timeout, "munged to open its socket")
        self._spawn("slurmctld", "-D", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-f", str(self.conf))
        self._wait(
            lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
            timeout,
            "the node to become idle",
        )

    @property
    def env(self) -> dict[str, str]:
        """The caller's environment (which sbatch hands to jobs) pointed at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _spawn(self, name: str, *args: str) -> None:
        with open(self.root / f"{name}.out", "w") as log:
            self.daemons.append(
                subprocess.Popen([self.programs[name], *args], env=self.env, stdout=log, stderr=subprocess.STDOUT)
            )
        keep_running(self.daemons[-1].pid)

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for daemon in self.daemons:
                if daemon.poll() is not None:
                    raise RuntimeError(
                        f"{Path(daemon.args[0]).name} exited {daemon.returncode} while waiting for {what}:\n"
                        f"{self.logs()}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what}:\n{self.logs()}")
            time.sleep(0.5)

    def run(
        self, *command: str, check: bool = True, cwd: Path | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        program = self.programs.get(command[0], command[0])
        proc = subprocess.run(
            [program, *command[1:]], env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str, cwd: Path) -> str:
        return self.run("sbatch", "--parsable", *args, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, ExitCode, Restarts, JobName, ...)."""
        text = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for(self, job_id: str, timeout: float, condition=lambda job: job["JobState"] in TERMINAL_STATES) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if condition(job):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['JobState']} after {timeout:.0f} s:\n{self.logs()}")
            time.sleep(1)

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name} (tail)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(parts)

    def stop(self, timeout: float = 120) -> None:
        """Cancel all jobs and wait until their processes are gone, then end the daemons."""
        if len(self.daemons) == 3 and all(daemon.poll() is None for daemon in self.daemons):
            self.run("scancel", "--partition=test", check=False)
            deadline = time.monotonic() + timeout
            while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(1)
        for daemon in reversed(self.daemons):
            if daemon.poll() is None:
                daemon.terminate()
                try:
                    daemon.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
        self.daemons.clear()
