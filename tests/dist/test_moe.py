"""MoE layout parity: moe-tiny (fp32, dropless, aux and z losses weighted so they matter) trains the same
first five steps at 1 rank and under expert parallelism, alone and with ZeRO, data parallelism and
gradient accumulation. Losses, router losses and gradient norms are compared."""

from tests.helpers import run_jobs

COMMON = [
    "model=moe-tiny", "train.steps=5", "train.seq_len=32", "train.log_interval=5", "parallel.global_batch=8",
    "optim.warmup_steps=2", "optim.lr=1e-3", "data.embedded_max_bytes=200000", "data.embedded_vocab_size=300",
    "checkpoint.save_final=false", "model.moe.aux_loss_coeff=1.0", "model.moe.z_loss_coeff=0.1",
]
REFERENCE = {"mb2": ["parallel.micro_batch=2"], "mb1": ["parallel.micro_batch=1"]}
TWO_RANKS = {
    "ep2": ["parallel.ep=2", "parallel.micro_batch=2"],
    "ep2-allgather": ["parallel.ep=2", "parallel.micro_batch=2", "model.moe.dispatcher=allgather"],
    "ep2-zero1": ["parallel.ep=2", "parallel.micro_batch=2", "parallel.zero=1"],
    "ep2-zero2": ["parallel.ep=2", "parallel.micro_batch=2", "parallel.zero=2"],
    "ep2-mb1": ["parallel.ep=2", "parallel.micro_batch=1"],  # four accumulation steps per rank
}
FOUR_RANKS = {
    "ep2-dp2-zero1": ["parallel.ep=2", "parallel.micro_batch=2", "parallel.zero=1"],
}
RTOL = 1e-4


def jobs(layouts, tmp_path):
    return [[f"run_dir={tmp_path}/{name}", *COMMON, *overrides] for name, overrides in layouts.items()]


def reference_for(name: str) -> str:
    return "mb1" if name.endswith("mb1") else "mb2"


def assert_close(history, expected, what):
    for metric in ("loss", "aux_loss", "grad_norm"):
        got_all, want_all = history[metric], expected[metric]
        assert len(got_all) == len(want_all) == 5, what
        for step, (got, want) in enumerate(zip(got_all, want_all), start=1):
            assert abs(got - want) <= RTOL * abs(want), f"{what}: step {step} {metric} {got} vs one rank {want}"


def test_expert_parallel_layouts_match_one_rank(tmp_path):
    reference = dict(zip(REFERENCE, run_jobs(1, jobs(REFERENCE, tmp_path / "one"), tmp_path)))
    for name in REFERENCE:  # the router losses matter and training moves the loss
        assert min(reference[name]["aux_loss"]) > 0.1, reference[name]
        assert reference[name]["loss"][-1] < reference[name]["loss"][0], reference[name]
    two = run_jobs(2, jobs(TWO_RANKS, tmp_path / "two"), tmp_path)
    four = run_jobs(4, jobs(FOUR_RANKS, tmp_path / "four"), tmp_path)
    for name, history in [*zip(TWO_RANKS, two), *zip(FOUR_RANKS, four)]:
        assert_close(history, reference[reference_for(name)], name)
