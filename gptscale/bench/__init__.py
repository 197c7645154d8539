"""gptscale-bench: tokens/s, TFLOP/s, MFU, step time and peak memory of training configs on synthetic tokens."""
