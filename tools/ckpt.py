"""Thin wrapper: ``python tools/ckpt.py inspect PATH`` is ``gptscale-ckpt inspect PATH``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptscale.checkpoint.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
