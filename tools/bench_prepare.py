"""Preparation benchmarks (issue 26): gptscale-prepare's tokenization rate against a bare ``tokenizers``
encode_batch over the same documents in the same number of processes, one tokenizer thread each; 2 local
tasks against 1; the merge of 1,000 synthetic parts.

    python tools/bench_prepare.py [--copies 4]

The corpus is the Python standard library's sources (the embedded default corpus) ``--copies`` times, as
one JSON-lines file, tokenized with a BPE of 8192 trained on it. Every process runs with
RAYON_NUM_THREADS=1. The runs are interleaved and repeated, the best of each kept. Rates count the tokens of
the dataset (end-of-document ids included) over the time from the command's start of work (after
interpreter start-up) to its published dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gptscale, installed or not

from gptscale.data import array  # noqa: E402
from gptscale.data.embedded import embedded_documents  # noqa: E402
from gptscale.data.manifest import TOKENIZER  # noqa: E402
from gptscale.data.tokenizer import train_bpe  # noqa: E402

ONE_THREAD = {
    **os.environ,
    "RAYON_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
}

BARE = """
import json, sys, time
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
texts = [json.loads(line)["text"] for line in open(sys.argv[2])]
share, rest = divmod(len(texts), int(sys.argv[4]))
first = int(sys.argv[3]) * share + min(int(sys.argv[3]), rest)
texts = texts[first:first + share + (int(sys.argv[3]) < rest)]
start, cpu, tokens, chunk, chars = time.time(), time.process_time(), 0, [], 0
for text in texts:
    chunk.append(text); chars += len(text)
    if chars >= 1 << 20:
        tokens += sum(len(e.ids) + 1 for e in tokenizer.encode_batch_fast(chunk, add_special_tokens=False))
        chunk, chars = [], 0
tokens += sum(len(e.ids) + 1 for e in tokenizer.encode_batch_fast(chunk, add_special_tokens=False))
print(tokens, start, time.time(), time.process_time() - cpu)
"""


def bare(tokenizer: Path, corpus: Path, processes: int) -> tuple[float, float]:
    """Tokens/s of ``processes`` plain encode_batch_fast loops, each over a contiguous block of the documents
    (as tasks take contiguous runs of parts: with a corpus of repeated copies, a process that sees both copies
    of a document finds its words in the tokenizer's cache), and tokens per CPU-second."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BARE, str(tokenizer), str(corpus), str(i), str(processes)],
            env=ONE_THREAD,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    results = [[float(x) for x in proc.communicate()[0].split()] for proc in procs]
    tokens = sum(r[0] for r in results)
    return tokens / (max(r[2] for r in results) - min(r[1] for r in results)), tokens / sum(r[3] for r in results)


def gptscale(tokenizer: Path, corpus: Path, output: Path, tasks: int, part_size: str) -> tuple[float, float]:
    """Tokens/s of the whole command (plan, tasks, merge), and tokens per CPU-second of the tasks' parts."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptscale.data.prepare",
            "--input",
            str(corpus),
            "--output",
            str(output),
            "--tokenizer",
            str(tokenizer),
            "--tasks",
            str(tasks),
            "--workers",
            str(tasks),
            "--part-size",
            part_size,
            "--quiet",
        ],
        env=ONE_THREAD,
        capture_output=True,
        text=True,
        check=True,
    )
    whole = float(re.search(r"\(([\d.]+)M tokens/s\)", proc.stderr).group(1)) * 1e6
    return whole, float(re.search(r"([\d.]+)M per CPU-second", proc.stderr).group(1)) * 1e6


def merge_of_synthetic_parts(root: Path, parts: int = 1000) -> float:
    """Seconds to merge ``parts`` parts of two small shards each (the merge reads no shard)."""
    work = array.work_dir(root / "merged")
    (work / "parts").mkdir(parents=True)
    tokenizer = train_bpe(["a b c"], 260)
    (work / TOKENIZER).write_text(tokenizer.json)
    job = {"val_fraction": 0.01}
    plan = {
        "job": job,
        "parts": [
            {"index": i, "path": f"/corpus/{i}.jsonl", "kind": "file", "start": 0, "stop": 0, "bytes": 1}
            for i in range(parts)
        ],
        "dtype": "uint16",
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
        "eod_token": tokenizer.eod_token,
        "tokenizer_sha256": hashlib.sha256(tokenizer.json.encode()).hexdigest(),
        "tokenizer_source": "bench",
    }
    (work / array.PLAN).write_text(json.dumps(plan))
    for part in plan["parts"]:
        directory = array.part_dir(work, part["index"])
        directory.mkdir()
        splits = {}
        for split in ("train", "val"):
            (directory / f"{split}-000000.tar").write_bytes(b"x" * 1024)
            splits[split] = [
                {"name": f"{split}-000000.tar", "samples": 1, "tokens": 100, "bytes": 1024, "sha256": "0" * 64}
            ]
        (directory / array.PART).write_text(
            json.dumps(
                {
                    "part": part,
                    "job": job,
                    "tokenizer_sha256": plan["tokenizer_sha256"],
                    "dtype": "uint16",
                    "skipped": 0,
                    "skipped_examples": [],
                    "seconds": 0.0,
                    "cpu_seconds": 0.0,
                    "splits": splits,
                }
            )
        )
    start = time.perf_counter()
    array.merge(work, root / "merged", ["/corpus"])
    return time.perf_counter() - start


def best(kept: tuple | None, new: tuple) -> tuple:
    return new if kept is None else tuple(map(max, kept, new))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4, help="copies of the stdlib corpus (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repetitions, best kept (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        documents = embedded_documents(10**9)
        (root / "bpe.json").write_text(train_bpe(documents, 8192).json)
        with open(root / "corpus.jsonl", "w") as file:
            for copy in range(args.copies):
                file.writelines(json.dumps({"text": f"# copy {copy}\n{text}"}) + "\n" for text in documents)
        chars = args.copies * sum(len(d) for d in documents)
        print(
            f"corpus: {chars / 1e6:.1f}M chars, BPE 8192, one tokenizer thread per process; uptime: "
            f"{os.getloadavg()[0]:.2f} load",
            flush=True,
        )
        rates: dict = {}
        for _ in range(args.repeat):  # interleaved, best of each: the machine's noise hits every row alike
            for processes in (1, 2):
                wall, cpu = bare(root / "bpe.json", root / "corpus.jsonl", processes)
                rates["bare", processes] = best(rates.get(("bare", processes)), (wall, cpu))
                wall, cpu = gptscale(
                    root / "bpe.json", root / "corpus.jsonl", root / f"out-{processes}", processes, "2MB"
                )
                rates["gptscale", processes] = best(rates.get(("gptscale", processes)), (wall, cpu))
                shutil.rmtree(root / f"out-{processes}")
        for processes in (1, 2):
            (bare_wall, bare_cpu), (wall, cpu) = rates["bare", processes], rates["gptscale", processes]
            print(
                f"{processes} process(es): wall: bare encode_batch {bare_wall / 1e6:.2f}M tokens/s, gptscale-prepare "
                f"{wall / 1e6:.2f}M tokens/s ({wall / bare_wall:.0%} of bare; limit 85 %); per CPU-second: bare "
                f"{bare_cpu / 1e6:.2f}M, gptscale-prepare's tasks {cpu / 1e6:.2f}M ({cpu / bare_cpu:.0%})",
                flush=True,
            )
        print(
            f"2 tasks / 1 task: {rates['gptscale', 2][0] / rates['gptscale', 1][0]:.2f}x (asked: >= 1.7x); bare 2 / 1 "
            f"processes: {rates['bare', 2][0] / rates['bare', 1][0]:.2f}x"
        )
        print(f"merge of 1,000 synthetic parts: {merge_of_synthetic_parts(root):.2f} s")


if __name__ == "__main__":
    main()
