"""FP8 through torchao (emulated on CPU): the model is built with float8 linears, learns like bf16, and keeps
doing so under tensor and sequence parallelism."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, torchrun

JOB = [
    "train.steps=30",
    "train.seq_len=64",
    "parallel.micro_batch=8",
    "parallel.global_batch=8",
    "optim.lr=2e-3",
    "optim.warmup_steps=5",
    "train.precision=bf16",
    "parallel.zero=1",
    "train.log_interval=5",
    "train.eval_interval=0",
    "checkpoint.save_final=false",
    "data.embedded_max_bytes=200000",
]
FP8 = ["train.fp8=hybrid", "train.fp8_emulate=true"]

BUILD = """
import sys
from megatron.core.tensor_parallel import ColumnParallelLinear
from gptscale.config import load_config
from gptscale.model.attention import SDPAttention
from gptscale.model.fp8 import Float8ColumnParallelLinear, Float8RowParallelLinear
from gptscale.train.trainer import Trainer

trainer = Trainer(load_config(sys.argv[1:]))
chunk = trainer.model.chunks[0]
layers = chunk.decoder.layers
print("attention", {type(layer.self_attention.core_attention).__name__ for layer in layers})
print("linears", sorted({type(m).__name__ for layer in layers for m in
                         (layer.self_attention.linear_qkv, layer.self_attention.linear_proj,
                          layer.mlp.linear_fc1, layer.mlp.linear_fc2)}))
print("output", type(chunk.output_layer).__name__)
trainer.close()
"""


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def train(run_dir, overrides):
    proc = subprocess.run(
        [sys.executable, "-m", "gptscale.train", f"run_dir={run_dir}", *JOB, *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return losses(run_dir)


def built(run_dir, overrides):
    proc = subprocess.run(
        [sys.executable, "-c", BUILD, f"run_dir={run_dir}", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(
        line.split(" ", 1)
        for line in proc.stdout.splitlines()
        if line.split(" ", 1)[0] in ("attention", "linears", "output")
    )


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fp8")
    return {"bf16": train(tmp_path / "bf16", []), "fp8": train(tmp_path / "fp8", FP8)}


def test_default_model_uses_sdpa_and_fp8_swaps_only_the_layer_linears(tmp_path):
    plain = built(tmp_path, ["train.precision=bf16"])
    assert plain == {
        "attention": "{'SDPAttention'}",
        "linears": "['ColumnParallelLinear', 'RowParallelLinear']",
        "output": "ColumnParallelLinear",
    }
    fp8 = built(tmp_path, ["train.precision=bf16", *FP8])
    assert fp8["linears"] == "['Float8ColumnParallelLinear', 'Float8RowParallelLinear']"
    assert fp8["output"] == "ColumnParallelLinear"  # embedding and output layer stay bf16


def test_emulated_fp8_learns_like_bf16(one_rank):
    bf16, fp8 = one_rank["bf16"], one_rank["fp8"]
    assert len(fp8) == len(bf16) == 6
    assert fp8[-1] < fp8[0] - 1.0, fp8
    assert fp8 != bf16  # the FP8 casts change the numbers...
    for step, (a, b) in enumerate(zip(fp8, bf16)):
        assert a == pytest.approx(b, rel=0.03), (step, fp8, bf16)  # ...but not the learning


def test_fp8_under_tensor_and_sequence_parallelism(one_rank, tmp_path):
    """Column- and row-parallel float8 linears with megatron-core's gathers and reductions around them."""
    torchrun(2, ["-m", "gptscale.train", f"run_dir={tmp_path}", *JOB, *FP8, "parallel.tp=2", "parallel.sp=true"])
    tp = losses(tmp_path)
    for step, (a, b) in enumerate(zip(tp, one_rank["fp8"])):
        assert a == pytest.approx(b, rel=0.03), (step, tp, one_rank["fp8"])
