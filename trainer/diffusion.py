"""The DDPM training objective as a pure function of (model, scheduler, clean images, seed, where in the run).

Noise, timesteps and flips for one micro-batch are drawn from a generator seeded by (seed, optimizer update,
position of the micro-batch in that update's global batch). The position is accumulation index x processes + rank:
the same images sit at the same position whether the global batch is 2 processes x 1 micro-batch or 1 process x 2
micro-batches (trainer.loop.global_batches). So a run's randomness does not depend on the number of processes, on how
the global batch is split into accumulation steps, or on where it was resumed; and no global RNG is touched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, update, position) over the 63-bit seed space


def step_generator(seed: int, update: int, position: int, device: torch.device) -> torch.Generator:
    key = ((seed * _MIX + update) * _MIX + position) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(key)


def training_loss(
    unet,
    scheduler: DDPMScheduler,
    clean: torch.Tensor,
    *,
    seed: int,
    update: int,
    position: int = 0,
    random_flip: bool = True,
    loss_weighting: str = "none",
    snr_gamma: float = 5.0,
) -> torch.Tensor:
    """MSE between the UNet's output and the target of scheduler.config.prediction_type (noise for epsilon), for
    the micro-batch at `position` of optimizer update `update`; with loss_weighting 'min_snr', each sample's MSE is
    weighted by min_snr_weights before the mean."""
    batch, device = clean.shape[0], clean.device
    gen = step_generator(seed, update, position, device)
    flips = torch.rand(batch, generator=gen, device=device) < 0.5
    noise = torch.randn(clean.shape, generator=gen, device=device, dtype=clean.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen, device=device)
    if random_flip:
        clean = torch.where(flips[:, None, None, None], clean.flip(-1), clean)

    noisy = scheduler.add_noise(clean, noise, timesteps)
    prediction = unet(noisy, timesteps, return_dict=False)[0]
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "sample":
        target = clean
    else:
        target = scheduler.get_velocity(clean, noise, timesteps)
    if loss_weighting == "none":
        return F.mse_loss(prediction.float(), target.float())
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(scheduler, timesteps, snr_gamma)).mean()


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy"): the x0-space weight min(SNR, gamma), expressed for the loss actually computed. The MSE on the noise
    is the x0 MSE times SNR, on v times SNR + 1, on x0 itself times 1; so the weight is min(SNR, gamma) / SNR,
    / (SNR + 1) or / 1 (diffusers' train_text_to_image.py does the same). SNR = alpha_bar / (1 - alpha_bar)
    (diffusers.training_utils.compute_snr). At SNR 0 (the last timestep of a zero-terminal-SNR schedule) the noise
    weight is its limit 1."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped
