"""``python tools/bench.py ...`` (also under torchrun): gptscale-bench from a source checkout; see gptscale/bench."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptscale.bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main()
