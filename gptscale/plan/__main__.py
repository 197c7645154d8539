"""``python -m gptscale.plan``: the same as ``gptscale-plan``."""

import sys

from gptscale.plan.cli import main

sys.exit(main())
