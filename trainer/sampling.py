"""Sample grids, shared by the training loop (sharded across ranks) and `ddpm sample`.

Image i always starts from its own generator seeded with (seed, i), so a grid does not depend on how many
ranks drew it or in which batches. Every rank samples its share at the same time; rank 0 gathers the results.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler
from diffusers.utils import make_image_grid
from PIL import Image


def image_generators(seed: int, indices: range) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed * 100_003 + i) for i in indices]


def shard(num_images: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of the grid; every share has the same length (the last may run past N)."""
    per_rank = math.ceil(num_images / world_size)
    return range(rank * per_rank, (rank + 1) * per_rank)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def sample_images(
    unet, scheduler, indices: range, *, seed: int, num_inference_steps: int, eta: float = 1.0, batch_size: int = 64,
    precision: str = "no",
) -> torch.Tensor:
    """uint8 images (len(indices), H, W, 3) on the UNet's device, in chunks of at most batch_size. `precision`
    bf16/fp16 autocasts the UNet only: the sampler's running image stays fp32."""
    ddim = isinstance(scheduler, DDIMScheduler)
    pipeline = (DDIMPipeline if ddim else DDPMPipeline)(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    extra = {"eta": eta} if ddim else {}
    chunks = []
    for start in range(indices.start, indices.stop, batch_size):
        part = range(start, min(start + batch_size, indices.stop))
        with torch.autocast(unet.device.type, dtype=AUTOCAST_DTYPES.get(precision), enabled=precision != "no"):
            images = pipeline(
                batch_size=len(part),
                generator=image_generators(seed, part),
                num_inference_steps=num_inference_steps,
                output_type="np",
                **extra,
            ).images
        chunks.append(torch.from_numpy((images * 255).round().astype(np.uint8)))
    empty = torch.empty(0, unet.config.sample_size, unet.config.sample_size, 3, dtype=torch.uint8)
    return torch.cat(chunks).to(unet.device) if chunks else empty.to(unet.device)


def eval_scheduler(kind: str, train_scheduler_config) -> DDIMScheduler | DDPMScheduler:
    """A fresh sampler (pipelines mutate their scheduler's timesteps) sharing the training noise schedule."""
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    return cls.from_config(train_scheduler_config)


def sample_for_eval(unet, config, train_scheduler_config, indices: range) -> torch.Tensor:
    """What the training loop's evaluation draws (grid and quality images): the configured sampler, steps, eta
    and eval precision. `ddpm eval` and the benchmark call this too, so they time and score the same thing."""
    return sample_images(unet, eval_scheduler(config.eval_scheduler, train_scheduler_config), indices,
                         seed=config.seed, num_inference_steps=config.num_inference_steps, eta=config.ddim_eta,
                         precision=config.eval_mixed_precision)


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
