"""Data benchmarks: tokens/s of the streaming loader (one process) and of preparation.

    python tools/bench_data.py [--tokens 40e6] [--profile]

Measures, on a synthetic corpus of documents of about 2,100 Zipf-distributed uint16 tokens (text-like
compressibility): compressing and writing shards, plain webdataset reading + zstd decoding of those shards
(the raw rate to compare with), the full loader (shard and document shuffle, packing, blending, resumable
state) with and without document positions (and, for comparison, building their masks on this CPU), and
``prepare_dataset`` tokenizing the Python standard library with a BPE.
Wall-clock and process CPU rates are both printed: on a shared machine the CPU rate is the steadier one.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gptscale, installed or not

import numpy as np  # noqa: E402
import webdataset as wds  # noqa: E402
import zstandard  # noqa: E402

from gptscale.config.layout import Layout  # noqa: E402
from gptscale.data.batch import document_attention_mask  # noqa: E402
from gptscale.data.embedded import embedded_documents  # noqa: E402
from gptscale.data.loader import Source, StreamingLoader  # noqa: E402
from gptscale.data.manifest import MANIFEST, Manifest, read_manifest  # noqa: E402
from gptscale.data.prepare import prepare_dataset  # noqa: E402
from gptscale.data.shards import ShardWriter, compressor  # noqa: E402
from gptscale.data.tokenizer import train_bpe  # noqa: E402

VOCAB = 50257
SEQ_LEN = 2048


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (worker pools)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class Timer:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *_):
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def report(what: str, tokens: int, timer: Timer) -> None:
    print(
        f"{what:<58} {tokens / timer.wall / 1e6:7.2f} M tokens/s wall   {tokens / timer.cpu / 1e6:7.2f} M tokens/s CPU",
        flush=True,
    )


def synthetic_documents(total_tokens: int, seed: int) -> list[np.ndarray]:
    """Documents of 1,600-2,600 Zipf-distributed tokens, each ending with the end-of-document id 0."""
    rng = np.random.default_rng(seed)
    documents, written = [], 0
    while written < total_tokens:
        tokens = np.minimum(rng.zipf(1.3, int(rng.integers(1600, 2600))), VOCAB - 1).astype(np.uint16)
        tokens[-1] = 0
        documents.append(tokens)
        written += len(tokens)
    return documents


def write_shards(directory: Path, documents: list[np.ndarray]) -> int:
    """Compress and write ``documents`` into 64MB shards and a manifest, as gptscale-prepare does."""
    directory.mkdir(parents=True)
    zstd, shards, writer = compressor(), [], None
    for index, tokens in enumerate(documents):
        member = zstd.compress(tokens.tobytes())
        if writer is None or writer.size > 64_000_000:
            if writer is not None:
                shards.append(writer.close())
            writer = ShardWriter(directory / f"train-{len(shards):06d}.tar")
        writer.add(f"{index:09d}", member, len(tokens))
    shards.append(writer.close())
    manifest = Manifest(str(directory), VOCAB, 0, "uint16", {"file": "none", "sha256": "none"}, {"train": shards})
    (directory / MANIFEST).write_text(manifest.to_json([]))
    return sum(len(tokens) for tokens in documents)


def raw_webdataset(directory: Path) -> int:
    urls = sorted(str(p) for p in directory.glob("train-*.tar"))
    decompressor = zstandard.ZstdDecompressor()
    tokens = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        tokens += len(np.frombuffer(decompressor.decompress(sample["tokens.zst"]), dtype=np.uint16))
    return tokens


def run_loader(
    sources: list[Source],
    tokens: int,
    reset: bool,
    global_batch: int = 64,
    micro_batch: int = 8,
    build_masks: bool = False,
) -> int:
    layout = Layout(1, 1, 1, 1, 1, micro_batch, global_batch)
    loader = StreamingLoader(sources, layout, 0, SEQ_LEN, seed=1, reset_attention_at_eod=reset)
    served = 0
    while served < tokens:
        batch = next(loader)
        if build_masks:
            document_attention_mask(batch["document_ids"])
        served += batch["tokens"].numel()
    loader.state_dict()
    loader.close()
    return served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=40e6, help="synthetic corpus size in tokens")
    parser.add_argument("--profile", action="store_true", help="print the loader's top functions")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gptscale-bench-") as tmp:
        root = Path(tmp)
        documents = synthetic_documents(int(args.tokens), seed=0)
        with Timer() as timer:
            total = write_shards(root / "a", documents)
        report(f"write shards ({total / 1e6:.0f}M tokens, 64MB shards)", total, timer)
        write_shards(root / "b", synthetic_documents(int(args.tokens) // 4, seed=1))
        del documents
        with Timer() as timer:
            tokens = raw_webdataset(root / "a")
        report("raw: webdataset read + zstd decode", tokens, timer)
        one = [Source(read_manifest(str(root / "a")), "train", 1.0)]
        two = one + [Source(read_manifest(str(root / "b")), "train", 0.5)]
        budget = int(0.75 * total)
        for what, sources, reset, masks in [
            ("loader: shuffle + packing + state", one, False, False),
            ("loader: + blending 2 sources", two, False, False),
            ("loader: + document positions and ids (reset_attention_at_eod)", one, True, False),
            ("  + [b,1,s,s] masks built by torch on this CPU, as a CPU step does", one, True, True),
        ]:
            profile = cProfile.Profile() if args.profile else None
            with Timer() as timer:
                if profile:
                    profile.enable()
                served = run_loader(sources, budget if not masks else budget // 8, reset, build_masks=masks)
                if profile:
                    profile.disable()
            report(what, served, timer)
            if profile:
                pstats.Stats(profile).sort_stats("tottime").print_stats(12)

        documents = embedded_documents(10**9)
        tokenizer = train_bpe(documents, 8192)
        tokenizer_file = root / "bpe.json"
        tokenizer_file.write_text(tokenizer.json)
        for workers in (1, 2):
            with Timer() as timer:
                prepare_dataset(
                    lambda: documents,
                    root / f"prepared-{workers}",
                    tokenizer=tokenizer_file,
                    workers=workers,
                    progress=False,
                )
            tokens = read_manifest(str(root / f"prepared-{workers}"))
            tokens = sum(s.tokens for split in tokens.splits.values() for s in split)
            chars = sum(len(d) for d in documents)
            report(f"prepare: stdlib {chars / 1e6:.1f}M chars, BPE 8192, {workers} worker(s)", tokens, timer)


if __name__ == "__main__":
    main()
