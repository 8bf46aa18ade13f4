"""`ddpm eval`: score a saved DDPMPipeline against the training images with the quality metric (trainer.quality)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from trainer.data import real_images
from trainer.errors import ConfigError
from trainer.quality import pyramid_resolutions, swd
from trainer.run_dir import RunDir


def eval_config(config, sources: dict[str, str], model: RunDir):
    """The config `ddpm eval` scores with: image_size is the model's sample_size unless set explicitly (then it
    must match). Raises ConfigError."""
    model_dir = model.root
    try:
        sample_size = model.unet_config()["sample_size"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError([f"--model {model_dir}: cannot read {model.unet.name}/config.json's sample_size: {e}"]) from e
    if not isinstance(sample_size, int):
        raise ConfigError([f"--model {model_dir}: square models only, unet sample_size is {sample_size}"])
    if sources.get("image_size", "default") == "default":
        return config.model_copy(update={"image_size": sample_size})
    if config.image_size != sample_size:
        raise ConfigError([f"image_size {config.image_size} (from {sources['image_size']}) differs from the model's "
                           f"sample_size {sample_size}; leave image_size unset to use the model's"])
    return config


def evaluate_pipeline(model_dir: Path, config, num_images: int) -> dict:
    """Score the DDPMPipeline in model_dir: `num_images` samples drawn as the training loop draws them
    (sample_for_eval: the config's sampler, steps, eta, eval precision and seed) against as many real images
    (real_images). Returns the swd() scores plus what was measured and how long sampling and scoring took."""
    from diffusers import DDPMPipeline
    from diffusers.utils import logging as diffusers_logging

    from trainer.sampling import sample_for_eval  # loads diffusers' schedulers: only when sampling

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars: noise in logs
    real = real_images(config, num_images)  # first: a too-small dataset fails before minutes of sampling
    pipeline = DDPMPipeline.from_pretrained(model_dir)
    pipeline.to("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    fake = sample_for_eval(pipeline.unet, config, pipeline.scheduler.config, range(num_images))
    sample_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = swd(real.to(fake.device), fake, seed=config.seed)
    return {
        **scores,
        "levels": pyramid_resolutions(config.image_size), "num_images": num_images, "image_size": config.image_size,
        "dataset": config.dataset_name, "model": str(model_dir), "sampler": config.eval_scheduler,
        "num_inference_steps": config.num_inference_steps, "ddim_eta": config.ddim_eta,
        "eval_mixed_precision": config.eval_mixed_precision, "seed": config.seed,
        "sample_seconds": round(sample_seconds, 3), "metric_seconds": round(time.perf_counter() - start, 3),
    }


def format_report(result: dict) -> str:
    """The human-readable `ddpm eval` output."""
    levels = [f"swd_{size}px" for size in result["levels"]]
    lines = [
        f"{result['num_images']} generated vs {result['num_images']} real images ({result['dataset']}, "
        f"{result['image_size']} px); {result['sampler']} {result['num_inference_steps']} steps, eta "
        f"{result['ddim_eta']}, {result['eval_mixed_precision']}, seed {result['seed']}; sampling "
        f"{result['sample_seconds']:.1f} s",
        "sliced Wasserstein distance x1e3 (lower is better; Laplacian pyramid, 7x7 patches; last level low-pass):",
        *(f"  {name:<12} {result[name]:8.2f}" for name in levels),
        f"  {'swd_mean':<12} {result['swd_mean']:8.2f}",
        f"colour W1 distance: {result['color_w1']:.2f} grey levels (pixel values per channel, 0..255)",
    ]
    return "\n".join(lines)
