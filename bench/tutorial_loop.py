"""The baseline of `make bench`: the training loop of the diffusers tutorial "Train a diffusion model"
(https://huggingface.co/docs/diffusers/tutorials/basic_training, docs/source/en/tutorials/basic_training.md in
huggingface/diffusers), reproduced step for step so its per-step work is exactly what a tutorial user runs.

Kept as the tutorial has it: the TrainingConfig fields and defaults; the preprocessing (Resize, RandomHorizontalFlip,
ToTensor, Normalize, applied with dataset.set_transform); DataLoader(shuffle=True) with the default num_workers=0;
DDPMScheduler(num_train_timesteps=1000); AdamW(lr); get_cosine_schedule_with_warmup over len(dataloader) *
num_epochs; Accelerator(mixed_precision, gradient_accumulation_steps, log_with="tensorboard") preparing model,
optimizer, dataloader and LR schedule; per step: noise and timesteps drawn with the global RNG, add_noise,
accelerator.accumulate, backward, clip_grad_norm_(1.0), optimizer and LR steps, zero_grad, a tqdm bar with
set_postfix, `loss.detach().item()` and accelerator.log every step; evaluate() every save_image_epochs
(DDPMPipeline, 1,000 steps, a 4x4 make_image_grid) and save_pretrained every save_model_epochs and at the end.

What the benchmark sets, and nothing else differs:
- the UNet kwargs come from trainer.model.PRESETS: `tutorial` is the tutorial's UNet verbatim, `small` is the UNet
  `ddpm train --model_preset small` builds, so both loops train the identical model;
- image_size, train_batch_size, mixed_precision, num_epochs, save_*_epochs, output_dir, and the data: an image
  folder read with load_dataset("imagefolder", data_dir=...) (the tutorial's own tip for local images);
  push_to_hub is off (no network here);
- seed: torch.manual_seed(seed) first, so repeats are independent samples (the tutorial never seeds the global RNG,
  so on CPU every run of it would draw the same numbers from torch's fixed default seed);
- max_steps: stop after that many steps and skip the end-of-run evaluate/save (a prefix of a longer run);
- skip_evaluate: time-to-quality runs (bench/ttq.py) skip evaluate()'s 1,000-step DDPM grid, which does not change
  the weights (the pipeline is still saved and then scored by `ddpm eval`, as ours is);
- passive timing: seconds spent waiting in next(dataloader) for every step, written to bench_stats.json at the end
  (with the CUDA peak memory when on a GPU). It adds two clock reads per step and changes no work.

    python bench/tutorial_loop.py --data DIR --output_dir DIR --model_preset small --image_size 32 \
        --train_batch_size 16 --mixed_precision no --max_steps 200 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import load_dataset
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.utils import make_image_grid
from torchvision import transforms
from tqdm.auto import tqdm

from trainer.model import PRESETS


@dataclass
class TrainingConfig:
    image_size: int = 128  # the generated image resolution
    train_batch_size: int = 16
    eval_batch_size: int = 16  # how many images to sample during evaluation
    num_epochs: int = 50
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 500
    save_image_epochs: int = 10
    save_model_epochs: int = 30
    mixed_precision: str = "fp16"  # `no` for float32, `fp16` for automatic mixed precision
    output_dir: str = "ddpm-butterflies-128"
    push_to_hub: bool = False  # the tutorial's True needs the Hub; nothing is uploaded here
    overwrite_output_dir: bool = True
    seed: int = 0
    # --- set by the benchmark ---
    model_preset: str = "tutorial"
    data_dir: str = ""
    max_steps: int = 0  # 0: the whole run
    skip_evaluate: int = 0  # 1: no evaluate() grid (time to quality: the 1,000-step grid does not change the weights)


def build_dataloader(config: TrainingConfig) -> torch.utils.data.DataLoader:
    dataset = load_dataset("imagefolder", data_dir=config.data_dir, split="train")
    preprocess = transforms.Compose([
        transforms.Resize((config.image_size, config.image_size)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])

    def transform(examples):
        return {"images": [preprocess(image.convert("RGB")) for image in examples["image"]]}

    dataset.set_transform(transform)
    return torch.utils.data.DataLoader(dataset, batch_size=config.train_batch_size, shuffle=True)


def build_model(config: TrainingConfig) -> UNet2DModel:
    return UNet2DModel(sample_size=config.image_size, **PRESETS[config.model_preset])


def evaluate(config: TrainingConfig, epoch: int, pipeline: DDPMPipeline, num_inference_steps: int = 1000) -> None:
    """The tutorial's evaluate(); num_inference_steps is the pipeline's default (1000) unless the benchmark times
    a prefix of it."""
    images = pipeline(
        batch_size=config.eval_batch_size,
        generator=torch.manual_seed(config.seed),
        num_inference_steps=num_inference_steps,
    ).images
    image_grid = make_image_grid(images, rows=4, cols=4)
    test_dir = os.path.join(config.output_dir, "samples")
    os.makedirs(test_dir, exist_ok=True)
    image_grid.save(f"{test_dir}/{epoch:04d}.png")


class TimedLoader:
    """Passive instrumentation: yields the prepared DataLoader's batches, adding up the seconds spent in next()."""

    def __init__(self, loader, waits: list[float]):
        self.loader, self.waits = loader, waits

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - start)
            yield batch


def train_loop(config, model, noise_scheduler, optimizer, train_dataloader, lr_scheduler):
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard",
        project_dir=os.path.join(config.output_dir, "logs"),
    )
    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
        accelerator.init_trackers("train_example")

    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    waits: list[float] = []
    train_dataloader = TimedLoader(train_dataloader, waits)  # benchmark instrumentation

    global_step = 0
    for epoch in range(config.num_epochs):
        progress_bar = tqdm(total=len(train_dataloader), disable=not accelerator.is_local_main_process)
        progress_bar.set_description(f"Epoch {epoch}")

        for step, batch in enumerate(train_dataloader):
            clean_images = batch["images"]
            noise = torch.randn(clean_images.shape).to(clean_images.device)
            bs = clean_images.shape[0]
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (bs,), device=clean_images.device
            ).long()
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)

            with accelerator.accumulate(model):
                noise_pred = model(noisy_images, timesteps, return_dict=False)[0]
                loss = F.mse_loss(noise_pred, noise)
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            progress_bar.update(1)
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": global_step}
            progress_bar.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            global_step += 1
            if global_step == config.max_steps:  # benchmark: a prefix of the run ends here
                return accelerator, waits

        if accelerator.is_main_process:
            pipeline = DDPMPipeline(unet=accelerator.unwrap_model(model), scheduler=noise_scheduler)
            if ((epoch + 1) % config.save_image_epochs == 0 or epoch == config.num_epochs - 1) and not config.skip_evaluate:
                evaluate(config, epoch, pipeline)
            if (epoch + 1) % config.save_model_epochs == 0 or epoch == config.num_epochs - 1:
                pipeline.save_pretrained(config.output_dir)
    return accelerator, waits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="image folder (load_dataset('imagefolder', data_dir=...))")
    for name, default in vars(TrainingConfig()).items():
        if name not in ("data_dir", "push_to_hub", "overwrite_output_dir"):
            parser.add_argument(f"--{name}", type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    config = TrainingConfig(data_dir=args.pop("data"), **args)

    torch.manual_seed(config.seed)  # benchmark: independent repeats (see the module docstring)
    train_dataloader = build_dataloader(config)
    model = build_model(config)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=(len(train_dataloader) * config.num_epochs),
    )
    accelerator, waits = train_loop(config, model, noise_scheduler, optimizer, train_dataloader, lr_scheduler)
    accelerator.end_training()
    stats = {"data_wait_s": waits}
    if torch.cuda.is_available():
        stats["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
    with open(os.path.join(config.output_dir, "bench_stats.json"), "w") as f:
        json.dump(stats, f)


if __name__ == "__main__":
    main()
