"""Peak dense TFLOP/s of the accelerators gptscale knows: the denominator of the trainer's MFU and the
planner's compute time."""

from __future__ import annotations

from typing import Optional

import torch

from gptscale.config.schema import Precision

# Dense (no sparsity) peak TFLOP/s per device, by precision.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100 SXM": {"bf16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp32": 60.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp32": 31.2},
    "V100": {"bf16": 125.0, "fp32": 15.7},
}


def device_peak_tflops(device: torch.device, precision: Precision) -> Optional[float]:
    """Peak TFLOP/s of ``device`` from the table, or None when it is not listed (CPUs among them)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision.value]
    return None
