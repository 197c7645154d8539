"""Test fault injection in the ranks of a real launch (tests/faults: ``launch_env`` puts this directory on
PYTHONPATH): a process started as ``python -m gptscale.train`` gets the faults of GPTSCALE_TEST_FAULTS; every
other process (torchrun's agent, checkpoint helpers) is left alone."""

import json
import os
import sys

argv = sys.orig_argv
if os.environ.get("GPTSCALE_TEST_FAULTS") and any(
    argv[i : i + 2] == ["-m", "gptscale.train"] for i in range(len(argv))
):
    from tests.faults import FAULTS_ENV, injected

    faults = injected(json.loads(os.environ[FAULTS_ENV]))  # kept: the patches last while it does
    faults.__enter__()
