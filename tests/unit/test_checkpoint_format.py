"""The on-disk side of checkpoints, in one process: publishing, retention, damage detection, read.py, inspect."""

import json
import os
import random

import numpy as np
import pytest
import torch

from gptscale.checkpoint.cli import inspect
from gptscale.checkpoint.files import read_rank_state
from gptscale.checkpoint.manifest import (
    CheckpointError,
    data_files,
    describe_file,
    find_damage,
    read_manifest,
    write_manifest,
)
from gptscale.checkpoint.publish import (
    LATEST,
    complete_checkpoints,
    latest,
    prune,
    publish,
    remove_unfinished,
    resolve,
    resume_candidates,
    staging_dir,
    step_name,
)
from gptscale.checkpoint.read import load_model_state, save_model_state
from gptscale.config import load_config
from gptscale.train.rng import RngState, seed_everything


def fake_checkpoint(root, step, payload=b"weights" * 100, rank_state=None):
    """A published checkpoint with one data file (and rank 0's states, if given), as save.py leaves it."""
    staging = staging_dir(root, step, "test")
    (staging / "shards").mkdir(parents=True)
    (staging / "shards" / "__0_0.distcp").write_bytes(payload)
    if rank_state is not None:
        (staging / "ranks").mkdir()
        torch.save(rank_state, staging / "ranks" / "rank_00000.pt")
    files = {name: describe_file(staging / name) for name in data_files(staging)}
    components = sorted(rank_state["components"]) if rank_state is not None else []
    write_manifest(
        staging,
        {
            "step": step,
            "consumed_tokens": 0,
            "model": "m",
            "layout": None,
            "contents": {"optimizer": False, "components": components},
            "saved_at": "now",
            "bytes": sum(f["bytes"] for f in files.values()),
            "files": files,
        },
    )
    publish(staging, root / step_name(step))
    return root / step_name(step)


def test_publish_renames_into_place_and_points_latest_at_it(tmp_path):
    path = fake_checkpoint(tmp_path, 12)
    assert path.name == "step_000012" and (path / "checkpoint.json").is_file()
    assert (tmp_path / LATEST).read_text().strip() == "step_000012"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    assert latest(tmp_path) == path


def test_unfinished_saves_are_never_taken_for_checkpoints(tmp_path):
    done = fake_checkpoint(tmp_path, 4)
    unfinished = staging_dir(tmp_path, 6, "dead")
    (unfinished / "shards").mkdir(parents=True)
    (unfinished / "shards" / "__0_0.distcp").write_bytes(b"x")
    half_published = tmp_path / step_name(8)  # a published name without its manifest
    half_published.mkdir()
    assert complete_checkpoints(tmp_path) == {4: done}
    assert latest(tmp_path) == done
    assert resume_candidates(tmp_path) == [half_published, done]  # resume=auto names the damaged one, skips it
    assert remove_unfinished(tmp_path) == [unfinished]
    assert done.is_dir() and half_published.is_dir()


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 2)
    newest = fake_checkpoint(tmp_path, 4)
    (tmp_path / LATEST).write_text("step_000099\n")
    assert latest(tmp_path) == newest


def test_retention_keeps_the_last_n_and_every_kth(tmp_path):
    for step in range(1, 11):
        fake_checkpoint(tmp_path, step)
    deleted = prune(tmp_path, keep_last=2, keep_every=4)
    assert sorted(complete_checkpoints(tmp_path)) == [4, 8, 9, 10]
    assert len(deleted) == 6 and not any(".trash-" in p.name for p in tmp_path.iterdir())
    assert prune(tmp_path, keep_last=0, keep_every=0) == []


def test_resume_setting_resolves_to_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert resolve("auto", run / "checkpoints") is None
    newest = fake_checkpoint(run / "checkpoints", 3)
    assert resolve("none", run / "checkpoints") is None
    assert resolve("auto", run / "checkpoints") == newest
    assert resolve(str(run), tmp_path / "elsewhere") == newest
    assert resolve(str(newest), tmp_path / "elsewhere") == newest


def test_damage_is_found_and_named(tmp_path):
    path = fake_checkpoint(tmp_path, 1)
    manifest = read_manifest(path)
    names = sorted(manifest["files"])
    data = path / "shards" / "__0_0.distcp"
    original = data.read_bytes()
    assert find_damage(path, manifest, names) == []
    data.write_bytes(original[:-10])
    assert "truncated" in find_damage(path, manifest, names)[0] and str(data) in find_damage(path, manifest, names)[0]
    data.write_bytes(original[:5] + b"X" + original[6:])
    assert "corrupted" in find_damage(path, manifest, names)[0]
    assert find_damage(path, manifest, names, checksums=False) == []
    data.unlink()
    assert "missing" in find_damage(path, manifest, names)[0]
    (path / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="damaged: checkpoint.json is missing"):
        read_manifest(path)  # a published name without its manifest was damaged after the save


def llama_like_tensors(cfg):
    layers, hidden, ffn = cfg.model.num_layers, cfg.model.hidden_size, cfg.model.ffn_hidden_size
    generator = torch.Generator().manual_seed(0)
    shapes = {
        "embedding.word_embeddings.weight": (384, hidden),
        "decoder.layers.self_attention.linear_qkv.weight": (layers, 128, hidden),
        "decoder.layers.mlp.linear_fc1.weight": (layers, 2 * ffn, hidden),
        "decoder.final_layernorm.weight": (hidden,),
    }
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def test_model_state_round_trips_in_one_process(tmp_path):
    cfg = load_config(["model=llama-tiny"])
    tensors = llama_like_tensors(cfg)
    tokenizer = tmp_path / "my-tokenizer.json"
    tokenizer.write_text('{"model": "bpe"}')
    path = save_model_state(
        tmp_path / "imported", cfg, {k: v.to(torch.bfloat16) for k, v in tensors.items()}, tokenizer
    )
    loaded_cfg, loaded, tokenizer_file = load_model_state(path)
    assert loaded_cfg == cfg
    assert tokenizer_file == path / "tokenizer.json" and tokenizer_file.read_text() == tokenizer.read_text()
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], tensor.to(torch.bfloat16).float())
    manifest = json.loads((path / "checkpoint.json").read_text())
    assert manifest["step"] == 0 and manifest["layout"] is None and manifest["contents"]["optimizer"] is False
    with pytest.raises(CheckpointError, match="does not overwrite"):
        save_model_state(path, cfg, tensors)


def test_model_state_refuses_incomplete_or_damaged_checkpoints(tmp_path):
    cfg = load_config(["model=llama-tiny"])
    path = save_model_state(tmp_path / "ckpt", cfg, llama_like_tensors(cfg))
    shard = next((path / "shards").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{shard}.*truncated"):
        load_model_state(path)
    (path / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_model_state(path)


def test_inspect_reports_and_fails_on_incomplete(tmp_path, capsys):
    cfg = load_config(["model=llama-tiny"])
    path = save_model_state(tmp_path / "ckpt", cfg, llama_like_tensors(cfg))
    assert inspect(path) == 0
    out = capsys.readouterr().out
    assert f"{path}: complete" in out and "step     0" in out and "layout   none" in out and "llama-tiny" in out
    assert "size" in out and "config:" in out
    shard = next((path / "shards").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])
    assert inspect(path) == 1
    assert "DAMAGED" in capsys.readouterr().out
    (path / "checkpoint.json").unlink()
    assert inspect(path) == 1
    assert "INCOMPLETE" in capsys.readouterr().out


class RunsShell:
    """Unpickles by running a shell command: what a planted rank file could hold."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_rank_file_that_would_run_code_is_refused_naming_it(tmp_path, capsys):
    marker = tmp_path / "ran"
    state = {"rank": 0, "position": {}, "components": {"train_data": {"exclude": [RunsShell(f"touch {marker}")]}}}
    path = fake_checkpoint(tmp_path / "checkpoints", 2, rank_state=state)
    rank_file = path / "ranks" / "rank_00000.pt"
    assert inspect(path) == 1
    assert f"{rank_file} is refused" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match=f"{rank_file} is refused: .* asks for posix.system"):
        read_rank_state(path, 0)
    assert not marker.exists(), "the planted payload ran"
    torch.load(rank_file, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()


def test_rng_state_is_plain_data_and_restores_every_generator(tmp_path):
    rng = RngState(torch.device("cpu"))
    seed_everything(3)
    path = fake_checkpoint(tmp_path, 2, rank_state={"rank": 0, "position": {}, "components": {"rng": rng.state_dict()}})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(4)
    rng.load_state_dict(read_rank_state(path, 0)["components"]["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
