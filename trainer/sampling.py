"""Sampling (DDPM/DDIM), shared by the training loop (sharded across ranks), `ddpm sample`, `ddpm eval` and the
end-of-run check of the saved pipeline.

Image i always starts from its own generator seeded with (seed, i), so a grid does not depend on how many
ranks drew it or in which batches. Every rank samples its share at the same time; rank 0 gathers the results.

The denoising loop is the stock DDIMPipeline/DDPMPipeline loop written out (`denoise`: the same noise, timesteps,
steps and generator draws), so that the raw float images are checked before anything quantises them: the
pipelines clamp to [0, 1] first, which turns inf into white and NaN into black. A non-finite image is an error
(NonFiniteSamples), never a grid or a score.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils import make_image_grid
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from trainer.errors import NonFiniteSamples
from trainer.data import to_uint8

# DDIM's direction sqrt(1 - a_prev - eta^2 var) is sqrt(0) at eta 1 when a_t = 0 (zero terminal SNR), and float32
# rounding made it NaN on some CPUs at some step counts (diffusers #5969). The variance is taken this much (relative)
# below diffusers': ~80 float32 eps of 1 - a_prev, more than any sqrt/pow is off, while the noise's std moves by 5e-6.
VARIANCE_MARGIN = 1e-5
FINAL_CHECK_IMAGES = 2  # drawn from the saved pipeline before a run is marked complete
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ExactStepsMixin:
    """set_timesteps(n) gives exactly n timesteps. diffusers' trailing spacing takes np.arange(T, 0, -T/n), which
    float rounding makes one element too long for some n (124 of 1..1000 at T=1000, e.g. 61): a last timestep of -1,
    which indexes alphas_cumprod[-1] and samples those counts wrong. The first n elements are the intended ones."""

    def set_timesteps(self, num_inference_steps: int, *args, **kwargs):
        super().set_timesteps(num_inference_steps, *args, **kwargs)
        if len(self.timesteps) > num_inference_steps:
            self.timesteps = self.timesteps[:num_inference_steps]


class MarginDDIMScheduler(ExactStepsMixin, DDIMScheduler):
    """DDIMScheduler with the variance VARIANCE_MARGIN below diffusers', so no step count, eta or CPU can make
    DDIM's direction coefficient NaN, and exactly n timesteps. Same config and arithmetic otherwise: nothing saved
    changes (the pipeline keeps the training DDPMScheduler)."""

    def _get_variance(self, timestep, prev_timestep):
        return super()._get_variance(timestep, prev_timestep) * (1 - VARIANCE_MARGIN)


class ExactStepsDDPMScheduler(ExactStepsMixin, DDPMScheduler):
    """DDPMScheduler with exactly n timesteps (ExactStepsMixin); same config and arithmetic otherwise."""


class SamplingInterrupted(Exception):
    """`should_stop` answered yes between two sampler steps (a SIGTERM during an evaluation)."""


def image_generators(seed: int, indices: range) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed * 100_003 + i) for i in indices]


def shard(num_images: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of the grid; every share has the same length (the last may run past N)."""
    per_rank = math.ceil(num_images / world_size)
    return range(rank * per_rank, (rank + 1) * per_rank)


def describe(kind: str, num_inference_steps: int, eta: float, precision: str) -> str:
    """How images were drawn, for messages: 'ddim 10 steps eta 1, UNet fp32'."""
    eta_text = f" eta {eta:g}" if kind == "ddim" else ""
    return f"{kind} {num_inference_steps} steps{eta_text}, UNet {'fp32' if precision == 'no' else precision}"


def kind_of(scheduler) -> str:
    return "ddim" if isinstance(scheduler, DDIMScheduler) else "ddpm"


@torch.no_grad()
def denoise(unet, scheduler, generators: list[torch.Generator], *, num_inference_steps: int, eta: float = 1.0,
            precision: str = "no", should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """DDIMPipeline/DDPMPipeline.__call__'s loop: raw float images (len(generators), C, H, W) in the model's range,
    not clamped. bf16/fp16 `precision` autocasts the UNet only; its output is read as fp32, so the scheduler's
    arithmetic and the running image stay fp32. `should_stop` is asked before each step (a host-side flag, no sync):
    a yes raises SamplingInterrupted, so a stop request never waits for a long evaluation."""
    size = unet.config.sample_size
    shape = (len(generators), unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
    image = randn_tensor(shape, generator=generators, device=unet.device, dtype=unet.dtype)
    scheduler.set_timesteps(num_inference_steps)
    extra = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    for t in scheduler.timesteps:
        if should_stop is not None and should_stop():
            raise SamplingInterrupted
        with torch.autocast(unet.device.type, dtype=AUTOCAST_DTYPES.get(precision), enabled=precision != "no"):
            output = unet(image, t).sample
        image = scheduler.step(output.float(), t, image, generator=generators, **extra).prev_sample
    return image


def sample_images(
    unet, scheduler, indices: range, *, seed: int, num_inference_steps: int, eta: float = 1.0, batch_size: int = 64,
    precision: str = "no", should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """uint8 images (len(indices), H, W, 3) on the UNet's device, in chunks of at most batch_size. Raises
    NonFiniteSamples at the first chunk holding a NaN/inf image, before it is quantised (one check per chunk)."""
    chunks = []
    for start in range(indices.start, indices.stop, batch_size):
        part = range(start, min(start + batch_size, indices.stop))
        raw = denoise(unet, scheduler, image_generators(seed, part), num_inference_steps=num_inference_steps,
                      eta=eta, precision=precision, should_stop=should_stop)
        bad = int((~torch.isfinite(raw)).flatten(1).any(1).sum())  # the chunk's one host sync
        if bad:
            raise NonFiniteSamples(describe(kind_of(scheduler), num_inference_steps, eta, precision), bad,
                                   part.stop - indices.start)
        chunks.append(to_uint8(raw))
    size = unet.config.sample_size
    empty = torch.empty(0, size, size, 3, dtype=torch.uint8)
    return torch.cat(chunks).to(unet.device) if chunks else empty.to(unet.device)


def eval_scheduler(kind: str, train_scheduler_config) -> DDIMScheduler | DDPMScheduler:
    """A fresh sampler (samplers keep their timesteps) sharing the training noise schedule."""
    cls = MarginDDIMScheduler if kind == "ddim" else ExactStepsDDPMScheduler
    return cls.from_config(train_scheduler_config)


def describe_eval(config) -> str:
    return describe(config.eval_scheduler, config.num_inference_steps, config.ddim_eta, config.eval_mixed_precision)


def sample_for_eval(unet, config, train_scheduler_config, indices: range,
                    should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """What the training loop's evaluation draws (grid and quality images): the configured sampler, steps, eta
    and eval precision. `ddpm eval` and the benchmark call this too, so they time and score the same thing."""
    return sample_images(unet, eval_scheduler(config.eval_scheduler, train_scheduler_config), indices,
                         seed=config.seed, num_inference_steps=config.num_inference_steps, eta=config.ddim_eta,
                         precision=config.eval_mixed_precision, should_stop=should_stop)


def check_saved_pipeline(model_dir: Path, *, num_inference_steps: int, seed: int, device,
                         should_stop: Callable[[], bool] | None = None) -> str:
    """Draw FINAL_CHECK_IMAGES images from the DDPMPipeline in model_dir as `DDPMPipeline.from_pretrained` gives
    it (its own saved scheduler, fp32) at num_inference_steps. Raises NonFiniteSamples; returns what was drawn.
    `should_stop` is asked before each step, as in denoise."""
    from diffusers import DDPMPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    pipeline = DDPMPipeline.from_pretrained(model_dir).to(device)
    steps = min(num_inference_steps, pipeline.scheduler.config.num_train_timesteps)
    sample_images(pipeline.unet, pipeline.scheduler, range(FINAL_CHECK_IMAGES), seed=seed, num_inference_steps=steps,
                  should_stop=should_stop)
    return f"{FINAL_CHECK_IMAGES} images, {describe(kind_of(pipeline.scheduler), steps, 0.0, 'no')}"


def to_grid(images: torch.Tensor) -> Image.Image:
    """A near-square grid; blank cells pad the last row."""
    pil = [Image.fromarray(img) for img in images.cpu().numpy()]
    cols = math.ceil(math.sqrt(len(pil)))
    rows = math.ceil(len(pil) / cols)
    pil += [Image.new("RGB", pil[0].size, "white")] * (rows * cols - len(pil))
    return make_image_grid(pil, rows=rows, cols=cols)


def save_images(images: torch.Tensor, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images.cpu().numpy()):
        paths.append(out_dir / f"{i:05d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths
