"""``python tools/generate.py ...``: gptscale-generate from a source checkout (see docs/converting.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptscale.convert.cli import generate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(generate_main())
