"""gptscale-prepare as an array of tasks: the same dataset whatever the tasks, restarts after kill -9, bad input
failing (or skipped by) its part, a merge that refuses incomplete or foreign parts, one job per output."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from gptscale.data import array
from gptscale.data.manifest import DataError
from gptscale.data.prepare import main
from tests.datasets import number_tokenizer
from tests.helpers import REPO
from tests.unit.test_data_prepare import TEXTS, documents_of

OPTIONS = ["--vocab-size", "300", "--shard-size", "2kB", "--part-size", "1500", "--val-fraction", "0.1", "--quiet"]


@pytest.fixture
def corpus(tmp_path):
    """120 documents: text files, a JSON lines file cut into several byte ranges, Parquet of 5 row groups."""
    root = tmp_path / "corpus"
    (root / "text").mkdir(parents=True)
    for i, text in enumerate(TEXTS[:10]):
        (root / "text" / f"doc{i:02d}.txt").write_text(text)
    (root / "part.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[10:70]))
    pq.write_table(pa.table({"text": TEXTS[70:]}), root / "part.parquet", row_group_size=10)
    return root


def files_of(directory):
    return {path.name: path.read_bytes() for path in directory.iterdir()}


def prepare(corpus, output, *extra):
    main(["--input", str(corpus), "--output", str(output), *OPTIONS, *extra])


def test_one_task_and_three_tasks_give_byte_identical_datasets(corpus, tmp_path):
    prepare(corpus, tmp_path / "one", "--workers", "1", "--tasks", "1")
    prepare(corpus, tmp_path / "three", "--workers", "2", "--tasks", "3")
    (tmp_path / "three" / "stale").write_text("replaced by --overwrite")
    prepare(corpus, tmp_path / "three", "--workers", "2", "--tasks", "3", "--overwrite")
    one = files_of(tmp_path / "one")
    assert one == files_of(tmp_path / "three")
    assert not array.work_dir(tmp_path / "one").exists() and not list(tmp_path.glob(".*tmp*"))
    manifest, train = documents_of(tmp_path / "one")
    _, val = documents_of(tmp_path / "one", "val")
    tokenizer = Tokenizer.from_file(str(tmp_path / "one" / "tokenizer.json"))
    assert sorted(tokenizer.decode(doc[:-1].tolist()) for doc in train + val) == sorted(TEXTS)
    assert 6 <= len(val) <= 18 and len(manifest.shards("train")) > 5


def test_parts_cut_jsonl_at_lines_and_parquet_at_row_groups(corpus):
    from gptscale.data.inputs import expand_inputs
    from gptscale.data.parts import plan_parts

    parts = plan_parts(expand_inputs([str(corpus)]), 1500, "text")
    kinds = [part.kind for part in parts]
    assert kinds.count("lines") > 3 and kinds.count("row_groups") >= 2 and kinds.count("file") == 10
    runs = array.assign([part.to_dict() for part in parts], 3)
    assert sorted(index for run in runs for index in run) == list(range(len(parts))) and all(runs)


def run_until_a_part_is_being_written(command, work, timeout=60):
    """Start ``command`` in its own session and kill -9 the whole session while a part is half-written."""
    proc = subprocess.Popen(
        command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + timeout
    try:
        while not list((work / "parts").glob(".part-*.tmp-*/*.tar*")):
            assert proc.poll() is None, "the job ended before a part was caught half-written"
            assert time.monotonic() < deadline
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_killed_job_leaves_no_complete_looking_part_and_a_rerun_finishes_it(tmp_path):
    texts = [f"line {i} " + "lorem ipsum dolor sit amet " * (20 + i % 30) for i in range(1500)]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    options = [
        "--vocab-size",
        "300",
        "--tokenizer-train-chars",
        "50k",
        "--shard-size",
        "100kB",
        "--part-size",
        "250kB",
        "--quiet",
    ]
    command = [
        sys.executable,
        "-m",
        "gptscale.data.prepare",
        "--input",
        str(tmp_path / "big.jsonl"),
        "--output",
        str(tmp_path / "out"),
        "--workers",
        "1",
        *options,
    ]
    work = array.work_dir(tmp_path / "out")
    run_until_a_part_is_being_written(command, work)
    with pytest.raises(DataError, match=r"part \d+ \(.*big.jsonl bytes \d+-\d+\) is not done"):
        array.merge(work, tmp_path / "out", [])
    assert not (tmp_path / "out").exists()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    main(["--input", str(tmp_path / "big.jsonl"), "--output", str(tmp_path / "clean"), "--workers", "2", *options])
    assert files_of(tmp_path / "out") == files_of(tmp_path / "clean")


def bad_corpus(tmp_path, bad_line):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.txt").write_text("a fine document\n")
    (root / "b.jsonl").write_text(f'{{"text": "fine"}}\n{bad_line}\n{{"text": "also fine"}}\n')
    return root


@pytest.mark.parametrize("bad_line, reason", [("{not json", "not JSON"), ('{"body": "x"}', "no string field 'text'")])
def test_bad_jsonl_line_fails_its_part_naming_file_and_line_or_is_skipped(tmp_path, bad_line, reason):
    root = bad_corpus(tmp_path, bad_line)
    with pytest.raises(SystemExit, match=rf"part 1 \(.*b.jsonl\) failed: .*b.jsonl:2: {reason}"):
        prepare(root, tmp_path / "out", "--workers", "1")
    assert not (tmp_path / "out").exists()
    work = array.work_dir(tmp_path / "out")
    with pytest.raises(DataError, match="part 1 .* failed"):
        array.merge(work, tmp_path / "out", [])
    prepare(root, tmp_path / "skipped", "--workers", "1", "--on-error", "skip", "--val-fraction", "0")
    _, documents = documents_of(tmp_path / "skipped")
    assert len(documents) == 3  # a.txt, and b.jsonl's two fine lines


def test_corrupt_parquet_row_group_and_vanished_file_are_named(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    pq.write_table(pa.table({"text": TEXTS[:40]}), root / "c.parquet", row_group_size=10)
    (root / "d.txt").write_text("soon gone")
    metadata = pq.ParquetFile(root / "c.parquet").metadata
    data = bytearray((root / "c.parquet").read_bytes())
    offset = metadata.row_group(2).column(0).data_page_offset
    data[offset : offset + 64] = b"\xff" * 64  # the third row group's page header is garbage
    (root / "c.parquet").write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r"c.parquet: row group 2 cannot be read"):
        prepare(root, tmp_path / "out", "--workers", "1", "--part-size", "100MB")
    work = array.work_dir(tmp_path / "out")
    shutil.rmtree(work / "parts" / "part-000001")  # d.txt's part as a killed task left it: not done
    (root / "d.txt").unlink()  # planned, then gone before its task runs again
    with pytest.raises(DataError, match=r"d.txt: the input file is gone"):
        array.run_task(str(work), 0, 1)
    with pytest.raises(SystemExit, match=r"unfinished job with another inputs"):  # a re-run plans again
        prepare(root, tmp_path / "out", "--workers", "1", "--part-size", "100MB")


def test_merge_refuses_parts_of_another_tokenizer_naming_them(tmp_path):
    root = bad_corpus(tmp_path, "{not json")
    for name, vocab in (("a", "300"), ("b", "280")):
        with pytest.raises(SystemExit, match="failed"):
            main(
                [
                    "--input",
                    str(root),
                    "--output",
                    str(tmp_path / name),
                    "--vocab-size",
                    vocab,
                    "--quiet",
                    "--workers",
                    "1",
                ]
            )
    work_a, work_b = array.work_dir(tmp_path / "a"), array.work_dir(tmp_path / "b")
    shutil.rmtree(work_a / "parts" / "part-000000")
    shutil.copytree(work_b / "parts" / "part-000000", work_a / "parts" / "part-000000")
    with pytest.raises(DataError, match=r"part 0 \(.*a.txt\) was made with another vocab_size 280 \(the job's: 300\)"):
        array.merge(work_a, tmp_path / "a", [])


def test_rerun_with_other_options_is_refused(corpus, tmp_path):
    root = bad_corpus(tmp_path, "{not json")
    with pytest.raises(SystemExit, match="failed"):
        prepare(root, tmp_path / "out", "--workers", "1")
    with pytest.raises(SystemExit, match=r"unfinished job with another shard_size"):
        prepare(root, tmp_path / "out", "--workers", "1", "--shard-size", "5kB")


def test_parquet_file_without_a_footer_fails_its_part_or_is_skipped(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "e.parquet").write_bytes(b"PAR1 not really parquet")
    (root / "f.txt").write_text("a fine document")
    with pytest.raises(SystemExit, match=r"part 0 \(.*e.parquet\) failed: .*e.parquet: not a readable Parquet file"):
        prepare(root, tmp_path / "out", "--workers", "1")
    assert not (tmp_path / "out").exists()
    prepare(root, tmp_path / "skipped", "--workers", "1", "--on-error", "skip", "--val-fraction", "0")
    assert len(documents_of(tmp_path / "skipped")[1]) == 1


def test_rerun_with_a_changed_tokenizer_file_is_refused(tmp_path):
    root = bad_corpus(tmp_path, "{not json")
    tokenizer = number_tokenizer(tmp_path / "tokenizer.json", 300)
    with pytest.raises(SystemExit, match="failed"):
        main(["--input", str(root), "--output", str(tmp_path / "out"), "--tokenizer", str(tokenizer), "--quiet"])
    number_tokenizer(tokenizer, 400)  # the same path, another tokenizer
    with pytest.raises(SystemExit, match=r"unfinished job with another tokenizer_sha256"):
        main(["--input", str(root), "--output", str(tmp_path / "out"), "--tokenizer", str(tokenizer), "--quiet"])


HOLD = (
    "import sys, pathlib; from gptscale.data import array; "
    "lock = array.hold_output(pathlib.Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()"
)


def test_a_second_command_for_a_held_output_is_refused_and_a_killed_holders_lock_taken_over(corpus, tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "out")],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(
            SystemExit,
            match=rf"^gptscale-prepare: --output .*out is being prepared by another "
            rf"gptscale-prepare: pid {holder.pid} on host {socket.gethostname()}, ",
        ):
            prepare(corpus, tmp_path / "out", "--workers", "1")
        assert not array.work_dir(tmp_path / "out").exists()
    finally:
        holder.kill()
        holder.wait()
    prepare(corpus, tmp_path / "out", "--workers", "1")
    assert f"from a job that ended without releasing it: pid {holder.pid}" in caplog.text
    assert (tmp_path / "out" / "manifest.json").is_file() and (tmp_path / ".out.lock").read_text() == ""
