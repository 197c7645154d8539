"""Evaluation: multiple-choice tasks scored by log-likelihood, and ``gptscale-eval`` over a checkpoint."""
