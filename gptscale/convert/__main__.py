"""``python -m gptscale.convert``: the same as ``gptscale-convert``."""

import sys

from gptscale.convert.cli import convert_main

sys.exit(convert_main())
