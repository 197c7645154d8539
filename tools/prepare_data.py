"""Thin wrapper over ``gptscale-prepare`` for a source checkout: python tools/prepare_data.py --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gptscale, installed or not

from gptscale.data.prepare import main  # noqa: E402

if __name__ == "__main__":
    main()
