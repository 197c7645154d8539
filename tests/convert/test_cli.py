"""gptscale-convert as users run it, on checkpoints written by the checkpoint subsystem's
``save_model_state``: outputs, the closing summary, and clear errors for bad input."""

import json
import shlex
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from gptscale.checkpoint.read import load_model_state, save_model_state
from gptscale.convert.cli import convert_main
from tests.convert.models import megatron_logits, tiny_config
from tests.helpers import REPO


def test_hf_and_gguf_with_summary(trained, tokenizer_file, tmp_path, capsys):
    cfg, state = trained("llama-tiny")
    ckpt = save_model_state(tmp_path / "ckpt", cfg, state, tokenizer_file)
    assert convert_main(["--checkpoint", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "M parameters" in out and "model.safetensors" in out and "f32" in out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.num_key_value_heads == 2

    assert (
        convert_main(
            ["--checkpoint", str(ckpt), "--to", "gguf", "--dtype", "q8_0", "--out", str(tmp_path / "model.gguf")]
        )
        == 0
    )
    assert "GGUF: llama" in capsys.readouterr().out and (tmp_path / "model.gguf").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_the_command_line_tool_runs_from_a_source_checkout(trained, tokenizer_file, tmp_path):
    cfg, state = trained("gpt2-tiny")
    ckpt = save_model_state(tmp_path / "ckpt", cfg, state, tokenizer_file)
    proc = subprocess.run(
        [
            sys.executable,
            "tools/convert_checkpoint.py",
            "--checkpoint",
            str(ckpt),
            "--to",
            "hf",
            "--out",
            str(tmp_path / "hf"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "GPT2LMHeadModel" in proc.stdout and (tmp_path / "hf" / "model.safetensors").is_file()
    assert "INFO" not in proc.stderr  # megatron-core's import notices are not the user's business


def test_non_empty_output_is_refused_unless_overwrite(trained, tokenizer_file, tmp_path, capsys):
    cfg, state = trained("gpt2-tiny")
    ckpt = save_model_state(tmp_path / "ckpt", cfg, state, tokenizer_file)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    args = ["--checkpoint", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")]
    assert convert_main(args) == 2
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert convert_main(args + ["--overwrite"]) == 2  # not an export: --overwrite replaces only a previous one
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"
    (tmp_path / "hf" / "notes.txt").unlink()
    assert convert_main(args) == 0
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    assert convert_main(args + ["--overwrite"]) == 0
    assert not (tmp_path / "hf" / "notes.txt").exists() and (tmp_path / "hf" / "config.json").is_file()

    gguf = ["--checkpoint", str(ckpt), "--to", "gguf", "--out", str(tmp_path / "model.gguf")]
    assert convert_main(gguf) == 0
    size = (tmp_path / "model.gguf").stat().st_size
    assert convert_main(gguf) == 2
    assert convert_main(gguf + ["--overwrite", "--dtype", "q8_0"]) == 0
    assert 1000 < (tmp_path / "model.gguf").stat().st_size < size


def test_incomplete_checkpoint_is_refused(trained, tokenizer_file, tmp_path, capsys):
    """What the checkpoint reader finds (no manifest, a truncated shard, no checkpoint at all) and what the
    converter finds (a tensor missing) are refused with the file and the problem named, and nothing is written."""
    cfg, state = trained("llama-tiny")
    hf = ["--to", "hf", "--out", str(tmp_path / "hf")]
    unfinished = save_model_state(tmp_path / "unfinished", cfg, state, tokenizer_file)
    (unfinished / "checkpoint.json").unlink()
    assert convert_main(["--checkpoint", str(unfinished), *hf]) == 2
    assert "checkpoint.json is missing (the save did not finish)" in capsys.readouterr().err

    truncated = save_model_state(tmp_path / "truncated", cfg, state, tokenizer_file)
    shard = truncated / "shards" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert convert_main(["--checkpoint", str(truncated), "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert f"{shard} is truncated or damaged: 1000 bytes" in capsys.readouterr().err

    partial = {k: v for k, v in state.items() if k != "decoder.layers.mlp.linear_fc2.weight"}
    ckpt = save_model_state(tmp_path / "partial", cfg, partial, tokenizer_file)
    assert convert_main(["--checkpoint", str(ckpt), *hf]) == 2
    assert "missing decoder.layers.mlp.linear_fc2.weight" in capsys.readouterr().err

    assert convert_main(["--checkpoint", str(tmp_path / "nothing"), *hf]) == 2
    assert "nothing: no such checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists()


def test_shards_instead_of_gathered_tensors_are_refused(trained, tokenizer_file, tmp_path, capsys):
    """Tensors of one tensor-parallel rank (half the QKV rows) cannot be converted as a model."""
    cfg, state = trained("llama-tiny")
    sharded = dict(state)
    sharded["decoder.layers.self_attention.linear_qkv.weight"] = state[
        "decoder.layers.self_attention.linear_qkv.weight"
    ].chunk(2, dim=1)[0]
    ckpt = save_model_state(tmp_path / "ckpt", cfg, sharded, tokenizer_file)
    assert convert_main(["--checkpoint", str(ckpt), "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "linear_qkv.weight has shape (4, 64, 64), expected (4, 128, 64)" in capsys.readouterr().err


def test_architecture_without_an_inference_format_is_refused(trained, tokenizer_file, tmp_path, capsys):
    _, state = trained("gpt2-tiny")
    cfg = tiny_config("gpt2-tiny", "model.position_embedding=rope")
    ckpt = save_model_state(tmp_path / "ckpt", cfg, state, tokenizer_file)
    assert convert_main(["--checkpoint", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "neither GPT-2 style" in capsys.readouterr().err


def test_q8_0_is_gguf_only(trained, tokenizer_file, tmp_path, capsys):
    cfg, state = trained("gpt2-tiny")
    ckpt = save_model_state(tmp_path / "ckpt", cfg, state, tokenizer_file)
    assert (
        convert_main(["--checkpoint", str(ckpt), "--to", "hf", "--dtype", "q8_0", "--out", str(tmp_path / "hf")]) == 2
    )
    assert "not a Hugging Face weight type" in capsys.readouterr().err


def test_import_of_an_unsupported_architecture_is_refused(tmp_path, capsys):
    (tmp_path / "mistral").mkdir()
    (tmp_path / "mistral" / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    assert convert_main(["--from-hf", str(tmp_path / "mistral"), "--out", str(tmp_path / "imported")]) == 2
    assert "architecture ['MistralForCausalLM'] is not supported" in capsys.readouterr().err
    assert not (tmp_path / "imported").exists()


def test_import_from_hf_writes_a_checkpoint(trained, tokenizer_file, tmp_path, capsys):
    cfg, state = trained("gpt2-tiny")
    ckpt = save_model_state(tmp_path / "ckpt", cfg, state, tokenizer_file)
    assert convert_main(["--checkpoint", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert (
        convert_main(
            ["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported"), "parallel.tp=2", "parallel.pp=2"]
        )
        == 0
    )
    command = shlex.split(capsys.readouterr().out.rsplit("\n  ", 1)[1])
    assert command[:2] == ["gptscale-train", f"checkpoint.resume={(tmp_path / 'imported').resolve()}"]
    assert command[-2:] == ["parallel.tp=2", "parallel.pp=2"] and "model.name=hf" in command
    imported_cfg, imported, tokenizer = load_model_state(tmp_path / "imported")
    assert (imported_cfg.parallel.tp, imported_cfg.parallel.pp) == (2, 2)  # recorded in config.yaml
    assert json.loads(tokenizer.read_text()) == json.loads(tokenizer_file.read_text())
    assert imported.keys() == state.keys()
    for key in state:
        if key == "embedding.word_embeddings.weight":  # padding rows are dropped on export, zero on import
            assert torch.equal(imported[key][:400], state[key][:400]) and not imported[key][400:].any()
        else:
            assert torch.equal(imported[key], state[key]), key
    tokens = torch.arange(30)[None]
    assert torch.equal(
        megatron_logits(imported_cfg, imported, tokens)[..., :400], megatron_logits(cfg, state, tokens)[..., :400]
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers

    assert convert_main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 2
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert load_model_state(tmp_path / "imported")[0].parallel.tp == 2  # untouched
    assert convert_main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported"), "--overwrite"]) == 0
    assert load_model_state(tmp_path / "imported")[0].parallel.tp == 1
    assert convert_main(["--from-hf", str(tmp_path / "hf"), "--to", "gguf", "--out", str(tmp_path / "x")]) == 2
