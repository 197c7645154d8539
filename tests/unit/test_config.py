"""Configuration: presets compose, typos fail with the key's name, impossible layouts fail naming fields."""

import pytest
from hydra.errors import ConfigCompositionException

from gptscale.config import ConfigError, check, load_config
from gptscale.config.schema import Activation, Normalization, PositionEmbedding

PRESETS = [
    "gpt2-tiny",
    "gpt2-124m",
    "gpt2-350m",
    "gpt2-774m",
    "gpt2-1.5b",
    "gpt3-1.3b",
    "gpt3-2.7b",
    "gpt3-6.7b",
    "gpt3-13b",
    "gpt3-175b",
    "llama-tiny",
    "llama-1b",
    "llama-7b",
    "llama-70b",
]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_fits_one_rank(preset):
    cfg = load_config([f"model={preset}"])
    assert cfg.model.name == preset
    assert check(cfg, world_size=1).dp == 1


def test_published_shapes():
    gpt2 = load_config(["model=gpt2-124m"]).model
    assert (gpt2.num_layers, gpt2.hidden_size, gpt2.num_attention_heads) == (12, 768, 12)
    assert gpt2.tie_embeddings and gpt2.position_embedding == PositionEmbedding.learned
    llama = load_config(["model=llama-70b"]).model
    assert (llama.num_layers, llama.hidden_size, llama.num_query_groups, llama.ffn_hidden_size) == (80, 8192, 8, 28672)
    assert llama.normalization == Normalization.RMSNorm and llama.activation == Activation.swiglu
    assert not llama.tie_embeddings and not llama.bias


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigCompositionException, match="train.stpes"):
        load_config(["train.stpes=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("+train.stpes=3", "train.stpes: unknown key (did you mean train.steps"),
        ("+train.spike.zscor=2", "train.spike.zscor: unknown key (did you mean train.spike.zscore?)"),
        ("+zzz=1", "zzz: unknown key (known keys here: run_dir, model,"),
    ],
)
def test_added_unknown_key_names_it_and_the_nearest_known_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config([override])
    assert message in str(error.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException, match="parallel.tp"):
        load_config(["parallel.tp=two"])


def test_unknown_choice_lists_the_choices():
    with pytest.raises(ConfigCompositionException, match="precision"):
        load_config(["train.precision=fp8x"])


BAD_LAYOUTS = [
    (["parallel.tp=2"], 3, ["world size 3", "parallel.tp", "parallel.pp"]),
    (["model=gpt2-tiny", "parallel.tp=8"], 8, ["model.num_attention_heads=4", "parallel.tp=8"]),
    (["model=llama-tiny", "parallel.tp=4"], 4, ["model.num_query_groups=2", "parallel.tp=4"]),
    (["parallel.pp=3"], 3, ["model.num_layers=4", "parallel.pp"]),
    (["parallel.pp=2", "parallel.vpp=4"], 2, ["model.num_layers=4", "parallel.vpp"]),
    (["parallel.global_batch=10", "parallel.micro_batch=4"], 1, ["parallel.global_batch=10", "parallel.micro_batch"]),
    (["parallel.zero=2", "parallel.pp=2"], 2, ["parallel.zero=2", "parallel.pp=2"]),
    (["parallel.zero=3", "parallel.pp=2"], 4, ["parallel.zero=3"]),
    (["parallel.sp=true"], 1, ["parallel.sp", "parallel.tp"]),
    (["parallel.zero=4"], 1, ["parallel.zero=4"]),
    (["train.seq_len=2048"], 1, ["train.seq_len=2048", "model.max_position_embeddings"]),
    (
        ["model.rope_scaling.type=yarn"],
        1,
        [
            "model.rope_scaling.type=yarn",
            "model.position_embedding=rope",
            "original_max_position_embeddings=8192",
            "max_position_embeddings=1024",
        ],
    ),
    (
        [
            "model=llama-tiny",
            "model.rope_scaling.type=llama3",
            "model.rope_scaling.original_max_position_embeddings=512",
            "model.rope_scaling.low_freq_factor=4",
        ],
        1,
        ["model.rope_scaling.low_freq_factor=4.0", "high_freq_factor=4.0"],
    ),
    (
        [
            "model=llama-tiny",
            "model.rope_scaling.type=yarn",
            "model.rope_scaling.original_max_position_embeddings=512",
            "model.rope_scaling.beta_slow=64",
        ],
        1,
        ["model.rope_scaling.beta_slow=64.0", "beta_fast=32.0"],
    ),
    (["model.rope_scaling.factor=0.5"], 1, ["model.rope_scaling.factor=0.5 must be at least 1"]),
    (["parallel.cp=2"], 3, ["world size 3", "parallel.cp"]),
    (["parallel.cp=2", "train.seq_len=30"], 2, ["train.seq_len=30", "2 * parallel.cp = 4"]),
    (
        ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true", "train.seq_len=36"],
        4,
        ["train.seq_len=36", "2 * parallel.cp * parallel.tp = 8"],
    ),
    (["parallel.cp=2", "model.attention=unfused"], 2, ["parallel.cp=2", "model.attention=sdpa"]),
    (["parallel.cp=2", "model.attention_dropout=0.1"], 2, ["parallel.cp=2", "model.attention_dropout=0.1"]),
    (["model=moe-tiny", "parallel.cp=2", "parallel.ep=2"], 2, ["parallel.ep=2", "data-parallel size 1"]),
]


@pytest.mark.parametrize("overrides,world_size,fields", BAD_LAYOUTS)
def test_impossible_layouts_name_their_fields(overrides, world_size, fields):
    cfg = load_config(overrides)
    with pytest.raises(ConfigError) as error:
        check(cfg, world_size)
    for field in fields:
        assert field in str(error.value), (field, str(error.value))


def test_every_problem_is_reported_at_once():
    cfg = load_config(["parallel.tp=3", "parallel.sp=true", "parallel.zero=3", "parallel.pp=2"])
    message = str(pytest.raises(ConfigError, check, cfg, 12).value)
    assert "parallel.zero=3" in message and "model.num_attention_heads=4" in message


def test_layout_arithmetic():
    cfg = load_config(["parallel.tp=2", "parallel.pp=2", "parallel.micro_batch=2", "parallel.global_batch=16"])
    layout = check(cfg, world_size=8)
    assert (layout.tp, layout.pp, layout.dp, layout.num_microbatches) == (2, 2, 2, 4)
    layout = check(load_config(["parallel.cp=2", "parallel.tp=2", "parallel.global_batch=16"]), world_size=8)
    assert (layout.cp, layout.dp, layout.expert_dp, layout.describe()) == (2, 2, 4, "tp2 cp2 pp1 dp2 zero0 mb4x2")


def test_every_out_of_range_number_is_refused_at_once_with_its_field_and_value():
    """Values that used to crash late (ZeroDivisionError at the first log line or evaluation, an empty model)
    or train silently wrong are refused by check(), all in one message."""
    cfg = load_config(
        [
            "train.log_interval=0",
            "train.eval_batches=0",
            "model.hidden_size=0",
            "optim.lr=-1e-3",
            "optim.betas=[0.9,1.0]",
            "model.hidden_dropout=1.5",
            "checkpoint.keep_last=-1",
            "optim.warmup_steps=-5",
            "model.num_attention_heads=0",
            "train.seq_len=0",
            "train.straggler.factor=0.8",
        ]
    )
    message = str(pytest.raises(ConfigError, check, cfg, 1).value)
    for expected in [
        "train.log_interval=0 must be positive",
        "train.eval_batches=0 must be positive",
        "model.hidden_size=0 must be positive",
        "optim.lr=-0.001 must not be negative",
        "optim.betas[1]=1.0 must be in [0, 1)",
        "model.hidden_dropout=1.5 must be in [0, 1)",
        "checkpoint.keep_last=-1 must not be negative",
        "optim.warmup_steps=-5 must not be negative",
        "model.num_attention_heads=0 must be positive",
        "train.seq_len=0 must be positive",
        "optim.min_lr=0.0001 must not exceed optim.lr=-0.001",
        "train.straggler.factor=0.8 must be 0 (off) or above 1",
    ]:
        assert expected in message, (expected, message)


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=0",
        "optim.min_lr=0",
        "train.eval_interval=0",
        "train.steps=0",
        "checkpoint.keep_last=0",
        "optim.grad_clip=0",
        "optim.betas=[0.0,0.999]",
        "train.straggler.factor=0",
    ],
)
def test_boundary_values_that_mean_something_are_accepted(override):
    cfg = load_config([override, "optim.min_lr=0"] if override == "optim.lr=0" else [override])
    check(cfg, 1)


def test_each_list_item_is_checked_by_name():
    cfg = load_config(["data.sources=[{path: a, weight: 1.0}, {path: b, weight: 0.0}]"])
    message = str(pytest.raises(ConfigError, check, cfg, 1).value)
    assert "data.sources[1].weight=0.0 must be positive" in message and "sources[0]" not in message


def test_the_schema_is_the_one_source_of_defaults():
    """A config built in code (``Config()``) is the command line's default job: conf/ sets no default of its
    own, only presets (model=, optim=, task=) choose values."""
    import dataclasses

    from gptscale.config.schema import Config

    def differences(code, composed, prefix=""):
        for f in dataclasses.fields(code):
            mine, theirs = getattr(code, f.name), getattr(composed, f.name)
            if dataclasses.is_dataclass(mine):
                yield from differences(mine, theirs, f"{prefix}{f.name}.")
            elif mine != theirs:
                yield f"{prefix}{f.name}: {mine!r} in the schema, {theirs!r} on the command line"

    composed = load_config([])
    found = [d for d in differences(Config(), composed) if not d.startswith(("run_dir:", "model.ffn_hidden_size:"))]
    assert found == []
    assert composed.run_dir == "runs/gpt2-tiny"  # the schema's runs/${model.name}, resolved
    assert composed.model.ffn_size == Config().model.ffn_size  # the preset spells out what null means


def test_help_page_names_every_key_with_its_default_and_meaning():
    """``gptscale-train --help``: every leaf key of the schema, its default and the schema's comment on it."""
    import dataclasses

    from gptscale.config.help import help_page
    from gptscale.config.schema import Config

    def leaves(node, prefix=""):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            yield from leaves(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]

    cfg = load_config([])
    page = help_page(cfg).splitlines()
    for key in leaves(Config()):
        line = next((row for row in page if row.strip().startswith(f"{key}=")), None)
        assert line is not None, key
        assert len(line.split(None, 1)) == 2, f"{key} has no meaning in schema.py"
    assert "  train.steps=600" in "\n".join(page)
    assert any(row.startswith("  model=") and "llama-7b" in row for row in page)


def test_named_models_train_with_their_papers_recipe_and_tiny_ones_stay_fast():
    llama = load_config(["model=llama-7b"])
    assert (llama.train.seq_len, llama.parallel.global_batch, llama.optim.lr, llama.train.precision.value) == (
        4096,
        1024,
        3e-4,
        "bf16",
    )
    gpt3 = load_config(["model=gpt3-175b"])
    assert gpt3.parallel.global_batch * gpt3.train.seq_len == 1536 * 2048 and gpt3.optim.lr == 6e-5
    assert load_config(["model=llama-7b", "recipe=none"]).train.seq_len == 128
    assert load_config(["model=llama-7b", "train.seq_len=512"]).train.seq_len == 512  # the command line wins
    tiny = load_config(["model=gpt2-tiny"])
    assert (tiny.train.seq_len, tiny.parallel.global_batch, tiny.train.precision.value) == (128, 16, "fp32")
