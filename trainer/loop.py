"""train(config): set up from the config, then the step loop. Every rank runs this same code."""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler

from trainer import checkpoint, outputs, quality
from trainer.checkpoint import TrainState
from trainer.config import TrainingConfig, config_yaml
from trainer.data import build_dataloader, to_model_range
from trainer.data_cache import training_dataset
from trainer.diffusion import training_loss
from trainer.distributed import Preemption, local_world_size
from trainer.model import build_ema, build_noise_scheduler, build_unet, count_parameters
from trainer.perf import peak_flops, training_flops_per_image
from trainer.sampling import sample_for_eval, shard, to_grid
from trainer.tracking import Tracker

log = logging.getLogger(__name__)


class Preempted(Exception):
    """SIGTERM was handled: a checkpoint was written and the process should exit with EXIT_PREEMPTED."""


class Diverged(Exception):
    """Too many consecutive non-finite losses; the newest checkpoint predates them."""


def build_accelerator(config: TrainingConfig) -> Accelerator:
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # Accelerate sets up gloo for several CPU processes only when told
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(config.output_dir), logging_dir=str(config.logging_dir)),
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=config.seed, non_blocking=torch.cuda.is_available()  # with pinned memory
        ),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.process_group_timeout_seconds))],
        step_scheduler_with_optimizer=False,  # we step the LR schedule once per optimizer update ourselves
    )


def skip_update_if_nonfinite(optimizer, bad: torch.Tensor, impl: str) -> bool:
    """Whether to call optimizer.step(). Fused AdamW skips on device (it reads `found_inf`, as under AMP): no
    host sync. Foreach AdamW cannot, so it pays one host sync per update to decide."""
    if impl == "fused":
        optimizer.optimizer.found_inf = bad.float()
        return True
    return not bad.item()


def set_backend_flags(config: TrainingConfig) -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.allow_tf32
        torch.backends.cudnn.benchmark = config.cudnn_benchmark


@contextmanager
def ema_weights(model, ema):
    """Temporarily swap the EMA weights into `model` (for sampling and saving)."""
    if ema is None:
        yield model
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())


def train(config: TrainingConfig, stream=None) -> TrainState:
    accelerator = build_accelerator(config)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(config.seed)  # weight init only: noise, flips and data order have their own seeded streams
    set_backend_flags(config)

    # --- output_dir: every rank checks, rank 0 writes -------------------------------------------------------
    clear = outputs.check_output_dir(config)
    unet = build_unet(config)
    if accelerator.is_main_process:
        if clear:
            outputs.clear_output_dir(config)
        checkpoint.remove_incomplete(config.output_dir)
    accelerator.wait_for_everyone()
    outputs.preflight(config, checkpoint.checkpoint_bytes_estimate(count_parameters(unet), config.use_ema))
    if accelerator.is_main_process:
        outputs.write_resolved_config(config)

    # --- data, model, optimizer ---------------------------------------------------------------------------
    source, dataset, data_note = training_dataset(config, accelerator.local_main_process_first)
    dataloader = build_dataloader(config, dataset, local_world_size())
    noise_scheduler = build_noise_scheduler(config)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    unet.to(memory_format=memory_format)
    ema = build_ema(config, unet)
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
        fused=config.optimizer_impl == "fused", foreach=config.optimizer_impl == "foreach",
    )
    unet, optimizer, dataloader = accelerator.prepare(unet, optimizer, dataloader)
    # Only the training step is compiled (as Accelerate does, around the DDP wrapper): checkpoints keep their keys
    # and the sample grids run eager instead of compiling again for their shapes and precision.
    forward = torch.compile(unet) if config.torch_compile else unet
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    steps_per_epoch = math.ceil(len(dataloader) / config.gradient_accumulation_steps)
    if steps_per_epoch == 0:
        raise outputs.ConfigError([
            f"the dataset ({len(source)} images) is smaller than one global batch "
            f"({config.train_batch_size} x {world} processes); lower train_batch_size"
        ])
    total_steps = config.max_train_steps or config.num_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    # Counted in optimizer updates: warmup N means N updates whatever the accumulation and world size.
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer=optimizer.optimizer,
        num_warmup_steps=config.lr_warmup_steps, num_training_steps=total_steps,
    )
    accelerator.register_for_checkpointing(lr_scheduler)

    # --- resume ----------------------------------------------------------------------------------------------
    state = TrainState()
    resume = checkpoint.resolve_resume(config)
    if resume is not None:
        accelerator.load_state(str(resume))
        state.load_state_dict(json.loads((resume / checkpoint.STATE_FILE).read_text()))

    accelerator.init_trackers("train")
    flops, peak = training_flops_per_image(config), peak_flops(config, accelerator.device)
    tracker = Tracker(accelerator, total_steps, state.global_step, stream,
                      flops_per_image=flops, peak_flops=peak * world if peak else None)  # MFU of all devices
    global_batch = config.global_batch_size(world)
    tracker.message(
        f"dataset {source.name}: {len(source)} images"
        + (f", skipped {len(source.skipped)} unreadable: " + "; ".join(source.skipped[:5]) if source.skipped else "")
    )
    tracker.message(
        f"global batch {global_batch} = {config.train_batch_size} per process x {config.gradient_accumulation_steps} "
        f"accumulation x {world} processes | {steps_per_epoch} steps/epoch | {total_steps} total steps "
        f"({num_epochs} epochs) | UNet {count_parameters(unet):,} parameters | {accelerator.device} {config.mixed_precision}"
    )
    tracker.message(data_note)
    tracker.message(f"{flops / 1e9:.2f} GFLOP per trained image (forward+backward)")
    tracker.message(
        f"resumed from {resume} at step {state.global_step} epoch {state.global_step // steps_per_epoch}"
        if resume else "starting fresh at step 0 (no checkpoint to resume)"
    )
    tracker.text("config", "```yaml\n" + config_yaml(config) + "```")
    if source.skipped:
        tracker.text("data/skipped", "\n".join(source.skipped))
    num_quality = quality.num_quality_images(config, len(dataset))  # scored at each evaluation (0: off)
    reference = None  # the real images they are compared with: fixed for the run, rank 0 only
    if num_quality and accelerator.is_main_process:
        reference = quality.real_images(config, num_quality, dataset=dataset, device=accelerator.device)
        tracker.message(f"sample quality: {num_quality} generated vs {num_quality} training images at each evaluation")

    def evaluate(epoch: int) -> Path | None:
        """Every rank samples its share of the images (EMA weights); rank 0 scores them and saves the grid."""
        model = accelerator.unwrap_model(unet)
        model.eval()
        num_images = max(config.eval_batch_size, num_quality)
        with ema_weights(model, ema):
            images = sample_for_eval(model, config, noise_scheduler.config, shard(num_images, rank, world))
        model.train()
        images = accelerator.gather(images)[:num_images]
        if not accelerator.is_main_process:
            return None
        if reference is not None:
            scores = quality.swd(reference, images[:num_quality], seed=config.seed)
            accelerator.log({f"quality/{name}": value for name, value in scores.items()}, step=state.global_step)
            tracker.message(f"sample quality at step {state.global_step}: {quality.format_scores(scores)}")
        grid = to_grid(images[: config.eval_batch_size])
        path = Path(config.output_dir) / "samples" / f"{epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        tracker.image("samples", grid, state.global_step)
        tracker.message(f"saved sample grid {path}")
        return path

    def save_model() -> None:
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(unet)
            with ema_weights(model, ema):
                outputs.save_pipeline(config, model, noise_scheduler)
            tracker.message(f"saved pipeline to {config.output_dir}")
        accelerator.wait_for_everyone()

    def save_checkpoint() -> None:
        path = checkpoint.save_checkpoint(accelerator, state, config.output_dir, config.checkpoints_total_limit)
        tracker.message(f"saved checkpoint {path} (step {state.global_step})")

    # --- the loop ----------------------------------------------------------------------------------------------
    preemption = Preemption(config.preemption_grace_seconds).install()
    stats = torch.zeros(4, device=accelerator.device)  # finite loss sum, finite count, grad-norm sum, non-finite
    consecutive_bad = torch.zeros((), device=accelerator.device)
    worst_bad = torch.zeros((), device=accelerator.device)
    last_grid, last_checkpoint_step = None, state.global_step if resume else -1
    start_epoch = state.global_step // steps_per_epoch
    skip = (state.global_step % steps_per_epoch) * config.gradient_accumulation_steps
    unet.train()
    try:
        for epoch in range(start_epoch, num_epochs if state.global_step < total_steps else start_epoch):
            state.epoch = epoch
            dataloader.set_epoch(epoch)
            first = skip if epoch == start_epoch else 0
            batches = accelerator.skip_first_batches(dataloader, first) if first else dataloader
            for i, images in enumerate(tracker.timed(batches), start=first):
                clean = to_model_range(images).contiguous(memory_format=memory_format)
                with accelerator.accumulate(unet):
                    loss = training_loss(forward, noise_scheduler, clean, seed=config.seed,
                                         micro_step=epoch * len(dataloader) + i, rank=rank, world_size=world,
                                         random_flip=config.random_flip)
                    accelerator.backward(loss)
                    update = True
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
                        bad = ~torch.isfinite(grad_norm)
                        update = skip_update_if_nonfinite(optimizer, bad, config.optimizer_impl)
                    if update:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                finite = torch.isfinite(loss.detach())
                stats[0] += torch.where(finite, loss.detach(), 0.0)
                stats[1] += finite
                if not accelerator.sync_gradients:
                    continue

                if ema is not None:
                    ema.step(accelerator.unwrap_model(unet).parameters())
                lr_scheduler.step()
                state.global_step += 1
                tracker.step()
                stats[2] += torch.where(bad, 0.0, grad_norm)
                stats[3] += bad
                consecutive_bad = (consecutive_bad + 1) * bad
                worst_bad = torch.maximum(worst_bad, consecutive_bad)
                step = state.global_step

                stop = preemption.requested if world == 1 else False
                if step % config.logging_steps == 0 or step == total_steps:
                    flag = torch.tensor([float(preemption.requested)], device=accelerator.device)
                    values = accelerator.reduce(torch.cat([stats, worst_bad[None], flag]), "sum").tolist()  # the sync
                    updates = config.logging_steps if step % config.logging_steps == 0 else step % config.logging_steps
                    state.nonfinite_total += int(values[3] / world)
                    tracker.log(step, epoch, {
                        "loss": values[0] / max(values[1], 1.0),
                        "lr": lr_scheduler.get_last_lr()[0],
                        "grad_norm": values[2] / world / max(updates - values[3] / world, 1.0),
                        "nonfinite_steps": values[3] / world,
                    }, images_per_step=config.global_batch_size(world))
                    stats.zero_()
                    worst_bad.zero_()
                    if values[4] / world >= config.max_nonfinite_steps:
                        raise Diverged(
                            f"{int(values[4] / world)} consecutive non-finite losses by step {step} "
                            f"(max_nonfinite_steps {config.max_nonfinite_steps}); lower learning_rate or check the data. "
                            f"Weights were not updated by them; the newest checkpoint is intact."
                        )
                    stop = values[5] > 0
                if stop:
                    save_checkpoint()
                    raise Preempted(f"preempted at step {step}: checkpoint saved, exiting to be retried")
                if step % config.checkpointing_steps == 0:
                    save_checkpoint()
                    last_checkpoint_step = step
                if step >= total_steps:
                    break

            done = state.global_step >= total_steps
            if (epoch + 1) % config.save_image_epochs == 0 or done:
                last_grid = evaluate(epoch) or last_grid
            if (epoch + 1) % config.save_model_epochs == 0 and not done:
                save_model()
            if done:
                break

        # --- the end: final checkpoint, pipeline, model card, then the marker the push Job waits for --------
        if last_checkpoint_step != state.global_step:
            save_checkpoint()
        if last_grid is None and accelerator.is_main_process:
            grids = sorted((Path(config.output_dir) / "samples").glob("*.png"))
            last_grid = grids[-1] if grids else None
        save_model()
        if accelerator.is_main_process:
            outputs.write_model_card(config, last_grid, state.global_step)
            outputs.write_complete_marker(config, state.global_step, state.epoch)
            tracker.message(
                f"done: {state.global_step} steps.\n"
                f"  samples:     {Path(config.output_dir) / 'samples'}\n"
                f"  pipeline:    {config.output_dir} (DDPMPipeline.from_pretrained)\n"
                f"  tensorboard: tensorboard --logdir {config.logging_dir}"
            )
        accelerator.wait_for_everyone()
    finally:
        preemption.uninstall()
        tracker.close()
    return state
