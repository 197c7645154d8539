"""gptscale-prepare: inputs of every kind, tokenizers given or trained, shards, manifest, determinism."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tokenizers import Tokenizer

from gptscale.data.manifest import MANIFEST, DataError, read_manifest
from gptscale.data.prepare import main, parse_size, prepare_dataset
from gptscale.data.shards import load_shard
from tests.datasets import number_tokenizer
from tests.helpers import REPO

TEXTS = [f"def function_{i}(x):\n    return x * {i} + {i * i}  # document {i}\n" * (1 + i % 5) for i in range(120)]


@pytest.fixture
def inputs(tmp_path):
    """The same 120 documents as text files (20), JSON lines (50) and Parquet (50), under one directory."""
    root = tmp_path / "corpus"
    (root / "text").mkdir(parents=True)
    for i, text in enumerate(TEXTS[:20]):
        (root / "text" / f"doc{i:02d}.txt").write_text(text)
    (root / "part.jsonl").write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS[20:70]))
    )
    pq.write_table(pa.table({"text": TEXTS[70:]}), root / "part.parquet")
    return root


def documents_of(directory, split="train"):
    manifest = read_manifest(str(directory))
    docs = []
    for shard in manifest.shards(split):
        loaded = load_shard(manifest.url(shard.name), shard, manifest.numpy_dtype)
        docs += [loaded.decode(i, manifest.numpy_dtype, zstandard.ZstdDecompressor()) for i in range(shard.samples)]
    return manifest, docs


def test_trained_bpe_dataset_is_complete_and_decodes_back(inputs, tmp_path):
    main(
        [
            "--input",
            str(inputs),
            "--output",
            str(tmp_path / "out"),
            "--vocab-size",
            "300",
            "--shard-size",
            "2kB",
            "--val-fraction",
            "0.1",
            "--workers",
            "2",
            "--quiet",
        ]
    )
    manifest, train = documents_of(tmp_path / "out")
    _, val = documents_of(tmp_path / "out", "val")
    assert manifest.vocab_size == 300 and manifest.dtype == "uint16" and len(manifest.shards("train")) > 3
    assert len(train) + len(val) == len(TEXTS) and 8 <= len(val) <= 16
    body = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert body["splits"]["train"]["tokens"] == sum(len(d) for d in train)
    assert {"name", "samples", "tokens", "bytes", "sha256"} <= set(body["splits"]["train"]["shards"][0])
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / manifest.tokenizer["file"]))
    assert tokenizer.token_to_id("<|endoftext|>") == manifest.eod
    decoded = sorted(tokenizer.decode(doc[:-1].tolist()) for doc in train + val)
    assert all(doc[-1] == manifest.eod for doc in train + val)
    assert decoded == sorted(TEXTS)


def test_reruns_are_byte_identical_whatever_the_workers(inputs, tmp_path):
    outputs = []
    for name, workers in (("a", "1"), ("b", "2")):
        main(
            [
                "--input",
                str(inputs / "part.jsonl"),
                str(inputs / "text" / "*.txt"),
                "--output",
                str(tmp_path / name),
                "--vocab-size",
                "280",
                "--shard-size",
                "3kB",
                "--workers",
                workers,
                "--quiet",
            ]
        )
        outputs.append({p.name: p.read_bytes() for p in (tmp_path / name).iterdir()})
    assert outputs[0] == outputs[1]
    assert not list(tmp_path.glob(".*tmp*")), "temporary outputs left behind"


def test_given_tokenizer_file_or_directory(tmp_path):
    tokenizer = number_tokenizer(tmp_path / "tokenizer.json", 70_000)
    (tmp_path / "in.txt").write_text("1 2 3 69999")
    for given in (tokenizer, tmp_path):
        out = tmp_path / f"out-{given.name}"
        prepare_dataset(lambda: ["1 2 3 69999"], out, tokenizer=given, val_fraction=0.0, progress=False)
        manifest, [doc] = documents_of(out)
        assert manifest.dtype == "uint32" and manifest.vocab_size == 70_001
        assert doc.tolist() == [1, 2, 3, 69999, 70_000]
        assert (out / "tokenizer.json").read_bytes() == tokenizer.read_bytes()


def test_vocabulary_overflowing_the_dtype_is_refused(tmp_path):
    tokenizer = number_tokenizer(tmp_path / "big.json", 70_000)
    with pytest.raises(DataError, match="70001 tokens overflows uint16"):
        prepare_dataset(lambda: ["1 2"], tmp_path / "out", tokenizer=tokenizer, dtype="uint16", progress=False)
    manifest = {
        "format": "gptscale-tokens/1",
        "vocab_size": 70001,
        "eod": 0,
        "dtype": "uint16",
        "tokenizer": {},
        "splits": {"train": {"shards": []}},
    }
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"bad/manifest.json: vocabulary of 70001 tokens overflows uint16"):
        read_manifest(str(tmp_path / "bad"))


def test_empty_input_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(SystemExit, match="no documents"):
        main(
            [
                "--input",
                str(tmp_path / "empty.jsonl"),
                str(tmp_path / "blank.txt"),
                "--output",
                str(tmp_path / "out"),
                "--vocab-size",
                "300",
                "--quiet",
            ]
        )
    with pytest.raises(SystemExit, match="nothing-here"):
        main(["--input", str(tmp_path / "nothing-here*"), "--output", str(tmp_path / "out"), "--vocab-size", "300"])
    assert not (tmp_path / "out").exists()


def test_jsonl_without_the_text_field_names_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(SystemExit, match=r"a.jsonl:2: .*--text-field"):
        main(
            ["--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "out"), "--vocab-size", "300", "--quiet"]
        )


def test_existing_output_is_kept_unless_overwrite(inputs, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(SystemExit, match="exists"):
        main(["--input", str(inputs / "part.jsonl"), "--output", str(tmp_path / "out"), "--vocab-size", "300"])
    assert (tmp_path / "out" / "keep").exists()


def test_sizes_parse():
    assert parse_size("64MB") == 64_000_000 and parse_size("1GiB") == 2**30 and parse_size("500k") == 500_000
    assert parse_size("1234") == 1234


def test_command_line_tool_wrapper(inputs, tmp_path):
    """tools/prepare_data.py as users run it from a checkout."""
    proc = subprocess.run(
        [
            sys.executable,
            "tools/prepare_data.py",
            "--input",
            str(inputs / "text"),
            "--output",
            str(tmp_path / "out"),
            "--vocab-size",
            "300",
            "--workers",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tok/s" in proc.stderr and "prepared" in proc.stderr
    assert np.dtype(read_manifest(str(tmp_path / "out")).numpy_dtype) == np.uint16


def test_a_directory_contributes_source_code_and_an_empty_one_names_what_was_looked_for(tmp_path):
    """A directory of .py files contributed nothing, and the error did not say which suffixes count."""
    from gptscale.data.inputs import expand_inputs

    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "module.py").write_text("def f():\n    return 1\n")
    (tmp_path / "code" / "image.png").write_bytes(b"\x89PNG")
    assert expand_inputs([str(tmp_path / "code")]) == [(tmp_path / "code" / "module.py").resolve()]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no input files there \(looked for .* \.jsonl .* \.py .*\.zst"):
        expand_inputs([str(tmp_path / "empty")])
