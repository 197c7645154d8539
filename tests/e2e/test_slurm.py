"""gptscale on a real one-node SLURM cluster started by the tests: the sbatch template, a Hydra sweep through
hydra/launcher=slurm, a job signalled ahead of its time limit that checkpoints, is requeued and resumes, a job
whose rank hangs and is restarted inside the job, and a job that fails again and again without progress."""

import json
import re
import sys
from pathlib import Path

import pytest

from gptscale.errors import NO_PROGRESS_EXIT_CODE
from tests.e2e.slurm_cluster import TERMINAL_STATES
from tests.faults import FAST_TIMEOUTS, launch_env
from tests.helpers import REPO, run_jobs
from tests.wandb_file import read_run

JOB = ["train.log_interval=2", "train.eval_interval=0", "parallel.micro_batch=2", "parallel.global_batch=8"]


@pytest.fixture
def job_env(tmp_path, monkeypatch):
    """What every job inherits (sbatch exports the submitting environment): this checkout, one thread per rank,
    a private W&B home."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    for name in ("WANDB_API_KEY", "WANDB_MODE", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def submit(cluster, tmp_path, *overrides):
    """launch/slurm.sbatch as users submit it, for 2 CPU ranks on the cluster's node (no GPU there)."""
    return cluster.sbatch(
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        "--time=15",
        f"--output={tmp_path}/slurm.out",
        "--export=ALL,NPROC_PER_NODE=2",
        "launch/slurm.sbatch",
        *overrides,
        cwd=REPO,
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def log_lines(run_dir: Path) -> list[dict]:
    """The records of training log lines (not evaluation or checkpoint records)."""
    return [record for record in metrics(run_dir) if "loss" in record]


def test_sbatch_template_trains_two_ranks(cluster, job_env, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submit(cluster, tmp_path, f"run_dir={run_dir}", "train.steps=6", *JOB)
    job = cluster.wait_for(job_id, timeout=900)
    log = (tmp_path / "slurm.out").read_text()
    assert (job["JobState"], job["ExitCode"], job["JobName"]) == ("COMPLETED", "0:0", "gptscale"), log[-5000:]
    assert f"gptscale: job {job_id}, restart 0, 1 node(s), 2 rank(s) per node" in log
    assert "2 ranks (tp1 pp1 dp2 zero0" in log and "step 6/6 | loss" in log
    assert [r["step"] for r in log_lines(run_dir)] == [2, 4, 6]
    assert (run_dir / "checkpoints" / "step_000006" / "checkpoint.json").is_file()  # checkpoint.save_final


def test_hydra_sweep_through_the_slurm_launcher_runs_every_job(cluster, job_env, tmp_path):
    """2 configs, each one SLURM job of 2 tasks (ranks), named and placed by the config."""
    run_dir = tmp_path / "sweep"
    proc = cluster.run(
        sys.executable,
        "-m",
        "gptscale.train",
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.cpus_per_task=1",
        f"run_dir={run_dir}",
        "train.steps=4",
        *JOB,
        "train.seed=1,2",
        cwd=REPO,
        check=False,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_dirs = sorted((run_dir / "multirun" / ".submitit").glob("*_[0-9]"))
    assert len(job_dirs) == 2
    for job_dir in job_dirs:  # submitit returns once each job wrote its result; SLURM may still be ending it
        job = cluster.wait_for(job_dir.name, timeout=120)
        assert (job["JobState"], job["ExitCode"], job["JobName"]) == ("COMPLETED", "0:0", "gptscale-gpt2-tiny")
        rank0_log = next(job_dir.glob("*_0_log.err")).read_text()
        assert "2 ranks (tp1 pp1 dp2 zero0" in rank0_log  # one SLURM task per rank, ranks from submitit
    first, second = (log_lines(run_dir / "multirun" / str(number)) for number in (0, 1))
    assert [r["step"] for r in first] == [2, 4] == [r["step"] for r in second]
    assert first[0]["loss"] != second[0]["loss"]  # two seeds, two runs


def test_job_signalled_before_its_time_limit_checkpoints_requeues_and_resumes(cluster, job_env, tmp_path):
    """SLURM's --signal=B:USR1@300 warning, sent now instead of 300 s before the limit, and to every process of
    the job (--full: the batch script, torchrun, the ranks and the checkpoint writer's helper processes), once
    a checkpoint was saved: the ranks save the step they stop at, the job requeues itself, and the second run
    continues from that checkpoint, in the same W&B run, with the losses of a run never stopped."""
    run_dir, steps = tmp_path / "run", 40
    job_id = submit(
        cluster,
        tmp_path,
        f"run_dir={run_dir}",
        f"train.steps={steps}",
        *JOB,
        "checkpoint.interval=4",
        "logging.wandb.mode=offline",
    )
    out = tmp_path / "slurm.out"
    running = cluster.wait_for(
        job_id,
        timeout=600,
        condition=lambda job: (
            job["JobState"] in TERMINAL_STATES or (run_dir / "metrics.jsonl").exists() and len(log_lines(run_dir)) >= 3
        ),
    )
    assert running["JobState"] == "RUNNING", out.read_text()[-5000:]
    cluster.run("scancel", "--signal=USR1", "--full", job_id)
    # Done once it ended after its requeue, or ended without ever seeing the signal.
    job = cluster.wait_for(
        job_id,
        timeout=900,
        condition=lambda job: (
            job["JobState"] in TERMINAL_STATES and (job["Restarts"] != "0" or "SIGUSR1 ahead" not in out.read_text())
        ),
    )
    log = out.read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log[-5000:]
    assert job["Restarts"] == "1"
    assert "SIGUSR1 ahead of the time limit" in log and f"requeueing job {job_id}" in log
    assert f"gptscale: job {job_id}, restart 1" in log
    stopped_at = int(re.search(r"stop requested by signal: saving at step (\d+)", log).group(1))
    assert stopped_at >= 6 and f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:06d}'}" in log, log
    steps_logged = [r["step"] for r in log_lines(run_dir)]
    assert steps_logged.count(2) == 1, steps_logged  # the second run resumed instead of starting over
    assert steps_logged[-1] == steps
    assert any("checkpoint_step" in r for r in metrics(run_dir))
    runs = [read_run(path) for path in (run_dir / "wandb").glob("*/run-*.wandb") if path.parent.name != "latest-run"]
    assert len(runs) == 2 and runs[0].run_id == runs[1].run_id
    [never_stopped] = run_jobs(2, [[f"run_dir={tmp_path / 'never-stopped'}", f"train.steps={steps}", *JOB]], tmp_path)
    assert {r["step"]: r["loss"] for r in log_lines(run_dir)} == {
        step: never_stopped["loss"][step - 1] for step in steps_logged
    }


def give_faults(monkeypatch, faults):
    """The job's ranks (sbatch exports the submitting environment) meet ``faults`` (tests/faults)."""
    for name, value in launch_env(faults, str(REPO)).items():
        monkeypatch.setenv(name, value)


def test_a_job_whose_rank_hangs_is_restarted_inside_the_job_and_completes(cluster, job_env, tmp_path, monkeypatch):
    give_faults(monkeypatch, [{"at": "step", "step": 5, "rank": 1}])
    run_dir = tmp_path / "run"
    job_id = submit(
        cluster,
        tmp_path,
        f"run_dir={run_dir}",
        "train.steps=6",
        *JOB,
        "checkpoint.interval=2",
        "checkpoint.async_save=false",
        *FAST_TIMEOUTS,
    )  # step 4's checkpoint is complete before step 5
    job = cluster.wait_for(job_id, timeout=900)
    log = (tmp_path / "slurm.out").read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), log[-5000:]
    assert "gptscale: restarting the ranks (restart 1 of 10)" in log
    assert f"resumed from {run_dir / 'checkpoints' / 'step_000004'}" in log
    [report] = [json.loads(path.read_text()) for path in (run_dir / "faults").glob("hang-*.json")]
    assert (report["ranks"], report["phase"], report["step"]) == ([1], "step", 5)
    assert [r["step"] for r in log_lines(run_dir)][-1] == 6


def test_a_job_failing_again_and_again_without_a_new_checkpoint_stops_and_is_not_requeued(
    cluster, job_env, tmp_path, monkeypatch
):
    give_faults(
        monkeypatch,
        [{"at": "step", "step": 2, "rank": 1, "signal": "SIGKILL", "restart": restart} for restart in range(3)],
    )
    run_dir = tmp_path / "run"
    job_id = submit(
        cluster,
        tmp_path,
        f"run_dir={run_dir}",
        "train.steps=6",
        *JOB,
        "checkpoint.interval=0",
        "fault.max_restarts_without_progress=1",
    )
    job = cluster.wait_for(job_id, timeout=900)
    log = (tmp_path / "slurm.out").read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", f"{NO_PROGRESS_EXIT_CODE}:0", "0"), log[
        -5000:
    ]
    assert log.count("gptscale: restarting the ranks") == 2  # the third start stops before training
    assert (
        "stopping: 2 restarts in a row found no new checkpoint (newest: none; fault.max_restarts_without_progress=1)"
    ) in log
    assert "the job ends here, it is not requeued" in log
