"""``gptscale-prepare``: raw text to a sharded token dataset (webdataset tar shards of zstd token arrays).

The input files are cut into parts (``data/parts.py``); tasks, on a local process pool, a SLURM job array or Ray,
tokenize the parts into shards and publish each under a marker; a merge links them into one dataset
(``data/array.py``). Within a part, documents are read in file order and written shard after shard, so
the dataset is byte-identical for the same input and options whatever the number of tasks, the executor
or restarts. Validation documents are picked by index with a low-discrepancy sequence, so the split is
spread evenly over the corpus. Everything is written under a temporary name and renamed into place: a
crash never leaves a part or a dataset that looks complete. ``prepare_dataset`` does the same for
documents held in memory, in one part.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from gptscale.data import array
from gptscale.data.chat import FORMATS
from gptscale.data.inputs import expand_inputs
from gptscale.data.manifest import (
    FORMAT,
    MANIFEST,
    SFT_FORMAT,
    TOKENIZER,
    DataError,
    Manifest,
    check_vocab_fits,
    dtype_for_vocab,
)
from gptscale.data.parts import plan_parts
from gptscale.data.tokenize import (
    Document,
    check_splits,
    is_validation,
    text_of,
    write_splits,
)
from gptscale.data.tokenizer import TokenizerInfo, load_tokenizer, train_bpe
from gptscale.files import replace_text

log = logging.getLogger("gptscale")

__all__ = ["is_validation", "main", "parse_size", "prepare_dataset"]


def parse_size(text: str) -> int:
    """``64MB``, ``1GiB``, ``500k`` or a byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 64MB, 1GiB or 500000")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " kmgt".index(unit or " "))


# Worker side: each pool process holds the tokenizer and turns chunks of texts into compressed arrays.
def prepare_dataset(
    documents: Callable[[], Iterable[Document]],
    output: Path,
    *,
    tokenizer: Optional[str | Path] = None,
    vocab_size: Optional[int] = None,
    eod_token: Optional[str] = None,
    shard_size: int = 64_000_000,
    val_fraction: float = 0.01,
    workers: int = 1,
    dtype: str = "auto",
    tokenizer_train_chars: int = 1_000_000_000,
    inputs: Optional[list[str]] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Tokenize ``documents()`` (called once per pass over the corpus) into a dataset at ``output``.

    Documents are texts, or fine-tuning records as lists of pieces (``gptscale.data.chat``): those give
    a fine-tuning dataset whose documents carry loss masks."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise DataError(f"--output {output} exists and is not empty; remove it or pass --overwrite")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    started = time.perf_counter()

    def texts() -> Iterator[tuple[int, Document]]:
        """Non-empty documents with their index, the index that decides their split."""
        index = 0
        for text in documents():
            if text_of(text).strip():
                yield index, text
                index += 1

    if tokenizer is not None:
        info = load_tokenizer(tokenizer, eod_token)
    elif vocab_size is not None:
        info = train_bpe(
            _budget((text_of(t) for i, t in texts() if not is_validation(i, val_fraction)), tokenizer_train_chars),
            vocab_size,
            eod_token,
        )
    else:
        raise DataError("give --tokenizer FILE_OR_DIR or --vocab-size N")
    token_dtype = dtype_for_vocab(info.vocab_size) if dtype == "auto" else dtype
    check_vocab_fits(info.vocab_size, token_dtype, f"tokenizer {info.source}")

    temporary = output.parent / f".{output.name}.tmp-{os.getpid()}"
    replaced = output.parent / f".{output.name}.old-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        splits = write_splits(texts(), info, token_dtype, temporary, shard_size, val_fraction, workers, progress)
        check_splits(splits, val_fraction)
        splits = {name: shards for name, shards in splits.items() if shards}
        masked = any(shard.lengths is not None for shards in splits.values() for shard in shards)
        manifest = Manifest(
            str(output),
            info.vocab_size,
            info.eod,
            token_dtype,
            _tokenizer_entry(info),
            splits,
            SFT_FORMAT if masked else FORMAT,
        )
        (temporary / TOKENIZER).write_bytes(info.json.encode("utf-8"))
        (temporary / MANIFEST).write_text(manifest.to_json(inputs or []), encoding="utf-8")
        if output.exists():
            os.replace(output, replaced)
        os.replace(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)
    tokens = sum(s.tokens for shards in splits.values() for s in shards)
    seconds = time.perf_counter() - started
    log.info(
        "prepared %s: %d train + %d validation documents, %d tokens in %d shards, %.1fs (%.2fM tokens/s)",
        output,
        sum(s.samples for s in splits.get("train", [])),
        sum(s.samples for s in splits.get("val", [])),
        tokens,
        sum(len(v) for v in splits.values()),
        seconds,
        tokens / seconds / 1e6,
    )
    return manifest


def _budget(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """The first ``max_chars`` characters of the training documents: enough to learn merges."""
    used = 0
    for text in texts:
        if used >= max_chars:
            return
        used += len(text)
        yield text


def _tokenizer_entry(info: TokenizerInfo) -> dict:
    return {
        "file": TOKENIZER,
        "sha256": hashlib.sha256(info.json.encode("utf-8")).hexdigest(),
        "eod_token": info.eod_token,
        "source": info.source,
    }


def prepare_files(args: argparse.Namespace) -> Manifest:
    """The command line's job: plan the parts, train the tokenizer (one task) if asked, tokenize the parts
    that are not done yet on the executor, merge. Re-running the same command resumes where it stopped."""
    output: Path = args.output
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise DataError(f"--output {output} exists and is not empty; remove it or pass --overwrite")
    if not 0.0 <= args.val_fraction < 1.0:
        raise DataError(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    started = time.perf_counter()
    files = expand_inputs(args.input)
    given = load_tokenizer(args.tokenizer, args.eod_token) if args.tokenizer is not None else None
    job = {
        "format": args.data_format,
        "text_field": args.text_field,
        "chat_template": args.chat_template,
        "tokenizer": args.tokenizer,
        "vocab_size": args.vocab_size,
        "eod_token": args.eod_token,
        "tokenizer_train_chars": args.tokenizer_train_chars,
        "shard_size": args.shard_size,
        "val_fraction": args.val_fraction,
        "dtype": args.dtype,
        "part_size": args.part_size,
        "on_error": args.on_error,
        "tokenizer_sha256": given and hashlib.sha256(given.json.encode("utf-8")).hexdigest(),
    }
    parts = [part.to_dict() for part in plan_parts(files, args.part_size, args.data_format)]
    work = array.work_dir(output)
    if (work / array.PLAN).is_file():
        plan = array.load_plan(work)
        differs = [key for key in job if plan["job"].get(key) != job[key]]
        if plan["parts"] != parts:
            differs.append("inputs (files, sizes or Parquet row groups)")
        if differs and not args.overwrite:
            raise DataError(
                f"{work} holds an unfinished job with another {', '.join(differs)}; re-run it with "
                "the same options to resume, or pass --overwrite to start afresh"
            )
        if differs:
            shutil.rmtree(work)
        else:
            log.info("gptscale-prepare: resuming the job in %s", work)
    if not (work / array.PLAN).is_file():
        shutil.rmtree(work, ignore_errors=True)
        (work / "parts").mkdir(parents=True)
        replace_text(work / array.PLAN, json.dumps({"job": job, "parts": parts}) + "\n")
    slurm = {
        "partition": args.slurm_partition,
        "time": args.slurm_time,
        "cpus": args.slurm_cpus,
        "parallelism": args.slurm_parallelism,
    }
    with array.ray_connected() if args.executor == "ray" else contextlib.nullcontext():
        tokenize_parts(args, work, given, parts, slurm)
    manifest = array.merge(work, output, args.input)
    tokens = sum(s.tokens for shards in manifest.splits.values() for s in shards)
    seconds = time.perf_counter() - started
    log.info(
        "prepared %s: %d train + %d validation documents, %d tokens in %d shards, %.1fs (%.2fM tokens/s)",
        output,
        sum(s.samples for s in manifest.shards("train")),
        sum(s.samples for s in manifest.shards("val")),
        tokens,
        sum(len(v) for v in manifest.splits.values()),
        seconds,
        tokens / seconds / 1e6,
    )
    return manifest


def tokenize_parts(
    args: argparse.Namespace, work: Path, given: Optional[TokenizerInfo], parts: list[dict], slurm: dict
) -> None:
    """Train the tokenizer (one task) unless given or done, then tokenize the parts not done yet on the
    executor, reporting the progress of the whole job."""
    if not (work / TOKENIZER).is_file():
        if given is not None:
            replace_text(work / TOKENIZER, given.json)
        else:
            array.train_tokenizer_on(args.executor, work, slurm)
    info = load_tokenizer(work / TOKENIZER, args.eod_token)
    token_dtype = dtype_for_vocab(info.vocab_size) if args.dtype == "auto" else args.dtype
    check_vocab_fits(info.vocab_size, token_dtype, f"tokenizer {args.tokenizer or work / TOKENIZER}")
    plan = array.load_plan(work)
    if "dtype" not in plan:
        plan.update(
            dtype=token_dtype,
            vocab_size=info.vocab_size,
            eod=info.eod,
            eod_token=info.eod_token,
            tokenizer_sha256=hashlib.sha256(info.json.encode("utf-8")).hexdigest(),
            tokenizer_source=given.source
            if given
            else f"byte-level BPE of {args.vocab_size} trained on a sample of the input",
        )
        replace_text(work / array.PLAN, json.dumps(plan) + "\n")
    count = max(1, min(args.tasks or args.workers, len(parts)))
    runs = array.assign(parts, count)
    todo = [
        task
        for task, run in enumerate(runs)
        if not all((array.part_dir(work, index) / array.PART).is_file() for index in run)
    ]
    for task in todo:  # failures of an earlier run are retried, and no longer counted as failed
        for index in runs[task]:
            array.failed_marker(work, index).unlink(missing_ok=True)
    progress = array.Progress(work, runs, args.quiet)
    if todo and args.executor == "slurm":
        array.run_slurm(work, todo, count, slurm, progress)
    elif todo and args.executor == "ray":
        array.run_ray(work, todo, count, progress)
    elif todo:
        array.run_local(work, todo, count, max(1, args.workers), progress)
    progress.report(force=True)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="gptscale-prepare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH_OR_GLOB",
        help="text files (one document each), .jsonl or .parquet (one per row), directories, globs",
    )
    parser.add_argument("--output", required=True, type=Path, metavar="DIR")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", metavar="FILE_OR_DIR", help="a Hugging Face tokenizer.json (or its directory)")
    source.add_argument("--vocab-size", type=int, metavar="N", help="train a byte-level BPE of N tokens on the input")
    parser.add_argument(
        "--shard-size", type=parse_size, default="64MB", metavar="SIZE", help="target shard size (default 64MB)"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        metavar="F",
        help="share of documents held out for validation (default 0.01)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="tokenizer processes (default: one per CPU)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="text",
        dest="data_format",
        help="text: documents to pretrain on (default); chat: JSON lines of {messages: [{role, "
        "content}]}; prompt-completion: JSON lines of {prompt, completion}. The last two give "
        "fine-tuning data whose loss mask trains only assistant turns / completions",
    )
    parser.add_argument(
        "--chat-template",
        metavar="NAME_OR_FILE",
        help="chat template: chatml, plain or a jinja2 file (default: the tokenizer's own "
        "chat_template, else chatml; prompt-completion uses none unless given)",
    )
    parser.add_argument("--text-field", default="text", help="JSON / Parquet field holding the text (default text)")
    parser.add_argument("--eod-token", help="end-of-document token (default: the tokenizer's own, e.g. <|endoftext|>)")
    parser.add_argument(
        "--dtype",
        choices=["auto", "uint16", "uint32"],
        default="auto",
        help="token storage (default: uint16 when the vocabulary fits)",
    )
    parser.add_argument(
        "--tokenizer-train-chars",
        type=parse_size,
        default="1G",
        metavar="SIZE",
        help="characters of text the BPE learns from, from the start of the corpus (default 1G)",
    )
    parser.add_argument(
        "--part-size",
        type=parse_size,
        default="256MB",
        metavar="SIZE",
        help="input per part, the unit of work and of restart: large JSON lines files are cut at "
        "line boundaries, Parquet files at row groups (default 256MB)",
    )
    parser.add_argument(
        "--executor",
        choices=["local", "slurm", "ray"],
        default="local",
        help="local: a pool of --workers processes (default); slurm: one SLURM job array; ray: one "
        "Ray task per task, on the cluster ray.init finds (RAY_ADDRESS) or a local one",
    )
    parser.add_argument(
        "--tasks",
        type=int,
        metavar="N",
        help="tasks the parts are spread over (default: --workers); the output does not depend on it",
    )
    parser.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        default="raise",
        help="a bad line, row group or vanished file fails its part (raise, default) or is skipped and counted (skip)",
    )
    parser.add_argument("--slurm-partition", metavar="NAME", help="SLURM partition of the job array")
    parser.add_argument("--slurm-time", type=int, default=240, metavar="MINUTES", help="time limit per task")
    parser.add_argument("--slurm-cpus", type=int, default=1, metavar="N", help="CPUs per task (tokenizer threads)")
    parser.add_argument("--slurm-parallelism", type=int, default=256, metavar="N", help="array tasks running at once")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output, or an unfinished job's work with other options",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with array.hold_output(args.output):
            prepare_files(args)
    except DataError as error:
        sys.exit(f"gptscale-prepare: {error}")


if __name__ == "__main__":
    main()
