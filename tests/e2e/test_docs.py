"""The commands README.md and docs/ give still run as written: every Hydra key they type composes with the
schema, every flag they pass is one the command offers, and the planner's commands run in full (training,
SLURM and conversion commands are run for real by the other e2e tests on small settings)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gptscale.config import load_config
from tests.helpers import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIGURED = re.compile(
    r"^(gptscale-(train|bench|plan)|torchrun .*-m gptscale\.(train|bench|eval)|launch/torchrun\.sh|"
    r"sbatch .*launch/slurm\.sbatch|python tools/ckpt_bench\.py|torchrun .*tools/ckpt_bench\.py|"
    r"gptscale-eval|gptscale-convert --from-hf)"
)
TOOLS = (
    "gptscale-train",
    "gptscale-prepare",
    "gptscale-convert",
    "gptscale-generate",
    "gptscale-plot",
    "gptscale-ckpt",
    "gptscale-bench",
    "gptscale-eval",
    "gptscale-plan",
    "gptscale-goodput",
)


def documented_commands() -> list[tuple[str, str]]:
    """(document, command line) of every shell code block line that runs gptscale, continuations joined."""
    found = []
    for document in DOCUMENTS:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", document.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                line = re.sub(r"^([A-Z_]+=\S+\s+)+", "", line)  # environment assignments before the command
                if (
                    line.startswith(("gptscale-", "torchrun", "sbatch", "launch/", "python"))
                    and "..." not in line
                    and "$" not in line
                ):
                    found.append((document.name, line))
    return found


COMMANDS = documented_commands()


def overrides(words: list[str]) -> list[str]:
    """The Hydra overrides of a command line: key=value words not given to a flag; a sweep's first value."""
    keys, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word.startswith("--"):
            skip = "=" not in word and word not in ("--search", "--json", "--greedy", "--overwrite", "--resolve")
        elif "=" in word and not word.startswith(("hydra", "-")) and re.match(r"^[\w.+~/]+=", word):
            key, value = word.split("=", 1)
            keys.append(f"{key}={value.split(',')[0] if not value.startswith('[') else value}")
    return keys


def test_the_documents_hold_commands():
    assert len(COMMANDS) > 30
    assert any(line.startswith("gptscale-plan") for _, line in COMMANDS)


@pytest.mark.parametrize(
    "document, line",
    [c for c in COMMANDS if CONFIGURED.match(c[1])],
    ids=lambda value: value if len(value) < 40 else value[:40],
)
def test_every_documented_key_composes(document, line):
    """A renamed or misspelt key in a guide fails here, not on a user's cluster."""
    keys = overrides(shlex.split(line))
    load_config(keys)


def test_every_documented_flag_exists():
    used: dict[str, set[str]] = {}
    for _, line in COMMANDS:
        words = shlex.split(line)
        tool = next((w for w in words if w in TOOLS), None)
        if tool is not None:
            used.setdefault(tool, set()).update(w.split("=")[0] for w in words if w.startswith("--"))
    for tool, flags in used.items():
        installed = Path(sys.executable).parent / tool  # the scripts beside this Python, else on PATH
        text = subprocess.run(
            [str(installed) if installed.exists() else tool, "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        missing = sorted(flag for flag in flags if flag not in text)
        assert not missing, f"{tool} does not offer {missing} (docs use them)"


@pytest.mark.parametrize("line", [line for _, line in COMMANDS if line.startswith("gptscale-plan")])
def test_planner_commands_run_as_written(line):
    words = shlex.split(line)
    proc = subprocess.run(
        [sys.executable, "-m", "gptscale.plan", *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: the layout asked for does not fit
    assert "seq_len" in proc.stdout.splitlines()[0]
