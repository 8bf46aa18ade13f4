"""Step cost in FLOPs and model FLOPs utilisation (MFU): achieved FLOP/s over the device's peak.

FLOPs are counted by torch.utils.flop_counter on a meta-device copy of the UNet (no memory, no compute): one
forward and backward per image, i.e. the matmul/convolution/attention work; normalisation and element-wise ops
are not counted, as is usual for MFU.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import TrainingConfig
from trainer.model import build_unet

# Dense peak TFLOP/s by device-name substring (vendor datasheets), for mixed precision (bf16/fp16 tensor cores)
# and for fp32 training (TF32 tensor cores when allowed, plain fp32 otherwise). First match wins.
PEAK_TFLOPS = (
    ("H200", {"mixed": 989.0, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"mixed": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"mixed": 989.0, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("A100", {"mixed": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"mixed": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"mixed": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10", {"mixed": 125.0, "tf32": 62.5, "fp32": 31.2}),
)


def training_flops_per_image(config: TrainingConfig) -> float:
    """FLOPs of one training forward+backward per image at config.image_size, counted on a micro-batch of
    train_batch_size (a few FLOPs per batch, e.g. the timestep MLP's weight gradient, do not scale with it)."""
    batch = config.train_batch_size
    with torch.device("meta"):
        unet = build_unet(config)
        x = torch.zeros(batch, unet.config.in_channels, config.image_size, config.image_size)
        t = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, return_dict=False)[0].sum().backward()
    return counter.get_total_flops() / batch


def peak_flops(config: TrainingConfig, device: torch.device) -> float | None:
    """The device's dense peak FLOP/s for this run's precision, or None where unknown (CPU, unlisted GPU)."""
    if config.peak_tflops is not None:
        return config.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    kind = "mixed" if config.mixed_precision != "no" else ("tf32" if config.allow_tf32 else "fp32")
    return next((peaks[kind] * 1e12 for key, peaks in PEAK_TFLOPS if key in name), None)
