"""The house's rules, checked: design.md's room order (a lower room never imports a higher one)."""

import shutil
import subprocess

from tests.helpers import REPO


def test_no_room_imports_a_higher_one():
    """The layers contract in pyproject.toml ([tool.importlinter]) mirrors docs/design.md's room table."""
    proc = subprocess.run([shutil.which("lint-imports") or "lint-imports", "--no-cache"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout
