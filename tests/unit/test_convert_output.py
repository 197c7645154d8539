"""gptscale-convert never writes over what it reads, a run or a checkpoint: --out that is, holds or lies inside
the source is refused, and --overwrite replaces only a previous output of the same kind."""

import subprocess
import sys

import pytest

from gptscale.checkpoint.read import save_model_state
from gptscale.convert.cli import convert_main
from tests.convert.models import perturbed_state, tiny_config, train_tokenizer
from tests.helpers import REPO


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory: a checkpoint under checkpoints/ and a metrics.jsonl."""
    root = tmp_path_factory.mktemp("runs")
    tokenizer = train_tokenizer(root / "tokenizer.json")
    cfg = tiny_config("gpt2-tiny")
    run = root / "x"
    save_model_state(run / "checkpoints" / "step_000005", cfg, perturbed_state(cfg, 400), tokenizer)
    (run / "metrics.jsonl").write_text('{"step": 5, "loss": 3.0}\n')
    return run


def files(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_export_over_its_own_run_is_refused_and_the_run_kept(run):
    """The issue's command: it used to delete the run's checkpoints and metrics and exit 0."""
    before = files(run)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptscale.convert",
            "--checkpoint",
            str(run),
            "--to",
            "hf",
            "--out",
            str(run),
            "--overwrite",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert f"--out {run} is {run}, which this conversion reads" in proc.stderr
    assert "Traceback" not in proc.stderr and files(run) == before


@pytest.mark.parametrize(
    "source,to,out,message",
    [
        ("x", "hf", "x/hf", "lies inside"),  # inside the run given
        ("x", "gguf", "x/checkpoints/step_000005/m.gguf", "lies inside"),  # inside the checkpoint it resolves to
        ("x/checkpoints/step_000005", "hf", "x/checkpoints", "contains"),
        ("x", "hf", ".", "contains"),  # the directory of runs
    ],
)
def test_output_around_or_inside_the_source_is_refused(run, source, to, out, message, capsys):
    before = files(run)
    out = run.parent / out
    assert convert_main(["--checkpoint", str(run.parent / source), "--to", to, "--out", str(out), "--overwrite"]) == 2
    assert f"--out {out} {message} " in capsys.readouterr().err
    assert files(run) == before


def test_overwrite_replaces_only_a_previous_output_of_the_same_kind(run, tmp_path, capsys):
    other_run = tmp_path / "y"
    (other_run / "checkpoints").mkdir(parents=True)
    (other_run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    gguf = tmp_path / "model.gguf"
    gguf.write_text("not a GGUF")
    for to, out in [("hf", other_run), ("hf", notes), ("gguf", gguf), ("gguf", notes)]:
        assert convert_main(["--checkpoint", str(run), "--to", to, "--out", str(out), "--overwrite"]) == 2
        assert "--overwrite replaces only" in capsys.readouterr().err
    assert (notes / "notes.txt").read_text() == "mine" and gguf.read_text() == "not a GGUF"
    assert files(other_run) == ["checkpoints", "metrics.jsonl"]

    hf, new_gguf = tmp_path / "hf", tmp_path / "new.gguf"
    for to, out in [("hf", hf), ("gguf", new_gguf)]:
        assert convert_main(["--checkpoint", str(run), "--to", to, "--out", str(out)]) == 0
        assert convert_main(["--checkpoint", str(run), "--to", to, "--out", str(out), "--overwrite"]) == 0
    (hf / "metrics.jsonl").write_text("{}\n")  # a run someone put into an export: not replaced
    assert convert_main(["--checkpoint", str(run), "--to", "hf", "--out", str(hf), "--overwrite"]) == 2
    assert f"{hf} holds {hf / 'metrics.jsonl'}, part of a run or a checkpoint" in capsys.readouterr().err
    (hf / "metrics.jsonl").unlink()

    imported = tmp_path / "imported"
    assert convert_main(["--from-hf", str(hf), "--out", str(imported)]) == 0
    assert convert_main(["--from-hf", str(hf), "--out", str(imported), "--overwrite"]) == 0
    assert convert_main(["--from-hf", str(hf), "--out", str(other_run), "--overwrite"]) == 2
    assert "--overwrite replaces only a checkpoint imported by gptscale-convert --from-hf" in capsys.readouterr().err
    assert convert_main(["--from-hf", str(hf), "--out", str(hf), "--overwrite"]) == 2  # the source
    assert f"--out {hf} is {hf}, which this conversion reads" in capsys.readouterr().err
    before = files(run)
    assert convert_main(["--from-hf", str(hf), "--out", str(run / "checkpoints" / "step_000005"), "--overwrite"]) == 2
    assert f"lies inside {run}, a run's or a checkpoint's directory (it holds metrics.jsonl)" in capsys.readouterr().err
    assert files(run) == before


def test_exports_take_the_users_umask_not_tempfiles_private_modes(tmp_path):
    """An HF export was a 0700 directory of 0600 files: other users of a shared cluster could not read it."""
    import os
    import stat

    from gptscale.convert.output import HF_EXPORT, staged

    previous = os.umask(0o022)
    try:
        with staged(tmp_path / "hf", HF_EXPORT, overwrite=False, make_dir=True) as stage:
            (stage / "config.json").write_text("{}")
            (stage / "sub").mkdir()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "hf" / "config.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "hf" / "sub").stat().st_mode) == 0o755
