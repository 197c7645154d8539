"""Layout parity: the same seed, data and fp32 give the same first five losses under every layout.

Each launch runs many layouts one after another (imports dominate the cost of tiny runs). Layouts named
``-eod`` reset attention and positions at document boundaries and compare with a one-rank run that does;
they read short documents (the embedded corpus cut every two lines) so most sequences hold a boundary.
Layouts named ``cp2`` split every sequence over two context-parallel ranks, with full or selective activation
checkpointing where named. Layouts named ``-epoch-end`` read a corpus of 36 sequences, so the fifth global batch ends the epoch with a
short sequence and four empty ones: the loss must stay the mean over real tokens however they are split.
Layouts named ``-yarn`` (llama-tiny only: RoPE) stretch RoPE with YaRN from an original context of 8 tokens to
the 32 trained, so every position past 8 and the attention temperature depend on the scaling; their weights
start 10x larger, or attention would be near uniform and the scaling would move the loss by only 1e-5.
"""

import pytest

from gptscale.config.layout import Layout
from gptscale.config.schema import DataConfig
from gptscale.data import build_data
from gptscale.data.embedded import embedded_documents
from gptscale.data.prepare import prepare_dataset
from tests.helpers import run_jobs

MODELS = ["gpt2-tiny", "llama-tiny"]
COMMON = [
    "train.steps=5",
    "train.seq_len=32",
    "train.eval_interval=0",
    "train.log_interval=5",
    "parallel.global_batch=8",
    "optim.warmup_steps=2",
    "optim.lr=1e-3",
    "data.embedded_max_bytes=200000",
    "data.embedded_vocab_size=300",
    "checkpoint.save_final=false",
]
SHARP = ["model.init_std=0.2"]  # attention far from uniform at the start, so positions matter to the loss
YARN = [
    *SHARP,
    "model.rope_scaling.type=yarn",
    "model.rope_scaling.factor=4",
    "model.rope_scaling.original_max_position_embeddings=8",
]
TWO_RANKS = {
    "tp2": ["parallel.tp=2"],
    "tp2-sp": ["parallel.tp=2", "parallel.sp=true"],
    "pp2": ["parallel.pp=2"],
    "pp2-vpp2": ["parallel.pp=2", "parallel.vpp=2"],
    "dp2-zero0": ["parallel.zero=0"],
    "dp2-zero1": ["parallel.zero=1"],
    "dp2-zero2": ["parallel.zero=2"],
    "dp2-zero3": ["parallel.zero=3"],
    "dp2-loader-workers": ["data.workers=2"],
    "tp2-sp-eod": ["parallel.tp=2", "parallel.sp=true", "data.reset_attention_at_eod=true"],
    "pp2-vpp2-eod": ["parallel.pp=2", "parallel.vpp=2", "data.reset_attention_at_eod=true"],
    "dp2-zero1-epoch-end": ["parallel.zero=1"],  # the second rank's last micro-batches hold no tokens
    "pp2-epoch-end": ["parallel.pp=2"],
    "cp2": ["parallel.cp=2"],
    "cp2-full-recompute-eod": [
        "parallel.cp=2",
        "train.activation_checkpointing=full",
        "data.reset_attention_at_eod=true",
    ],
    "tp2-yarn": ["parallel.tp=2", *YARN],
    "pp2-yarn": ["parallel.pp=2", *YARN],
    "cp2-yarn": ["parallel.cp=2", *YARN],
}
FOUR_RANKS = {
    "tp2-pp2": ["parallel.tp=2", "parallel.pp=2"],
    "tp2-dp2-zero1": ["parallel.tp=2", "parallel.zero=1"],
    "pp4": ["parallel.pp=4"],  # middle stages get placeholder batches
    "pp4-eod": ["parallel.pp=4", "data.reset_attention_at_eod=true"],  # every stage reads the masks
    "tp2-dp2-zero1-epoch-end": ["parallel.tp=2", "parallel.zero=1"],
    "cp2-tp2-sp": ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true"],
    "cp2-tp2-sp-eod": ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true", "data.reset_attention_at_eod=true"],
    "cp2-pp2-eod": ["parallel.cp=2", "parallel.pp=2", "data.reset_attention_at_eod=true"],
    "cp2-dp2-zero1": ["parallel.cp=2", "parallel.zero=1"],
    "cp2-dp2-zero3-selective-recompute": [
        "parallel.cp=2",
        "parallel.zero=3",
        "train.activation_checkpointing=selective",
    ],
    "cp2-tp2-sp-yarn": ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true", *YARN],
}
RTOL = 1e-4


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
    lines = [line for doc in embedded_documents(200_000) for line in doc.splitlines() if line.strip()]
    paragraphs = ["\n".join(lines[i : i + 2]) for i in range(0, len(lines), 2)]
    directory = tmp_path_factory.mktemp("paragraphs") / "data"
    prepare_dataset(lambda: paragraphs, directory, vocab_size=512, val_fraction=0.0, progress=False)
    return directory


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, short_documents):
    """Data paths by layout suffix; the others read the embedded corpus."""
    lines = [line for doc in embedded_documents(200_000) for line in doc.splitlines() if line.strip()]
    epoch_end = tmp_path_factory.mktemp("small") / "data"
    prepare_dataset(
        lambda: ["\n".join(lines[i : i + 4]) for i in range(0, 36, 4)],
        epoch_end,
        vocab_size=300,
        val_fraction=0.0,
        progress=False,
    )
    return {"-eod": short_documents, "-epoch-end": epoch_end}


def runs(layouts: dict) -> list[tuple[str, str]]:
    """(model, layout) of each run: every model, but RoPE scaling only where positions are RoPE."""
    return [(model, name) for model in MODELS for name in layouts if model != "gpt2-tiny" or "-yarn" not in name]


def jobs(layouts: dict, tmp_path, corpora, micro_batch: int = 2):
    def data(name):
        return [f"data.path={path}" for suffix, path in corpora.items() if name.endswith(suffix)]

    return [
        [
            f"model={model}",
            f"run_dir={tmp_path}/{model}-{name}",
            f"parallel.micro_batch={micro_batch}",
            *COMMON,
            *layouts[name],
            *data(name),
        ]
        for model, name in runs(layouts)
    ]


def launch(nprocs: int, layouts: dict, tmp_path, corpora) -> dict:
    """Each run's losses and gradient norms by (model, layout), all in one launch of ``nprocs`` ranks."""
    return dict(zip(runs(layouts), run_jobs(nprocs, jobs(layouts, tmp_path, corpora), tmp_path)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpora):
    """One rank: micro-batch 2 (4 accumulation steps), micro-batch 8 and micro-batch 1 (8 steps)."""
    tmp_path = tmp_path_factory.mktemp("one-rank")
    layouts = {
        "mb2": [],
        "mb8": ["parallel.micro_batch=8"],
        "mb1": ["parallel.micro_batch=1"],
        "mb2-eod": ["data.reset_attention_at_eod=true"],
        "mb2-epoch-end": [],
        "mb8-epoch-end": ["parallel.micro_batch=8"],
        "mb1-epoch-end": ["parallel.micro_batch=1"],
        "mb2-no-yarn": SHARP,  # llama-tiny as mb2-yarn without the scaling
        "mb2-yarn": YARN,
    }
    return launch(1, layouts, tmp_path, corpora)


def reference_name(layout: str) -> str:
    return "mb2" + next((suffix for suffix in ("-eod", "-epoch-end", "-yarn") if layout.endswith(suffix)), "")


def assert_close(history, expected, what):
    """Losses and gradient norms (before clipping) of every step agree with the reference."""
    for metric in ("loss", "grad_norm"):
        got_all, want_all = history[metric], expected[metric]
        assert len(got_all) == len(want_all) == 5, what
        for step, (got, want) in enumerate(zip(got_all, want_all), start=1):
            assert abs(got - want) <= RTOL * abs(want), f"{what}: step {step} {metric} {got} vs one rank {want}"


def test_losses_fall_and_differ_between_models(reference):
    """The comparison means something: training moves the loss and the two architectures differ."""
    for model in MODELS:
        losses = reference[(model, "mb2")]["loss"]
        assert losses[-1] < losses[0] - 0.1, losses
    assert reference[("gpt2-tiny", "mb2")]["loss"][0] != reference[("llama-tiny", "mb2")]["loss"][0]


def test_yarn_changes_the_losses_far_beyond_the_tolerance(reference):
    """The -yarn layouts test the scaling: without it the losses would be those of another run."""
    for metric in ("loss", "grad_norm"):
        plain, yarn = (reference[("llama-tiny", name)][metric] for name in ("mb2-no-yarn", "mb2-yarn"))
        assert max(abs(a - b) / abs(b) for a, b in zip(plain, yarn)) > 10 * RTOL, (metric, plain, yarn)


def test_eod_layouts_see_document_boundaries(short_documents):
    """Most of the first five steps' sequences cross a document boundary, so the masks are exercised."""
    layout = Layout(world_size=1, tp=1, pp=1, vpp=1, dp=1, micro_batch=8, global_batch=8)
    data = build_data(DataConfig(path=str(short_documents), reset_attention_at_eod=True), layout, 0, 32)
    batches = [next(data.train) for _ in range(5)]
    crossing = sum(int((batch["tokens"] == data.eod).any(dim=1).sum()) for batch in batches)
    assert crossing >= 20, crossing


def test_epoch_end_layouts_see_short_and_empty_sequences(corpora):
    """The fifth batch ends the epoch: real tokens per sequence differ, and some sequences have none."""
    layout = Layout(world_size=1, tp=1, pp=1, vpp=1, dp=1, micro_batch=8, global_batch=8)
    data = build_data(DataConfig(path=str(corpora["-epoch-end"])), layout, 0, 32)
    tokens = [next(data.train)["loss_mask"].sum(dim=1) for _ in range(5)]
    assert all((sequence == 32).all() for sequence in tokens[:3]), tokens
    assert (tokens[4] == 0).sum() >= 2 and (tokens[4] > 0).sum() >= 2, tokens
    assert ((tokens[3] > 0) & (tokens[3] < 32)).any() or ((tokens[4] > 0) & (tokens[4] < 32)).any(), tokens


def test_gradient_accumulation_matches_one_big_micro_batch(reference):
    for model in MODELS:
        for corpus in ("", "-epoch-end"):
            big = reference[(model, f"mb8{corpus}")]
            assert_close(reference[(model, f"mb1{corpus}")], big, f"{model}{corpus} micro-batch 1 x 8")
            assert_close(reference[(model, f"mb2{corpus}")], big, f"{model}{corpus} micro-batch 2 x 4")


def test_two_rank_layouts_match_one_rank(reference, tmp_path, corpora):
    for (model, name), history in launch(2, TWO_RANKS, tmp_path, corpora).items():
        assert_close(history, reference[(model, reference_name(name))], f"{model} {name}")


def test_four_rank_layouts_match_one_rank(reference, tmp_path, corpora):
    for (model, name), history in launch(4, FOUR_RANKS, tmp_path, corpora).items():
        assert_close(history, reference[(model, reference_name(name))], f"{model} {name}")
