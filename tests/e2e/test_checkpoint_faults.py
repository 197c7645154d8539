"""Runs that go wrong: a save killed mid-write, a stop signal, too many NaN steps, damaged checkpoints.

Launches are few (imports cost more than tiny runs): the killed run and its resume, the stopped run, then
one launch for its resume, the NaN run and every damaged checkpoint, made from the killed run's last one.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from gptscale.checkpoint.manifest import data_files, describe_file
from tests.checkpoint_helpers import step_dir
from tests.faults import launch_env
from tests.helpers import REPO, free_port, torchrun
from tests.processes import MARKER, session_processes

COMMON = [
    "model=gpt2-tiny",
    "train.seq_len=32",
    "train.eval_interval=0",
    "train.log_interval=1",
    "parallel.global_batch=8",
    "parallel.micro_batch=2",
    "optim.warmup_steps=2",
    "optim.decay_steps=10",
    "data.embedded_max_bytes=200000",
]


def logged(run_dir, field="loss"):
    """(step, value) of every metrics.jsonl line that has ``field``, in order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[field]) for r in map(json.loads, lines) if field in r]


def inspect(path):
    return subprocess.run(
        [sys.executable, "tools/ckpt.py", "inspect", str(path)], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def launch_killed(args, tmp_path):
    """A launch (gptscale's torchrun) whose rank 0 is SIGKILLed in the save of step 6; returns its exit status
    and the processes of the launch still running 10 s after it ended (found by a marker in their environment,
    then killed)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        MARKER: f"killed-{tmp_path.name}",
        **launch_env([{"at": "manifest", "step": 6, "rank": 0, "signal": "SIGKILL"}], str(REPO)),
    }
    command = [
        sys.executable,
        "-m",
        "gptscale.parallel.torchrun",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        *args,
    ]
    with open(tmp_path / "killed.log", "w") as output:
        status = subprocess.run(
            command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=600
        ).returncode
    deadline = time.monotonic() + 10
    while session_processes(env[MARKER]) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = session_processes(env[MARKER])
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return status, left


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """8 steps saving every 2 on 2 ranks; rank 0 is killed in the save of step 6; then resumed."""
    tmp = tmp_path_factory.mktemp("killed")
    run, args = (
        tmp / "run",
        ["-m", "gptscale.train", f"run_dir={tmp / 'run'}", "train.steps=8", "checkpoint.interval=2", *COMMON],
    )
    status, left = launch_killed(args, tmp)
    checkpoints = run / "checkpoints"
    after_kill = {
        "status": status,
        "left": left,
        "log": (tmp / "killed.log").read_text(),
        "published": sorted(p.name for p in checkpoints.iterdir() if re.fullmatch(r"step_\d+", p.name)),
        "latest": (checkpoints / "latest").read_text().strip(),
        "unfinished": list(checkpoints.glob("step_000006.tmp-*")),
    }
    if after_kill["unfinished"]:  # kept for the assertions: the resume deletes it
        after_kill["inspect"] = inspect(after_kill["unfinished"][0])
        after_kill["copy"] = shutil.copytree(after_kill["unfinished"][0], tmp / "unfinished-copy")
    resumed = torchrun(2, args, timeout=600)
    return run, after_kill, resumed


def test_save_killed_mid_write_leaves_nothing_that_looks_complete(killed):
    run, after_kill, _ = killed
    assert after_kill["status"] != 0
    assert len(after_kill["unfinished"]) == 1
    copy = after_kill["copy"]
    assert not (copy / "checkpoint.json").exists()
    assert list((copy / "shards").glob("*.distcp")), "the kill should come after the shards were written"
    assert after_kill["published"] == ["step_000002", "step_000004"] and after_kill["latest"] == "step_000004"
    assert after_kill["inspect"].returncode == 1 and "INCOMPLETE" in after_kill["inspect"].stdout


def test_a_killed_rank_leaves_no_process_behind(killed):
    """Not the rank's checkpoint helpers either (the multiprocessing manager, the writer processes)."""
    assert killed[1]["left"] == {}


def test_the_launch_names_the_rank_that_failed_first(killed):
    assert f"gptscale: rank 0 on {socket.gethostname()} failed first (killed by SIGKILL)" in killed[1]["log"]


def test_resume_after_the_kill_picks_the_previous_complete_checkpoint(killed):
    run, _, resumed = killed
    checkpoints = run / "checkpoints"
    assert f"resumed from {checkpoints / 'step_000004'}" in resumed.stderr
    assert not list(checkpoints.glob("*.tmp-*")), "the interrupted save is cleaned up"
    assert (checkpoints / "latest").read_text().strip() == "step_000008"
    losses = logged(run)
    restart = next(i for i in range(1, len(losses)) if losses[i][0] <= losses[i - 1][0])
    first_run, second_run = dict(losses[:restart]), losses[restart:]
    assert min(first_run) == 1 and max(first_run) >= 6  # an async save is published during a later step
    assert [step for step, _ in second_run] == [5, 6, 7, 8]
    for step, loss in second_run:
        if step in first_run:
            assert loss == first_run[step], f"step {step} replayed from step 4 gives another loss"


def worker_pids(launcher_pid):
    """PIDs of a torchrun launcher's worker processes by RANK."""
    ranks = {}
    for pid in map(int, open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()):
        for entry in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
            if entry.startswith(b"RANK="):
                ranks[int(entry[5:])] = pid
    return ranks


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A long run on 2 ranks; SIGTERM reaches rank 1 only once two steps are logged."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "gptscale.train",
        f"run_dir={run}",
        "train.steps=100000",
        *COMMON,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((run / "metrics.jsonl").exists() and len(logged(run)) >= 2):
            assert launcher.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        os.kill(worker_pids(launcher.pid)[1], signal.SIGTERM)
        output, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    return run, launcher.returncode, output, logged(run)[-1][0]


def test_stop_signal_saves_and_exits_zero(stopped):
    """Every rank stops after the same step (the one signalled and the other), saves, exits 0."""
    run, status, output, stopped_at = stopped
    assert status == 0, output[-4000:]
    assert f"stop requested by signal: saving at step {stopped_at}" in output
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:06d}"


def fingerprint(directory):
    return {name: describe_file(directory / name) for name in data_files(directory)}


def fewer_layers(checkpoint, destination):
    """A weights-only checkpoint of the same model cut to 2 layers (another model shape)."""
    from gptscale.checkpoint.read import load_model_state, save_model_state

    cfg, tensors, _ = load_model_state(checkpoint)
    cfg.model.num_layers = 2
    cut = {key: t[:2].clone() if key.startswith("decoder.layers.") else t for key, t in tensors.items()}
    return save_model_state(destination, cfg, cut)


def other_norm_eps(checkpoint, destination):
    """The same weights and shapes under another norm epsilon: a model that computes something else."""
    from gptscale.checkpoint.read import load_model_state, save_model_state

    cfg, tensors, _ = load_model_state(checkpoint)
    cfg.model.norm_eps = 1e-3
    return save_model_state(destination, cfg, tensors)


@pytest.fixture(scope="module")
def small_disks(tmp_path_factory, killed):
    """Two small real filesystems (tmpfs) sized from a checkpoint of this model: ``roomy`` holds one
    checkpoint and a half; ``tight`` holds the shard files alone (more than the tensors a save counts
    before writing, less than the whole checkpoint), so its first save runs out of space while writing.
    None where mounting is not allowed."""
    tmp = tmp_path_factory.mktemp("disks")
    good = step_dir(killed[0], 8)
    whole = json.loads((good / "checkpoint.json").read_text())["bytes"]
    shards = sum(path.stat().st_size for path in (good / "shards").glob("*.distcp"))
    disks = {"roomy": (tmp / "roomy", whole * 3 // 2), "tight": (tmp / "tight", shards)}
    mounted = []
    for directory, size in disks.values():
        directory.mkdir()
        mount = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True, text=True
        )
        if mount.returncode != 0:
            break
        mounted.append(directory)
    yield {name: directory for name, (directory, _) in disks.items()} if len(mounted) == len(disks) else None
    for directory in mounted:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, killed, stopped, small_disks):
    """One launch (1 rank): the stopped run resumed, a run with too many NaN steps, damaged checkpoints,
    resume=auto past damaged ones, saves onto full disks. Returns also the launch's output (warnings)."""
    tmp = tmp_path_factory.mktemp("outcomes")
    good = step_dir(killed[0], 8)
    cases = {}
    for name in ("truncated", "corrupted", "missing"):
        shutil.copytree(killed[0], tmp / name)
        cases[name] = (step_dir(tmp / name, 8), damage(step_dir(tmp / name, 8), name))
    small = fewer_layers(good, tmp / "small" / "checkpoints" / "step_000000")
    cases["other-shape"] = (small, small / "shards" / ".metadata")
    other_eps = other_norm_eps(good, tmp / "eps" / "checkpoints" / "step_000000")
    cases["other-norm-eps"] = (other_eps, other_eps)
    before = {name: fingerprint(path.parent.parent) for name, (path, _) in cases.items()}
    shutil.copytree(killed[0], tmp / "fallback")  # step 8 corrupted, a step 7 without manifest: auto takes 6
    damage(step_dir(tmp / "fallback", 8), "corrupted")
    shutil.copytree(step_dir(tmp / "fallback", 6), step_dir(tmp / "fallback", 7))
    (step_dir(tmp / "fallback", 7) / "checkpoint.json").unlink()
    run, _, _, stopped_at = stopped
    jobs = {
        "resumed-after-stop": [*COMMON, f"run_dir={run}", f"train.steps={stopped_at + 2}"],
        "nan": [
            *COMMON,
            f"run_dir={tmp / 'nan'}",
            "train.steps=10",
            "checkpoint.interval=2",
            "test.nan_steps=[3,4,5]",
            "train.max_bad_steps=2",
            "train.bad_step_window=10",
        ],
        **{
            name: [*COMMON, f"run_dir={tmp / ('resume-' + name)}", "train.steps=10", f"checkpoint.resume={path}"]
            for name, (path, _) in cases.items()
        },
        "fallback": [*COMMON, f"run_dir={tmp / 'fallback'}", "train.steps=10"],
    }
    if small_disks:
        jobs["disk-full-before-writing"] = [
            *COMMON,
            f"run_dir={small_disks['roomy'] / 'run'}",
            "train.steps=6",
            "checkpoint.interval=2",
        ]
        jobs["disk-full-while-writing"] = [
            *COMMON,
            f"run_dir={small_disks['tight'] / 'run'}",
            "train.steps=2",
            "checkpoint.interval=2",
        ]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    launch = torchrun(1, ["tests/dist/run_outcomes.py", str(tmp / "jobs.json"), str(tmp / "results.json")], timeout=900)
    return tmp, good, cases, before, launch.stdout + launch.stderr, json.loads((tmp / "results.json").read_text())


def damage(checkpoint, how):
    """Truncate, corrupt (one byte flipped) or delete the largest shard file of ``checkpoint``; returns it."""
    shard = max((checkpoint / "shards").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    middle = len(data) // 2
    if how == "truncated":
        shard.write_bytes(data[:middle])
    elif how == "corrupted":
        shard.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    else:
        shard.unlink()
    return shard


def test_stopped_run_resumes_where_it_stopped(stopped, outcomes):
    """...here on one rank: a checkpoint loads at any layout."""
    run, _, _, stopped_at = stopped
    assert len(outcomes[-1]["resumed-after-stop"]["loss"]) == 2
    assert [step for step, _ in logged(run)][-2:] == [stopped_at + 1, stopped_at + 2]


def test_too_many_nan_steps_stop_the_run_naming_the_last_good_checkpoint(outcomes):
    tmp, results = outcomes[0], outcomes[-1]
    assert results["nan"]["error"] == (
        "TooManyBadSteps: stopping at step 5: 3 steps in the last 10 had a non-finite loss or gradient norm "
        f"(train.max_bad_steps=2); last good checkpoint: {step_dir(tmp / 'nan', 4)}"
    )
    skipped = logged(tmp / "nan", "skipped_steps")
    assert skipped == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3)]
    assert all(loss != loss for step, loss in logged(tmp / "nan") if step >= 3)  # NaN


@pytest.mark.parametrize(
    "name, expected",
    [
        ("truncated", "is truncated or damaged"),
        ("corrupted", "is corrupted: its CRC-32 differs"),
        ("missing", "is missing"),
        ("other-shape", "holds another model"),
        ("other-norm-eps", "model.norm_eps: 0.001 in the checkpoint's config.yaml, 1e-05 here"),
    ],
)
def test_bad_checkpoints_are_refused_naming_file_and_mismatch(outcomes, name, expected):
    """Named explicitly (checkpoint.resume=PATH), a damaged checkpoint is refused, never replaced."""
    tmp, _, cases, before, _, results = outcomes
    path, culprit = cases[name]
    error = results[name].get("error")
    assert error is not None, f"{name}: the resume went through"
    assert error.startswith("CheckpointError") and expected in error and str(culprit) in error, error
    if name == "other-shape":
        assert (
            "decoder.layers.self_attention.linear_qkv.weight: global shape (2, 192, 64) in the checkpoint, "
            "(4, 192, 64) in this model" in error
        )
    assert fingerprint(path.parent.parent) == before[name], "a refused checkpoint's run directory changed"
    written = tmp / f"resume-{name}" / "checkpoints"
    assert not written.exists() or not list(written.iterdir()), "nothing is written after a refusal"


def test_inspect_command(outcomes):
    _, good, cases, _, _, _ = outcomes
    report = inspect(good)
    assert report.returncode == 0 and f"{good}: complete" in report.stdout
    assert "tp1 pp1 dp2 zero0 mb" in report.stdout
    report = inspect(cases["truncated"][0])
    assert report.returncode == 1 and "DAMAGED" in report.stdout and str(cases["truncated"][1]) in report.stdout


def test_other_shape_case_is_a_real_model(outcomes):
    """The cut checkpoint keeps every key, only two layers long (so the refusal is about shape alone)."""
    from gptscale.checkpoint.read import load_model_state

    _, good, cases, _, _, _ = outcomes
    _, full, _ = load_model_state(good)
    _, cut, _ = load_model_state(cases["other-shape"][0])
    assert full.keys() == cut.keys()
    assert torch.equal(
        cut["decoder.layers.self_attention.linear_qkv.weight"],
        full["decoder.layers.self_attention.linear_qkv.weight"][:2],
    )


def test_auto_resume_skips_damaged_checkpoints_saying_which_and_why(outcomes):
    """A requeued job whose newest checkpoint is damaged resumes from the newest intact one instead of
    failing at every relaunch; a published checkpoint whose manifest was deleted counts as damaged."""
    tmp, _, _, _, output, results = outcomes
    newest, unlisted = step_dir(tmp / "fallback", 8), step_dir(tmp / "fallback", 7)
    assert len(results["fallback"].get("loss", [])) == 4, results["fallback"]  # steps 7..10, from step 6
    assert f"checkpoint.resume=auto skips a damaged checkpoint: cannot resume from {newest}:" in output
    assert f"{newest}/shards/" in output and "is corrupted: its CRC-32 differs" in output
    assert (
        f"checkpoint.resume=auto skips a damaged checkpoint: cannot resume from {unlisted}:\n  - {unlisted} is "
        "damaged: checkpoint.json is missing" in output
    )
    assert newest.is_dir() and unlisted.is_dir(), "skipped checkpoints are kept for a look"


def test_disk_full_before_writing_is_named_and_loses_nothing(outcomes, small_disks):
    if not small_disks:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN); this process may not mount")
    checkpoints = small_disks["roomy"] / "run" / "checkpoints"
    previous = step_dir(small_disks["roomy"] / "run", 2)
    needed = json.loads((previous / "checkpoint.json").read_text())["bytes"]
    error = outcomes[-1]["disk-full-before-writing"].get("error", "")
    assert error.startswith(
        f"CheckpointError: no space left on device for the checkpoint of step 4: {checkpoints} has "
    ), error
    assert f"the checkpoint needs about {needed:,} bytes" in error and f"{previous}, is intact" in error, error
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000002"]
    assert inspect(previous).returncode == 0


def test_disk_full_while_writing_is_named_and_the_half_written_save_removed(outcomes, small_disks):
    if not small_disks:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN); this process may not mount")
    checkpoints = small_disks["tight"] / "run" / "checkpoints"
    error = outcomes[-1]["disk-full-while-writing"].get("error", "")
    assert error.startswith(
        f"CheckpointError: no space left on device for the checkpoint of step 2: {checkpoints} has "
    ), error
    assert "the checkpoint needs about" in error and ".tmp-" in error and "was removed" in error, error
    assert "Worker failure" not in error
    assert list(checkpoints.iterdir()) == [], "the half-written save is left behind"


def stop_one_process(script, run_dir, tmp_path, signum=signal.SIGTERM, again=False):
    """A 1-process run (in its own process group, with its checkpoint helpers) saving every 3 steps; ``signum``
    to the whole group once step 4 is logged (a save of step 3 may still be written), and with ``again`` once
    more when the run has said it is stopping. Returns its exit status and output."""
    command = [sys.executable, *script, f"run_dir={run_dir}", "train.steps=100000", "checkpoint.interval=3", *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = tmp_path / f"{run_dir.name}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while not ((run_dir / "metrics.jsonl").exists() and any(step >= 4 for step, _ in logged(run_dir))):
            assert process.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(process.pid, signum)
        while again and "stop requested by signal" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, "the run did not start stopping"
            time.sleep(0.05)
        if again:
            os.killpg(process.pid, signum)
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, log.read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_stop_signal_to_the_process_group_saves_the_stop_step(tmp_path, signum):
    """SIGTERM as a scheduler sends it, or a first Ctrl-C, to the process group: the step is saved, exit 0."""
    run_dir = tmp_path / "run"
    status, output = stop_one_process(["-m", "gptscale.train"], run_dir, tmp_path, signum)
    assert status == 0, output[-5000:]
    stopped_at = logged(run_dir)[-1][0]
    assert f"stop requested by signal: saving at step {stopped_at}" in output
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:06d}"
    assert (step_dir(run_dir, stopped_at) / "checkpoint.json").is_file()
    assert not list((run_dir / "checkpoints").glob("*.tmp-*"))


def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    status, output = stop_one_process(["-m", "gptscale.train"], run_dir, tmp_path, signal.SIGINT, again=True)
    assert status == 130, output[-5000:]
    assert "Ctrl-C: finishing this step, saving a checkpoint and stopping (Ctrl-C again" in output
    assert "stopped by a second Ctrl-C without saving: the run resumes from its newest complete checkpoint" in output
    assert "Traceback" not in output.split("stopped by a second Ctrl-C")[0]


def test_a_stop_save_that_cannot_be_written_names_the_checkpoint_to_resume_from(tmp_path):
    run_dir = tmp_path / "run"
    status, output = stop_one_process(["tests/e2e/failing_stop_save.py"], run_dir, tmp_path)
    stopped_at = logged(run_dir)[-1][0]
    previous = step_dir(run_dir, (stopped_at - 1) // 3 * 3)  # the newest periodic save before the stop step
    assert status == 1, output[-5000:]
    assert (
        f"stop requested by signal, but the checkpoint of step {stopped_at} could not be saved (CheckpointError: "
        f"no space left on device for the checkpoint of step {stopped_at}: "
    ) in output, output[-5000:]
    assert f"is intact); the run resumes from {previous}" in output, output[-5000:]
    assert "Traceback" not in output
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == previous.name
    assert inspect(previous).returncode == 0
