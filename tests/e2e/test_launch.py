"""launch/torchrun.sh on one machine: a 1-node run with every tracker, the same job as two simulated nodes,
and the launcher's refusals (too many ranks, an unreachable or incomplete rendezvous, no SLURM job)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from gptscale.tracking.plot import read_metrics
from tests.helpers import REPO, free_port, run_jobs
from tests.wandb_file import read_run

STEPS = 8
JOB = [
    "train.steps=8",
    "train.log_interval=2",
    "train.eval_interval=4",
    "train.eval_batches=1",
    "parallel.micro_batch=2",
    "parallel.global_batch=8",
]


def launcher_env(tmp_path) -> dict:
    """One CPU thread per rank (two agents on one machine would otherwise oversubscribe) and a private W&B home."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in (
        "WANDB_API_KEY",
        "WANDB_MODE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "NNODES",
        "NODE_RANK",
        "NPROC_PER_NODE",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
    ):
        env.pop(name, None)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        env[name] = str(tmp_path / "wandb-home")
    return env


def launch(args, env, timeout=600, popen=False):
    return run_launcher(["bash", str(REPO / "launch" / "torchrun.sh"), *map(str, args)], env, timeout, popen)


def run_launcher(command, env, timeout=600, popen=False):
    """``command`` run to its end (output captured), or started in a session of its own (output piped)."""
    if popen:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_node_run(tmp_path_factory):
    """2 ranks on one node through the launcher, logging to metrics.jsonl, W&B (offline) and TensorBoard."""
    tmp_path = tmp_path_factory.mktemp("one_node")
    run_dir = tmp_path / "run"
    proc = launch(
        [
            "--nproc-per-node",
            2,
            f"run_dir={run_dir}",
            *JOB,
            "logging.wandb.mode=offline",
            "logging.wandb.project=launch-test",
            "logging.tensorboard=true",
            "train.straggler.factor=2",
        ],
        launcher_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return run_dir


def test_one_node_run_logs_every_step(one_node_run):
    records = metrics(one_node_run)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    for record in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= record.keys()
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8]


def test_a_healthy_run_names_no_straggler(one_node_run):
    """Both ranks' times are compared at every log step, and none is named. At factor 2, not the default 1.5:
    on this 2-core machine W&B's and TensorBoard's writers share the ranks' cores and have slowed one rank's
    forward passes 1.6-1.8x for three log intervals in a row (a GPU's ranks have cores of their own)."""
    train = [r for r in metrics(one_node_run) if "loss" in r]
    assert all(r["straggler/count"] == 0 and "straggler/ranks" not in r for r in train)
    assert all(r["straggler/slowest_ratio"] > 0 and r["straggler/compute_s"] > 0 for r in train)


def test_two_nodes_match_one_node_of_the_same_world_size(one_node_run, tmp_path):
    """Two torchrun agents (nnodes=2, one rank each) meeting by c10d on 127.0.0.1 train what one node does."""
    run_dir, port, env = tmp_path / "run", free_port(), launcher_env(tmp_path)
    node_args = [
        "--nnodes",
        2,
        "--nproc-per-node",
        1,
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        port,
        "--rdzv-timeout",
        300,
        f"run_dir={run_dir}",
        *JOB,
    ]
    nodes = [launch(["--node-rank", rank, *node_args], env, popen=True) for rank in (1, 0)]
    try:
        outputs = [node.communicate(timeout=900)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(output[-4000:] for output in outputs)
    assert "2 ranks (tp1 pp1 dp2 zero0" in "".join(outputs)
    one, two = metrics(one_node_run), metrics(run_dir)
    for key in ("loss", "grad_norm", "eval_loss"):
        expected = [(r["step"], r[key]) for r in one if key in r]
        assert [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in two if key in r] == expected, key


def test_wandb_offline_run_holds_every_logged_metric_and_the_config(one_node_run):
    """Only rank 0 logs (one W&B run for two ranks); every value of metrics.jsonl is in it at its step (the
    value logged last at a step, as W&B and gptscale-plot keep it: the goodput figures after the final save)."""
    [path] = [p for p in (one_node_run / "wandb").glob("*/run-*.wandb") if p.parent.name != "latest-run"]
    run = read_run(path)
    assert run.project == "launch-test"
    assert run.config["model"]["name"] == "gpt2-tiny" and run.config["train"]["steps"] == STEPS
    assert run.config["run_dir"] == str(one_node_run)
    for record in read_metrics(one_node_run / "metrics.jsonl"):
        for key, value in record.items():
            if key != "step" and value is not None and not isinstance(value, list):  # lists: metrics.jsonl only
                assert run.history[record["step"]][key] == pytest.approx(value), (record["step"], key)


def test_tensorboard_holds_the_training_curves(one_node_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(one_node_run / "tensorboard")).Reload()
    losses = {event.step: event.value for event in events.Scalars("loss")}
    assert losses == {r["step"]: pytest.approx(r["loss"]) for r in metrics(one_node_run) if "loss" in r}
    assert {"lr", "grad_norm", "tokens_per_s", "eval_loss"} <= set(events.Tags()["scalars"])


@pytest.mark.parametrize("command", [["-m", "gptscale.tracking.plot"], ["tools/plot.py"]])
def test_plot_draws_a_finished_run(one_node_run, tmp_path, command):
    out = tmp_path / "curves.png"
    proc = subprocess.run(
        [sys.executable, *command, str(one_node_run), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and out.stat().st_size > 10_000


def test_more_ranks_than_the_node_has_is_refused(tmp_path):
    proc = launch(
        ["--nproc-per-node", (os.cpu_count() or 1) * 4 + 1, f"run_dir={tmp_path}"], launcher_env(tmp_path), timeout=60
    )
    assert proc.returncode == 2
    assert "ranks per node, but this node" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "node_rank, message",
    [
        (1, "cannot reach the rendezvous at 127.0.0.1:"),  # nobody listens where node 0 should be
        (0, "timed out after 5 s before every node joined"),  # node 0 waits for a node that never comes
    ],
)
def test_failed_rendezvous_ends_with_a_clear_message(tmp_path, node_rank, message):
    start = time.monotonic()
    proc = launch(
        [
            "--nnodes",
            2,
            "--node-rank",
            node_rank,
            "--nproc-per-node",
            1,
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            free_port(),
            "--rdzv-timeout",
            5,
            f"run_dir={tmp_path}",
        ],
        launcher_env(tmp_path),
        timeout=300,
    )
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Did every node start" in proc.stderr or "Is node 0 running" in proc.stderr
    assert time.monotonic() - start < 240


def test_launcher_options_are_checked(tmp_path):
    env = launcher_env(tmp_path)
    for args, message in [
        (["--nnodes", 2], "--master-addr (or MASTER_ADDR) is required with 2 nodes"),
        (["--nnodes", 2, "--node-rank", 2, "--master-addr", "h"], "--node-rank must be in 0..1"),
        (["--nproc-per-node", 0], "--nproc-per-node must be a positive integer"),
        (["--tp=2"], "unknown option --tp=2"),
    ]:
        proc = launch(args, env, timeout=60)
        assert (proc.returncode, message in proc.stderr) == (2, True), (args, proc.stderr)


def test_sbatch_template_outside_slurm_names_the_missing_variables(tmp_path):
    env = {key: value for key, value in launcher_env(tmp_path).items() if not key.startswith("SLURM_")}
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), f"run_dir={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_JOB_NUM_NODES SLURM_SUBMIT_DIR not set" in proc.stderr
    assert "submit this script with sbatch" in proc.stderr


def test_local_sweep_runs_each_config_in_its_own_directory(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptscale.train",
            "-m",
            f"run_dir={tmp_path}",
            "train.steps=2",
            "train.log_interval=2",
            "train.eval_interval=0",
            "optim.lr=1e-3,2e-3",
        ],
        cwd=REPO,
        env=launcher_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    first, second = ([r for r in metrics(tmp_path / "multirun" / str(number)) if "loss" in r] for number in (0, 1))
    assert [r["step"] for r in first] == [2] == [r["step"] for r in second]
    assert second[0]["lr"] == pytest.approx(2 * first[0]["lr"])
    assert not (tmp_path / "metrics.jsonl").exists()


def wait_for_step(run_dir, step, process, timeout=300):
    """Until metrics.jsonl logs ``step`` (the run must still be going)."""
    deadline = time.monotonic() + timeout
    while not ((run_dir / "metrics.jsonl").exists() and any(r.get("step", 0) >= step for r in metrics(run_dir))):
        assert process.poll() is None, process.communicate()[0][-5000:]
        assert time.monotonic() < deadline, f"step {step} not logged after {timeout} s"
        time.sleep(0.2)


def test_stop_signal_to_the_launcher_saves_the_stop_step_and_it_resumes_exactly(tmp_path):
    """SIGUSR1 to launch/torchrun.sh's pid after a checkpoint was saved (its writer's helper processes are up,
    in each rank's process group, which torchrun signals): the ranks save the step they stop at, the launcher
    exits 0, and training resumed from that checkpoint gives the losses of a run never stopped."""
    run_dir, env = tmp_path / "run", launcher_env(tmp_path)
    job = ["train.log_interval=1", "train.eval_interval=0", "parallel.micro_batch=2", "parallel.global_batch=8"]
    launcher = launch(
        [
            "--nproc-per-node",
            2,
            f"run_dir={run_dir}",
            "parallel.tp=2",
            "train.steps=100000",
            "checkpoint.interval=3",
            *job,
        ],
        env,
        popen=True,
    )
    try:
        wait_for_step(run_dir, 5, launcher)
        os.kill(launcher.pid, signal.SIGUSR1)
        output = launcher.communicate(timeout=300)[0]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 0, output[-5000:]
    assert "torchrun got SIGUSR1 and passed it to the ranks" in output
    stopped_at = [r for r in metrics(run_dir) if "loss" in r][-1]["step"]
    assert f"stop requested by signal: saving at step {stopped_at}" in output
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step_{stopped_at:06d}", output[-5000:]
    assert (checkpoints / f"step_{stopped_at:06d}" / "checkpoint.json").is_file()
    assert not list(checkpoints.glob("*.tmp-*"))

    steps = stopped_at + 2
    resumed, fresh = run_jobs(
        2,
        [
            [
                f"run_dir={run_dir}",
                "parallel.tp=2",
                f"train.steps={steps}",
                *job,
                "optim.on_new_steps=stretch",
            ],  # the schedule of the fresh run's length
            [f"run_dir={tmp_path / 'fresh'}", "parallel.tp=2", f"train.steps={steps}", *job],
        ],
        tmp_path,
    )
    assert resumed["loss"] == fresh["loss"][stopped_at:]
    assert [r["loss"] for r in metrics(run_dir) if "loss" in r][:stopped_at] == fresh["loss"][:stopped_at]


def test_the_rank_that_failed_first_is_named_with_its_error(tmp_path):
    """Rank 1 raises; rank 0 then fails too, in a collective without its peer, and is stopped by torchrun: the
    launch's last line names rank 1, its host and its error, and it leaves no temporary file."""
    command = [
        sys.executable,
        "-m",
        "gptscale.parallel.torchrun",
        "--standalone",
        "--nproc_per_node=2",
        "tests/e2e/failing_rank.py",
        f"run_dir={tmp_path}",
        "train.steps=10",
        "train.eval_interval=0",
        "parallel.micro_batch=2",
        "parallel.global_batch=8",
    ]
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**launcher_env(tmp_path), "TMPDIR": str(temporary)}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    left = [path.name for path in temporary.iterdir() if path.name.startswith(("gptscale-", "torchelastic_"))]
    assert not left  # torchrun's error files and gptscale's markers went with the launch (torch's caches stay)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"gptscale: rank 1 on {socket.gethostname()} failed first "
        "(exit code 1): RuntimeError: injected failure in step 3 of rank 1"
    )
