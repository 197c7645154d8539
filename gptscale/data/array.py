"""Preparation as an array of tasks: each part of the input tokenized once, published with a marker, merged.

The job lives in a work directory beside the output (``.<name>.parts``): ``plan.json`` (options and
parts), ``tokenizer.json``, and per finished part a directory ``parts/part-NNNNNN`` with its shards and
``part.json``. A part is written under a temporary name and renamed into place, so the directory is the
completion marker: a killed task leaves only a temporary directory, which nothing takes for a part, and
a task that finds a part's directory skips it. Tasks are contiguous runs of parts balanced by bytes; the
parts, and so the shards, do not depend on the number of tasks, the executor (a local process pool, a SLURM
job array, Ray tasks) or restarts. The merge checks every part against the plan and hard-links the shards
into the dataset under their final names: no token is read again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, Optional

from gptscale.data.chat import load_template, read_records
from gptscale.data.manifest import (
    FORMAT,
    MANIFEST,
    SFT_FORMAT,
    TOKENIZER,
    DataError,
    Manifest,
    ShardInfo,
)
from gptscale.data.parts import Part, Skips, read_part
from gptscale.data.tokenize import Document, check_splits, is_validation, text_of, write_splits
from gptscale.data.tokenizer import TokenizerInfo, load_tokenizer, train_bpe
from gptscale.files import FileLock, replace_text

log = logging.getLogger("gptscale")

PLAN = "plan.json"
PART = "part.json"
PART_STRIDE = 1_000_003  # document index of part p's first document in the validation sequence: p * PART_STRIDE


def work_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.parts"


def hold_output(output: Path) -> FileLock:
    """The job's lock, ``.<name>.lock`` beside the output, held by the driver command for the job's life (the
    merge included): a second command for the same output is refused naming the holder, and a dead driver's lock
    is taken over. It lies outside the work directory, which the merge removes while the lock is held."""
    path = output.parent / f".{output.name}.lock"
    return FileLock.acquire(
        path,
        lambda holder: DataError(
            f"--output {output} is being prepared by another gptscale-prepare: {holder} (holds {path}); wait for it "
            "to end, or stop it first"
        ),
        f"gptscale-prepare: taking over {path} from a job that ended without releasing it",
    )


def part_dir(work: Path, index: int) -> Path:
    return work / "parts" / f"part-{index:06d}"


def failed_marker(work: Path, index: int) -> Path:
    return work / "parts" / f"part-{index:06d}.failed"


def load_plan(work: Path) -> dict:
    return json.loads((work / PLAN).read_text(encoding="utf-8"))


def assign(parts: list[dict], tasks: int) -> list[list[int]]:
    """Part indices of each task: contiguous runs holding about the same number of bytes."""
    total = sum(max(1, part["bytes"]) for part in parts)
    runs: list[list[int]] = [[] for _ in range(tasks)]
    done = 0
    for part in parts:
        runs[min(tasks - 1, done * tasks // total)].append(part["index"])
        done += max(1, part["bytes"])
    return runs


def _records(job: dict, skips: Skips) -> Optional[Callable[[Path], Iterator]]:
    if job["format"] == "text":
        return None
    template = None
    if job["format"] == "chat" or job["chat_template"]:
        template = load_template(job["chat_template"], job["tokenizer"])
    return lambda path: read_records(path, job["format"], template, skips.bad)


def _indexed(documents: Iterator[Document], part: int) -> Iterator[tuple[int, Document]]:
    """Non-empty documents numbered in the validation sequence: part ``part`` starts at its own offset."""
    index = part * PART_STRIDE
    for document in documents:
        if text_of(document).strip():
            yield index, document
            index += 1


def train_tokenizer(work: str) -> None:
    """The tokenizer task: a BPE learnt from the first training documents of every part, an equal share of
    ``tokenizer_train_chars`` each, so the sample is spread over the corpus and does not depend on tasks."""

    work_path = Path(work)
    plan = load_plan(work_path)
    job, parts = plan["job"], [Part(**part) for part in plan["parts"]]
    share = max(1, job["tokenizer_train_chars"] // len(parts))
    skips = Skips("skip")  # the sample passes over bad records; the tokenization reports them
    records = _records(job, skips)

    def sample() -> Iterator[str]:
        for part in parts:
            used = 0
            for index, document in _indexed(read_part(part, job["text_field"], records, skips), part.index):
                if used >= share:
                    break
                if not is_validation(index, job["val_fraction"]):
                    text = text_of(document)
                    used += len(text)
                    yield text

    info = train_bpe(sample(), job["vocab_size"], job["eod_token"])
    replace_text(work_path / TOKENIZER, info.json)


def run_task(work: str, task: int, tasks: int) -> None:
    """Tokenize the parts of task ``task`` of ``tasks`` that are not done yet; a part that fails is marked
    failed (with the reason) and the others still run; the task then fails naming them."""
    work_path = Path(work)
    if "SLURM_CPUS_PER_TASK" in os.environ:  # as many tokenizer threads as CPUs SLURM gave the task
        os.environ.setdefault("RAYON_NUM_THREADS", os.environ["SLURM_CPUS_PER_TASK"])
    plan = load_plan(work_path)
    failed = []
    for index in assign(plan["parts"], tasks)[task]:
        if (part_dir(work_path, index) / PART).is_file():
            continue
        try:
            _write_part(work_path, plan, Part(**plan["parts"][index]))
        except DataError as error:
            replace_text(failed_marker(work_path, index), f"{error}\n")
            failed.append(str(error))
    if failed:
        raise DataError("; ".join(failed))


def _write_part(work: Path, plan: dict, part: Part) -> None:
    job = plan["job"]
    started, cpu = time.perf_counter(), time.process_time()
    info = job_tokenizer(str(work / TOKENIZER), job["eod_token"] or plan["eod_token"], plan["tokenizer_sha256"])
    skips = Skips(job["on_error"])
    target = part_dir(work, part.index)
    temporary = target.with_name(f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        documents = read_part(part, job["text_field"], _records(job, skips), skips)
        splits = write_splits(
            _indexed(documents, part.index),
            info,
            plan["dtype"],
            temporary,
            job["shard_size"],
            job["val_fraction"],
            workers=1,
            progress=False,
        )
        body = {
            "part": part.to_dict(),
            "job": job,
            "tokenizer_sha256": plan["tokenizer_sha256"],
            "dtype": plan["dtype"],
            "skipped": skips.count,
            "skipped_examples": skips.examples,
            "seconds": round(time.perf_counter() - started, 3),
            "cpu_seconds": round(time.process_time() - cpu, 3),
            "splits": {name: [asdict(shard) for shard in shards] for name, shards in splits.items()},
        }
        (temporary / PART).write_text(json.dumps(body) + "\n", encoding="utf-8")
        try:
            os.rename(temporary, target)  # atomic; refused when another run of this part published first
        except OSError:
            if not (target / PART).is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    failed_marker(work, part.index).unlink(missing_ok=True)


@functools.lru_cache(maxsize=1)
def job_tokenizer(path: str, eod_token: str, sha256: str) -> TokenizerInfo:
    """The job's tokenizer, loaded once per process (``sha256`` keys it to the file's contents): the parts of a
    task share it, so loading is no per-part cost and its word cache stays warm from part to part."""
    return load_tokenizer(path, eod_token)


def merge(work: Path, output: Path, inputs: list[str]) -> Manifest:
    """Check every part against the plan and link their shards into one dataset at ``output``, renamed
    into place whole. Refuses, naming the parts, when one is missing, failed, altered or from another job."""
    plan = load_plan(work)
    tokenizer = (work / TOKENIZER).read_bytes()
    sha256 = hashlib.sha256(tokenizer).hexdigest()
    bodies, problems = [], []
    for part in plan["parts"]:
        directory = part_dir(work, part["index"])
        name = Part(**part).describe()
        if failed_marker(work, part["index"]).is_file():
            problems.append(f"{name} failed: {failed_marker(work, part['index']).read_text().strip()}")
            continue
        if not (directory / PART).is_file():
            problems.append(
                f"{name} is not done (its task was killed or has not run; re-run the same command to resume)"
            )
            continue
        body = json.loads((directory / PART).read_text(encoding="utf-8"))
        theirs = {
            "part": body.get("part"),
            "tokenizer sha256": body.get("tokenizer_sha256"),
            "dtype": body.get("dtype"),
            **body.get("job", {}),
        }
        ours = {"part": part, "tokenizer sha256": sha256, "dtype": plan["dtype"], **plan["job"]}
        differs = [
            f"{key} {theirs.get(key)!r} (the job's: {value!r})"
            for key, value in ours.items()
            if theirs.get(key) != value
        ]
        if differs:
            problems.append(f"{name} was made with another {', '.join(differs)} ({directory / PART})")
            continue
        for shards in body["splits"].values():
            for shard in shards:
                path = directory / shard["name"]
                size = path.stat().st_size if path.is_file() else None
                if size != shard["bytes"]:
                    problems.append(
                        f"{name}: shard {path} is {'missing' if size is None else f'{size} bytes'}, "
                        f"its part manifest says {shard['bytes']}"
                    )
        bodies.append(body)
    if problems:
        raise DataError("the merge refuses to publish a dataset:\n  " + "\n  ".join(problems))
    temporary = output.parent / f".{output.name}.tmp-{os.getpid()}"
    replaced = output.parent / f".{output.name}.old-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        splits: dict[str, list[ShardInfo]] = {"train": [], "val": []}
        for body in bodies:
            directory = part_dir(work, body["part"]["index"])
            for split, shards in body["splits"].items():
                for shard in shards:
                    info = ShardInfo(**{**shard, "name": f"{split}-{len(splits[split]):06d}.tar"})
                    try:
                        os.link(directory / shard["name"], temporary / info.name)
                    except OSError:  # a file system without hard links: copy (the only read of a token)
                        shutil.copyfile(directory / shard["name"], temporary / info.name)
                    splits[split].append(info)
        check_splits(splits, plan["job"]["val_fraction"])
        splits = {name: shards for name, shards in splits.items() if shards}
        masked = any(shard.lengths is not None for shards in splits.values() for shard in shards)
        manifest = Manifest(
            str(output),
            plan["vocab_size"],
            plan["eod"],
            plan["dtype"],
            {"file": TOKENIZER, "sha256": sha256, "eod_token": plan["eod_token"], "source": plan["tokenizer_source"]},
            splits,
            SFT_FORMAT if masked else FORMAT,
        )
        (temporary / TOKENIZER).write_bytes(tokenizer)
        (temporary / MANIFEST).write_text(manifest.to_json(inputs), encoding="utf-8")
        if output.exists():  # --overwrite
            os.replace(output, replaced)
        os.replace(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)
    tokens = sum(shard.tokens for shards in splits.values() for shard in shards)
    seconds, cpu = (sum(body[key] for body in bodies) for key in ("seconds", "cpu_seconds"))
    log.info(
        "gptscale-prepare: merged %d parts; a task tokenized %.2fM tokens/s (%.2fM per CPU-second; the "
        "parts' own time)",
        len(bodies),
        tokens / max(seconds, 1e-9) / 1e6,
        tokens / max(cpu, 1e-9) / 1e6,
    )
    skipped = sum(body["skipped"] for body in bodies)
    if skipped:
        examples = [example for body in bodies for example in body["skipped_examples"]][:5]
        log.warning(
            "skipped %d bad lines, row groups or files (--on-error skip), e.g.:\n  %s", skipped, "\n  ".join(examples)
        )
    shutil.rmtree(work)
    return manifest


class Progress:
    """Tasks done / running / failed and tokens/s of the whole job, read from the work directory."""

    def __init__(self, work: Path, runs: list[list[int]], quiet: bool):
        self.work, self.runs, self.quiet = work, runs, quiet
        self.started = time.perf_counter()
        self.tokens: dict[int, int] = {}
        self.last = 0.0

    def counts(self) -> tuple[int, int, int]:
        for run in self.runs:
            for index in run:
                if index not in self.tokens and (part_dir(self.work, index) / PART).is_file():
                    body = json.loads((part_dir(self.work, index) / PART).read_text(encoding="utf-8"))
                    self.tokens[index] = sum(s["tokens"] for shards in body["splits"].values() for s in shards)
        done = sum(all(index in self.tokens for index in run) for run in self.runs)
        failed = sum(any(failed_marker(self.work, index).is_file() for index in run) for run in self.runs)
        return done, failed, sum(self.tokens.values())

    def report(self, force: bool = False) -> None:
        if self.quiet or (not force and time.perf_counter() - self.last < 2.0):
            return
        self.last = time.perf_counter()
        done, failed, tokens = self.counts()
        seconds = max(1e-9, time.perf_counter() - self.started)
        log.info(
            "gptscale-prepare: tasks %d done, %d running, %d failed of %d; parts %d/%d; %.2fM tokens, %.2fM tok/s",
            done,
            len(self.runs) - done - failed,
            failed,
            len(self.runs),
            len(self.tokens),
            sum(len(run) for run in self.runs),
            tokens / 1e6,
            tokens / seconds / 1e6,
        )


def run_local(work: Path, tasks: list[int], count: int, workers: int, progress: Progress) -> None:
    """Tasks in a pool of ``workers`` processes, one tokenizer thread each; in this process when one."""
    if workers == 1 or len(tasks) == 1:
        for task in tasks:
            try:
                run_task(str(work), task, count)
            except DataError:
                pass  # its failed parts are marked; the merge names them
            progress.report()
        return
    saved = {name: os.environ.get(name) for name in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    os.environ.update(RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    try:
        # Forked, not spawned: a child starts with this process's imports (webdataset pulls in torch, seconds).
        # The tokenizer runs serially there, as the variables above ask and tokenizers does in forked children.
        with concurrent.futures.ProcessPoolExecutor(
            min(workers, len(tasks)), mp_context=multiprocessing.get_context("fork")
        ) as pool:
            futures = [pool.submit(run_task, str(work), task, count) for task in tasks]
            while concurrent.futures.wait(futures, timeout=0.5).not_done:
                progress.report()
            for task, future in zip(tasks, futures):
                if future.exception() is not None and not isinstance(future.exception(), DataError):
                    raise DataError(
                        f"task {task} of {count} ended with {future.exception()!r}; re-run the same command to resume"
                    )
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def slurm_executor(work: Path, options: dict):
    import submitit

    executor = submitit.AutoExecutor(folder=work / "slurm", cluster="slurm")
    executor.update_parameters(
        name="gptscale-prepare",
        timeout_min=options["time"],
        cpus_per_task=options["cpus"],
        slurm_array_parallelism=options["parallelism"],
        **({"slurm_partition": options["partition"]} if options["partition"] else {}),
    )
    return executor


def run_slurm(work: Path, tasks: list[int], count: int, options: dict, progress: Progress) -> None:
    """One SLURM job array (submitit), one array task per task; waits, reporting progress."""
    executor = slurm_executor(work, options)
    jobs = executor.map_array(run_task, [str(work)] * len(tasks), tasks, [count] * len(tasks))
    log.info(
        "gptscale-prepare: submitted SLURM job array %s (%d tasks); logs in %s",
        jobs[0].job_id.split("_")[0],
        len(jobs),
        work / "slurm",
    )
    while not all(job.done() for job in jobs):
        progress.report()
        time.sleep(1)


@contextlib.contextmanager
def ray_connected() -> Iterator[None]:
    """Ray for the command's life: the cluster ``ray.init`` finds (``RAY_ADDRESS``, or one ``ray start`` began on
    this machine), else a local one started here and stopped at the end. The work directory must be on a file
    system every node shares, as for SLURM."""
    try:
        import ray
    except ImportError:
        raise DataError("--executor ray needs Ray: pip install 'gptscale[ray]'") from None
    ray.init()
    try:
        yield
    finally:
        ray.shutdown()


def _ray_cause(error: Exception) -> BaseException:
    """The exception a Ray task raised, rather than Ray's wrapper (which carries its traceback)."""
    import ray

    return error.cause if isinstance(error, ray.exceptions.RayTaskError) else error


def run_ray(work: Path, tasks: list[int], count: int, progress: Progress) -> None:
    """One Ray task per task, each given one CPU and running one tokenizer thread; waits, reporting progress.
    Ray runs a task again when its worker or node dies; a finished part is not redone."""
    import ray

    remote = ray.remote(num_cpus=1, runtime_env={"env_vars": {"RAYON_NUM_THREADS": "1"}})(run_task)
    refs = [
        remote.options(name=f"gptscale-prepare task {task}").remote(str(work.resolve()), task, count) for task in tasks
    ]
    log.info("gptscale-prepare: %d Ray tasks on a cluster of %d CPUs", len(refs), ray.cluster_resources().get("CPU", 0))
    pending = refs
    while pending:
        pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)[1]
        progress.report()
    for task, ref in zip(tasks, refs):
        try:
            ray.get(ref)
        except ray.exceptions.RayError as error:
            if not isinstance(_ray_cause(error), DataError):  # its failed parts are marked; the merge names them
                raise DataError(
                    f"task {task} of {count} ended with {_ray_cause(error)!r}; re-run the same command to resume"
                ) from None


def train_tokenizer_on(executor: str, work: Path, options: dict) -> None:
    """The tokenizer task, run once before the tokenization: here, as one SLURM job or as one Ray task."""
    if executor == "local":
        train_tokenizer(str(work))
        return
    if executor == "ray":
        import ray

        log.info("gptscale-prepare: training the tokenizer in a Ray task")
        try:
            ray.get(
                ray.remote(num_cpus=1)(train_tokenizer)
                .options(name="gptscale-prepare tokenizer")
                .remote(str(work.resolve()))
            )
        except ray.exceptions.RayError as error:
            raise DataError(f"the tokenizer task failed: {_ray_cause(error)}") from None
        return
    job = slurm_executor(work, options).submit(train_tokenizer, str(work))
    log.info("gptscale-prepare: training the tokenizer in SLURM job %s", job.job_id)
    try:
        job.result()
    except Exception as error:  # submitit's FailedJobError: the job's traceback, whose last line is the error
        lines = str(error).strip().splitlines() or ["no message"]
        raise DataError(f"the tokenizer job {job.job_id} failed: {lines[-1]} (log: {work / 'slurm'})") from None
