"""Convert a gptscale checkpoint to Hugging Face / GGUF, or import a Hugging Face model (see docs/converting.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptscale.convert.cli import convert_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(convert_main())
