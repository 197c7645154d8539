"""``gptscale-eval``: a checkpoint's held-out loss and multiple-choice accuracy (the top room: it runs the trainer's
setup; task files live in data/tasks.py and their scoring in train/evaluation.py)."""
