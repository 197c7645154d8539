"""``python tools/plot.py RUN_DIR [--out FILE.png]``: the same as ``gptscale-plot``, from a checkout."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptscale.tracking.plot import main  # noqa: E402  (the checkout's own gptscale, installed or not)

if __name__ == "__main__":
    main()
