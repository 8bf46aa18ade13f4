"""Per-model measurements for bench/run.py, each in a fresh process; prints one JSON object as its last line.

    python bench/model_costs.py flops --model_preset tutorial --image_size 128 --batch 16
    python bench/model_costs.py grid-tutorial --model_preset small --image_size 32 --mixed_precision no --steps 1000 --output_dir DIR
    python bench/model_costs.py grid-ours --model_preset small --image_size 32 --output_dir DIR

flops: FLOPs of one training forward + backward through the UNet per image (torch.utils.flop_counter: matmuls,
convolutions and attention, a multiply-add counted as 2; GroupNorm, SiLU and the optimizer are not counted, as MFU
figures do not), and the device's peak FLOP/s where known.

grid-*: seconds to draw one 16-image evaluation grid with random weights (speed does not depend on the weights).
The tutorial's evaluate() runs DDPM for 1,000 steps; with --steps K < 1000 it runs K steps after a 1-step warm-up
and the time is scaled by 1000/K (each DDPM step is one UNet call on the same batch, so the cost is linear).
Ours is trainer.sampling.sample_for_eval at the default TrainingConfig (what `ddpm train` draws), in full.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import DDPMScheduler

from trainer.model import PRESETS


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def flops_per_image(preset: str, image_size: int, batch: int) -> dict:
    """ddpm train's own count (trainer.model: forward + backward on a meta-device copy, so no compute), with the
    device's dense peak FLOP/s from the same table ddpm train uses for its `mfu` scalar."""
    from trainer.config import TrainingConfig
    from trainer.model import PEAK_TFLOPS, training_flops_per_image

    config = TrainingConfig(model_preset=preset, image_size=image_size, train_batch_size=batch)
    name = device_name()
    # fp32 counts TF32 tensor cores: PyTorch lets cuDNN convolutions use TF32 by default, tutorial and ours alike.
    peak = next(({"bf16": p["mixed"] * 1e12, "no": p["tf32"] * 1e12} for key, p in PEAK_TFLOPS if key in name), None)
    return {"flops_per_image": training_flops_per_image(config), "peak_flops": peak}


def grid_tutorial(preset: str, image_size: int, mixed_precision: str, steps: int, output_dir: str) -> dict:
    from accelerate import Accelerator
    from diffusers import DDPMPipeline

    from tutorial_loop import TrainingConfig, build_model, evaluate

    config = TrainingConfig(model_preset=preset, image_size=image_size, mixed_precision=mixed_precision,
                            output_dir=output_dir)
    # As in the tutorial: the pipeline gets accelerator.unwrap_model(model), which keeps Accelerate's autocast
    # wrapper, so a bf16 run also samples under bf16 autocast.
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    model = accelerator.prepare(build_model(config))
    pipeline = DDPMPipeline(unet=accelerator.unwrap_model(model), scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipeline.set_progress_bar_config(disable=True)
    if steps < 1000:
        evaluate(config, 0, pipeline, num_inference_steps=1)  # warm-up: one-time kernel setup is not scaled up
    start = time.perf_counter()
    evaluate(config, 0, pipeline, num_inference_steps=steps)
    seconds = time.perf_counter() - start
    return {"seconds": seconds * 1000 / steps, "measured_steps": steps, "measured_seconds": seconds}


def grid_ours(preset: str, image_size: int, output_dir: str) -> dict:
    from pathlib import Path

    from trainer.config import TrainingConfig
    from trainer.model import build_noise_scheduler, build_unet
    from trainer.sampling import sample_for_eval, to_grid

    config = TrainingConfig(model_preset=preset, image_size=image_size, output_dir=Path(output_dir))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = build_unet(config).to(device).eval()
    scheduler_config = build_noise_scheduler(config).config
    # warm-up, as the tutorial's timing gets: one-time kernel setup (oneDNN/cuDNN primitives) is not the grid's cost
    sample_for_eval(unet, config.model_copy(update={"num_inference_steps": 1}), scheduler_config, range(config.eval_batch_size))
    start = time.perf_counter()
    images = sample_for_eval(unet, config, scheduler_config, range(config.eval_batch_size))
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    to_grid(images).save(Path(output_dir) / "grid.png")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "sampler": f"{config.eval_scheduler} {config.num_inference_steps} steps "
                                           f"{config.eval_mixed_precision}", "images": config.eval_batch_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("flops", "grid-tutorial", "grid-ours"))
    parser.add_argument("--model_preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--image_size", type=int, required=True)
    parser.add_argument("--batch", type=int, default=16, help="flops: the training micro-batch it is counted on")
    parser.add_argument("--mixed_precision", default="no")
    parser.add_argument("--steps", type=int, default=1000, help="DDPM steps actually run for grid-tutorial")
    parser.add_argument("--output_dir", default="runs/bench/grid")
    args = parser.parse_args(argv)
    if args.what == "flops":
        result = flops_per_image(args.model_preset, args.image_size, args.batch)
    elif args.what == "grid-tutorial":
        result = grid_tutorial(args.model_preset, args.image_size, args.mixed_precision, args.steps, args.output_dir)
    else:
        result = grid_ours(args.model_preset, args.image_size, args.output_dir)
    result.update(device=device_name(), torch_threads=torch.get_num_threads())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
