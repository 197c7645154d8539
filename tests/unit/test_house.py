"""The house's rules, checked: design.md's room order (a lower room never imports a higher one), lint, formatting
and types (the same commands .pre-commit-config.yaml runs)."""

import shutil
import subprocess

from tests.helpers import REPO


def test_no_room_imports_a_higher_one():
    """The layers contract in pyproject.toml ([tool.importlinter]) mirrors docs/design.md's room table."""
    proc = subprocess.run(
        [shutil.which("lint-imports") or "lint-imports", "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [shutil.which(command[0]) or command[0], *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def test_lint_passes():
    proc = run("ruff", "check", "gptscale", "tests", "tools")
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_the_code_is_formatted():
    """`ruff format gptscale tests tools` leaves every file as it is."""
    proc = run("ruff", "format", "--check", "gptscale", "tests", "tools")
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_the_package_type_checks():
    """pyproject.toml's [tool.mypy] lists the modules whose errors predate the check; no other may have any."""
    proc = run("mypy", "gptscale")
    assert proc.returncode == 0, proc.stdout[-4000:]
