"""Fine-tuning loss invariance: the same SFT batches give the same loss and gradient norm (1e-4) at one rank
with micro-batch 8 or 1 x 8, and at DP=2 (ZeRO-1), TP=2, PP=2 and CP=2, with packing on and with packing off.

Packing on and off fill a global batch with different conversations, so each mode is compared across
layouts; that a packed conversation costs what it costs alone is held in tests/unit/test_sft_loss.py."""

import pytest

from tests.dist.test_layout_parity import assert_close
from tests.helpers import run_jobs
from tests.sft.data import prepare_chat, sums, write_chat

COMMON = [
    "task=sft",
    "model=llama-tiny",
    "train.steps=5",
    "train.seq_len=64",
    "train.eval_interval=0",
    "train.log_interval=5",
    "parallel.global_batch=8",
    "optim.lr=1e-3",
    "optim.warmup_steps=1",
    "checkpoint.save_final=false",
    "checkpoint.resume=none",
]
PACKING = {"packed": ["data.packing=true"], "unpacked": ["data.packing=false"]}
ONE_RANK = {"mb8": ["parallel.micro_batch=8"], "mb1": ["parallel.micro_batch=1"]}
TWO_RANKS = {
    "dp2-zero1": ["parallel.zero=1", "parallel.micro_batch=2"],
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2", "parallel.micro_batch=2"],
    "cp2": ["parallel.cp=2", "parallel.micro_batch=2"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft-parity")
    return prepare_chat(tmp / "data", write_chat(tmp / "chat.jsonl", sums()[0], repeat=2), val_fraction=0.0)


def jobs(layouts, data, tmp_path):
    return [
        [*COMMON, f"data.path={data}", f"run_dir={tmp_path}/{name}-{mode}", *packing, *overrides]
        for mode, packing in PACKING.items()
        for name, overrides in layouts.items()
    ]


def test_sft_loss_is_the_same_at_every_layout_and_split(data, tmp_path):
    one = run_jobs(1, jobs(ONE_RANK, data, tmp_path), tmp_path)
    two = run_jobs(2, jobs(TWO_RANKS, data, tmp_path), tmp_path)
    for m, mode in enumerate(PACKING):
        reference = one[m * len(ONE_RANK)]
        assert reference["loss"][-1] < reference["loss"][0], reference
        assert_close(one[m * len(ONE_RANK) + 1], reference, f"{mode} micro-batch 1 x 8")
        for j, name in enumerate(TWO_RANKS):
            assert_close(two[m * len(TWO_RANKS) + j], reference, f"{mode} {name}")
    assert one[0]["loss"][0] != one[len(ONE_RANK)]["loss"][0], "packing on and off read different batches"
