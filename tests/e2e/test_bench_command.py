"""gptscale-bench as users run it: rows side by side, JSON records, early config errors, torchrun, host syncs.

Speed itself is not asserted (benchmarks print figures; tests check they are produced and sane).
"""

import json
import subprocess
import sys
import tempfile

import pytest

from tests.helpers import REPO, torchrun

SMALL = [
    "bench.warmup=0",
    "bench.steps=3",
    "bench.repeats=1",
    "bench.host_syncs=true",
    "train.seq_len=64",
    "parallel.micro_batch=4",
    "parallel.global_batch=8",
]
# megatron-core compares the CPU RNG state (a host tensor on every device) after each forked RNG region.
HOST_TENSOR_READS = ("megatron/core/tensor_parallel/random.py",)


def bench(args, timeout=900):
    with tempfile.TemporaryDirectory() as run_dir:
        return subprocess.run(
            [sys.executable, "-m", "gptscale.bench", f"run_dir={run_dir}", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def records(path):
    """Each config's JSON record, by its --compare overrides."""
    return {r["label"]: r for r in map(json.loads, path.read_text().splitlines())}


def device_syncs(record):
    return {site: n for site, n in record["host_syncs"].items() if not any(h in site for h in HOST_TENSOR_READS)}


@pytest.fixture(scope="module")
def attention_runs(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench") / "attention.jsonl"
    variants = [
        "model=gpt2-tiny",
        "model=gpt2-tiny model.attention=unfused",
        "model=llama-tiny",
        "model=llama-tiny model.attention=unfused",
    ]
    proc = bench([*SMALL, f"bench.output={output}", "--compare", *variants])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, records(output)


@pytest.mark.parametrize("model", ["gpt2-tiny", "llama-tiny"])
def test_sdpa_and_unfused_attention_train_identically(attention_runs, model):
    """SDPA core attention (the default) gives megatron-core's unfused attention's losses, GQA included."""
    _, runs = attention_runs
    sdpa, unfused = runs[f"model={model}"], runs[f"model={model} model.attention=unfused"]
    assert len(sdpa["losses"]) == 3
    for step, (a, b) in enumerate(zip(sdpa["losses"], unfused["losses"])):
        assert a == pytest.approx(b, rel=1e-5), (model, step, sdpa["losses"], unfused["losses"])


def test_rows_and_records(attention_runs):
    proc, runs = attention_runs
    rows = [line for line in proc.stdout.splitlines() if line.startswith("model=")]
    assert len(rows) == 4 and rows[0].rstrip().endswith("1.00x"), proc.stdout
    assert "tokens/s" in proc.stdout and "torch 2." in proc.stdout
    record = runs["model=gpt2-tiny"]
    assert record["tokens_per_s"] > 0 and record["step_time_s"] > 0 and record["peak_memory_gib"] > 0
    assert record["tokens_per_step"] == 8 * 64 and record["mfu"] is None  # CPU: no peak known
    assert record["memory_kind"].startswith("peak RSS") and record["world_size"] == 1
    assert record["tokens_per_s"] == pytest.approx(record["tokens_per_step"] / record["step_time_s"])
    loop = record["loop_host_syncs"]  # one non-log iteration of fit: the guard's read, the stop flag's all-reduce
    assert sum(loop.values()) == 2 and any("train/trainer.py" in site for site in loop), loop


def test_fp32_step_has_no_host_syncs(attention_runs):
    _, runs = attention_runs
    assert device_syncs(runs["model=gpt2-tiny"]) == {}


def test_mfu_from_a_given_peak(tmp_path):
    output = tmp_path / "peak.jsonl"
    proc = bench([*SMALL, "bench.steps=1", "train.peak_tflops=0.5", f"bench.output={output}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads(output.read_text())
    assert record["mfu"] == pytest.approx(record["tflops_per_device"] / 0.5)


def test_every_config_is_checked_before_the_first_runs():
    proc = bench(["--compare", "parallel.tp=1", "train.precision=bf16 train.fp8=hybrid"], timeout=300)
    assert proc.returncode == 2
    assert "train.fp8=hybrid needs a GPU with FP8 tensor cores" in proc.stderr
    assert "train.fp8_emulate=true" in proc.stderr
    assert "tokens/s" not in proc.stdout


def test_bad_bench_setting_names_the_field():
    proc = bench(["bench.steps=0"], timeout=300)
    assert proc.returncode == 2 and "bench.steps=0" in proc.stderr
    proc = bench(["bench.host_syncs=true", "train.log_interval=1"], timeout=300)
    assert proc.returncode == 2 and "needs train.log_interval above 1 (got 1)" in proc.stderr


def test_two_ranks_tensor_pipeline_and_data_parallel(tmp_path):
    """One torchrun launch, three layouts; fp32 TP and PP steps wait for the device nowhere, DeepSpeed's
    ZeRO only in its once-per-step check of the gradient norm."""
    output = tmp_path / "two.jsonl"
    proc = torchrun(
        2,
        [
            "-m",
            "gptscale.bench",
            f"run_dir={tmp_path}",
            *SMALL,
            f"bench.output={output}",
            "--compare",
            "parallel.tp=2",
            "parallel.pp=2",
            "parallel.zero=1",
        ],
    )
    runs = records(output)
    assert [r["layout"].split(" zero")[0] for r in runs.values()] == ["tp2 pp1 dp1", "tp1 pp2 dp1", "tp1 pp1 dp2"]
    assert all(r["world_size"] == 2 for r in runs.values())
    assert device_syncs(runs["parallel.tp=2"]) == {}
    assert device_syncs(runs["parallel.pp=2"]) == {}
    zero = device_syncs(runs["parallel.zero=1"])
    assert zero and all(site.startswith("__bool__ at deepspeed/runtime/") for site in zero), zero
    assert sum(zero.values()) <= 3, zero
    assert not any(site.startswith("synchronize") for r in runs.values() for site in r["host_syncs"])
    assert proc.stdout.count("\nparallel.") == 3, proc.stdout


def test_compiled_layers_train_identically(tmp_path):
    """train.compile=true compiles each transformer layer; the numbers stay those of eager mode (logging every
    step, which the host-sync probe once looked for a non-logging step in forever)."""
    output = tmp_path / "compile.jsonl"
    proc = bench(
        [
            *SMALL,
            "bench.steps=2",
            "bench.host_syncs=false",
            "train.log_interval=1",
            f"bench.output={output}",
            "--compare",
            "train.compile=false",
            "train.compile=true",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = [json.loads(line) for line in output.read_text().splitlines()]
    assert runs[0]["losses"] == pytest.approx(runs[1]["losses"], rel=1e-5)


def test_repeated_windows_show_the_median_and_the_spread():
    """--compare figures are the median of bench.repeats timed windows, with the slowest and fastest beside."""
    from gptscale.bench.__main__ import format_row
    from gptscale.bench.measure import BenchResult

    result = BenchResult(
        label="x",
        world_size=1,
        layout="tp1",
        tokens_per_step=1000,
        tokens_per_s=1000 / 0.2,
        tflops_per_device=0.0,
        mfu=None,
        step_time_s=0.2,
        window_step_times_s=[0.25, 0.2, 0.1],
        peak_memory_gib=1.0,
        memory_kind="max allocated",
        losses=[1.0],
    )
    row = format_row(result, result)
    assert "5,000" in row and "4,000-10,000" in row and row.rstrip().endswith("1.00x")
