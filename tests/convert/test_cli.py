"""gptscale-convert as users run it: outputs, the closing summary, and clear errors for bad input."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from gptscale.convert.cli import convert_main
from tests.convert.models import megatron_logits, tiny_config
from tests.convert.stand_in import StandInCheckpoints


@pytest.fixture
def checkpoints(monkeypatch):
    return StandInCheckpoints(monkeypatch)


def test_hf_and_gguf_with_summary(checkpoints, trained, tokenizer_file, tmp_path, capsys):
    cfg, state = trained("llama-tiny")
    ckpt = checkpoints.add(tmp_path / "ckpt", cfg, state, tokenizer_file)
    assert convert_main(["--checkpoint", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "M parameters" in out and "model.safetensors" in out and "f32" in out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.num_key_value_heads == 2

    assert convert_main(["--checkpoint", str(ckpt), "--to", "gguf", "--dtype", "q8_0",
                         "--out", str(tmp_path / "model.gguf")]) == 0
    assert "GGUF: llama" in capsys.readouterr().out and (tmp_path / "model.gguf").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_non_empty_output_is_refused_unless_overwrite(checkpoints, trained, tokenizer_file, tmp_path, capsys):
    cfg, state = trained("gpt2-tiny")
    ckpt = checkpoints.add(tmp_path / "ckpt", cfg, state, tokenizer_file)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    args = ["--checkpoint", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")]
    assert convert_main(args) == 2
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"
    assert convert_main(args + ["--overwrite"]) == 0
    assert not (tmp_path / "hf" / "notes.txt").exists() and (tmp_path / "hf" / "config.json").is_file()

    (tmp_path / "model.gguf").write_text("old")
    gguf = ["--checkpoint", str(ckpt), "--to", "gguf", "--out", str(tmp_path / "model.gguf")]
    assert convert_main(gguf) == 2
    assert convert_main(gguf + ["--overwrite"]) == 0 and (tmp_path / "model.gguf").stat().st_size > 1000


def test_incomplete_checkpoint_is_refused(checkpoints, trained, tokenizer_file, tmp_path, capsys):
    cfg, state = trained("llama-tiny")
    partial = {k: v for k, v in state.items() if k != "decoder.layers.mlp.linear_fc2.weight"}
    ckpt = checkpoints.add(tmp_path / "ckpt", cfg, partial, tokenizer_file)
    assert convert_main(["--checkpoint", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "missing decoder.layers.mlp.linear_fc2.weight" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()

    assert convert_main(["--checkpoint", str(tmp_path / "nothing"), "--to", "hf", "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shards_instead_of_gathered_tensors_are_refused(checkpoints, trained, tokenizer_file, tmp_path, capsys):
    """Tensors of one tensor-parallel rank (half the QKV rows) cannot be converted as a model."""
    cfg, state = trained("llama-tiny")
    sharded = dict(state)
    sharded["decoder.layers.self_attention.linear_qkv.weight"] = state[
        "decoder.layers.self_attention.linear_qkv.weight"].chunk(2, dim=1)[0]
    ckpt = checkpoints.add(tmp_path / "ckpt", cfg, sharded, tokenizer_file)
    assert convert_main(["--checkpoint", str(ckpt), "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "linear_qkv.weight has shape (4, 64, 64), expected (4, 128, 64)" in capsys.readouterr().err


def test_architecture_without_an_inference_format_is_refused(checkpoints, tokenizer_file, tmp_path, capsys):
    cfg = tiny_config("gpt2-tiny", "model.position_embedding=rope")
    ckpt = checkpoints.add(tmp_path / "ckpt", cfg, {}, tokenizer_file)
    assert convert_main(["--checkpoint", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "neither GPT-2 style" in capsys.readouterr().err


def test_q8_0_is_gguf_only(checkpoints, trained, tokenizer_file, tmp_path, capsys):
    cfg, state = trained("gpt2-tiny")
    ckpt = checkpoints.add(tmp_path / "ckpt", cfg, state, tokenizer_file)
    assert convert_main(["--checkpoint", str(ckpt), "--to", "hf", "--dtype", "q8_0", "--out", str(tmp_path)]) == 2
    assert "not a Hugging Face weight type" in capsys.readouterr().err


def test_import_from_hf_writes_a_checkpoint(checkpoints, trained, tokenizer_file, tmp_path, capsys):
    cfg, state = trained("gpt2-tiny")
    ckpt = checkpoints.add(tmp_path / "ckpt", cfg, state, tokenizer_file)
    assert convert_main(["--checkpoint", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert convert_main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported"),
                         "parallel.tp=2", "parallel.pp=2"]) == 0
    assert "resume training with checkpoint.resume=" in capsys.readouterr().out
    imported_cfg, imported, tokenizer = checkpoints.last_saved
    assert (imported_cfg.parallel.tp, imported_cfg.parallel.pp) == (2, 2)
    assert json.loads(tokenizer.read_text()) == json.loads(tokenizer_file.read_text())
    assert imported.keys() == state.keys()
    for key in state:
        if key == "embedding.word_embeddings.weight":  # padding rows are dropped on export, zero on import
            assert torch.equal(imported[key][:400], state[key][:400]) and not imported[key][400:].any()
        else:
            assert torch.equal(imported[key], state[key]), key
    tokens = torch.arange(30)[None]
    assert torch.equal(megatron_logits(imported_cfg, imported, tokens)[..., :400],
                       megatron_logits(cfg, state, tokens)[..., :400])
    assert convert_main(["--from-hf", str(tmp_path / "hf"), "--to", "gguf", "--out", str(tmp_path / "x")]) == 2
