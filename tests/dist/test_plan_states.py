"""Predicted parameter, gradient and optimizer bytes per rank equal what the engine holds after a real step."""

import json

import pytest

from tests.helpers import torchrun

COMMON = ["train.steps=1", "train.seq_len=32", "train.log_interval=1", "parallel.global_batch=4", "parallel.micro_batch=1",
          "data.embedded_max_bytes=200000", "data.embedded_vocab_size=300", "checkpoint.save_final=false"]
LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2"],
    "pp2-vpp2": ["parallel.pp=2", "parallel.vpp=2"],
    "pp2-zero1": ["parallel.pp=2", "parallel.zero=1"],
    "dp2-zero0": ["parallel.zero=0"],
    "dp2-zero1": ["parallel.zero=1"],
    "dp2-zero2": ["parallel.zero=2"],
    "dp2-zero0-bf16": ["parallel.zero=0", "train.precision=bf16"],
    "dp2-zero1-bf16": ["parallel.zero=1", "train.precision=bf16"],
}


# llama-tiny under ZeRO-1/2 in fp32 holds 128 gradient bytes per rank (32 fp32 elements) more than predicted:
# a padding rule of DeepSpeed's not yet modelled. Kept apart and strict, so it fails once it matches.
KNOWN_GRADIENT_GAP = [("llama-tiny", "dp2-zero1"), ("llama-tiny", "dp2-zero2")]
MATCHING = [(model, name) for model in ("gpt2-tiny", "llama-tiny") for name in LAYOUTS
            if (model, name) not in KNOWN_GRADIENT_GAP]


def _mismatches(tmp_path, cases):
    jobs = [[f"model={model}", f"run_dir={tmp_path}/{model}-{name}", *COMMON, *LAYOUTS[name]] for model, name in cases]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    torchrun(2, ["tests/dist/run_plan.py", str(tmp_path / "jobs.json"), str(tmp_path / "results")])
    mismatches = []
    for rank in range(2):
        for result in json.loads((tmp_path / f"results.{rank}.json").read_text()):
            assert result["held"]["parameters"] > 0
            if result["predicted"] != result["held"]:
                mismatches.append((rank, result))
    return mismatches


def test_predicted_state_bytes_equal_held_bytes(tmp_path):
    assert not _mismatches(tmp_path, MATCHING)


@pytest.mark.xfail(strict=True, reason="DeepSpeed ZeRO-1/2 fp32 gradient padding for llama-tiny not modelled")
def test_predicted_gradient_bytes_llama_zero12(tmp_path):
    assert not _mismatches(tmp_path, KNOWN_GRADIENT_GAP)
