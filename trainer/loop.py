"""train(config): setup (trainer.setup), then the step loop, evaluations, saves and the end of the run.

Every rank runs this same code. Signals are deferred while it runs: a SIGTERM/SIGINT is noticed at the next check
(every step with one process, every `preemption_check_steps` and every log with several), one checkpoint is
written, and `Stopped` ends the process with 143 (retry) or 130. A failed collective after this process's first
update is a lost peer (PeerLost, 143). Updates, sampler steps and finished saves are the stall deadline's progress
(trainer.stall: no progress for stall_timeout_seconds ends the process, 124).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import torch

from trainer import checkpoint, quality, sampling
from trainer.checkpoint import TrainState
from trainer.data import to_model_range
from trainer.diffusion import training_loss
from trainer.distributed import any_process, communication_failure, decided_by_main, sum_over_processes
from trainer.errors import DdpmError, Diverged, NonFiniteSamples, PeerLost, Stopped
from trainer.events import MilestoneEvents
from trainer.model import ema_weights
from trainer.run_dir import disk_full, write_marker
from trainer.sampling import SamplingInterrupted, sample_for_eval, shard, to_grid
from trainer.setup import Run, setup
from trainer.signals import SIGNALS
from trainer.tracking import StepStats


def train(config, stream=None, config_file: Path | None = None) -> TrainState:
    # Rank 0 posts the run's milestones as Kubernetes Events (best effort, never blocking: trainer.events).
    events = MilestoneEvents() if int(os.environ.get("RANK", "0")) == 0 else MilestoneEvents.off()
    run = None
    try:
        run = setup(config, stream, config_file, events)
        try:
            with SIGNALS.deferred():
                fit(run)
                finish(run)
        finally:
            run.stall.stop()
            run.tracker.close()
            if run.lock is not None:
                run.lock.release()
        return run.state
    except Stopped:
        step = run.state.global_step if run else 0
        events.preempted(step, str(run.run_dir.checkpoint(step)) if run else "")
        raise
    except Diverged as e:
        events.diverged(run.state.global_step if run else 0, str(e))
        raise
    except NonFiniteSamples as e:  # the saved pipeline's check (finish): the run is not marked complete
        events.nonfinite_samples(run.state.global_step if run else 0, str(e), final=True)
        raise
    except BaseException as e:
        if (lost := peer_lost(run, e)) is not None:  # not a failure of this run: no Failed event
            raise lost from e
        full = disk_full(e, "the run's outputs", config.output_dir, 0) if isinstance(e, Exception) and \
            not isinstance(e, DdpmError) else None  # any other write (the record, the marker): exit 2, says so
        events.failed(str(full or e).strip().splitlines()[0] if str(full or e).strip() else type(e).__name__)
        if full is not None:
            raise full from e
        raise
    finally:
        events.close(timeout_s=5.0)


def peer_lost(run: Run | None, error: BaseException) -> PeerLost | None:
    """PeerLost when `error` is a failed collective (or store call) after this process completed an optimizer
    update: another rank is gone. Before any update (the process group, the first all-reduce) it stays the error
    it is, exit 1."""
    failure = communication_failure(error) if run is not None else None
    updates = run.state.global_step - (run.resumed_step or 0) if run is not None else 0
    if failure is None or updates < 1:
        return None
    reason = (str(failure).strip().splitlines() or [""])[0][:300]
    return PeerLost(f"lost a peer process after {updates} optimizer updates in this process "
                    f"({type(failure).__name__}: {reason}); exiting 143 to rejoin: the workers restart and every "
                    "rank resumes from the newest checkpoint")


def fit(run: Run) -> None:
    """The step loop: one optimizer update per global batch (train_step); logs, stop checks, checkpoints and grids on
    their cadence."""
    config, state = run.config, run.state
    stats = StepStats(run.accelerator.device)
    run.unet.train()
    run.clock.start()
    run.stall.start("training")  # the stall deadline counts from here: start-up is never a stall
    for epoch in range(state.global_step // run.steps_per_epoch, run.num_epochs):
        if finished(run):
            break
        state.epoch = epoch
        for update, micro_batches in global_batches(run, epoch):
            train_step(run, stats, update, micro_batches)
            step = state.global_step
            if step % config.logging_steps == 0 or step == run.total_steps or run.clock.spent:
                stop = log_interval(run, stats, epoch)  # the interval's one sync; raises Diverged
            elif run.world == 1 or step % config.preemption_check_steps == 0:
                stop = any_process(run.accelerator, SIGNALS.received is not None)
            else:
                stop = False
            if stop:
                save_checkpoint(run)
                raise SIGNALS.stopped(f"checkpoint saved at step {step}")
            if step % config.checkpointing_steps == 0:
                save_checkpoint(run)
            if finished(run):
                run.clock.stop()
                break
        done = finished(run)
        if (epoch + 1) % config.save_image_epochs == 0 or done:
            try:
                with run.stall.phase("an evaluation"):
                    run.last_grid = evaluate(run, epoch) or run.last_grid
                run.stall.progress(f"the evaluation at step {state.global_step}")
            except EvaluationInterrupted:
                save_checkpoint(run)
                raise SIGNALS.stopped(f"evaluation interrupted; checkpoint saved at step {state.global_step}") from None
        if (epoch + 1) % config.save_model_epochs == 0 and not done:
            save_model(run)
    run.clock.stop()


def global_batches(run: Run, epoch: int):
    """(optimizer update, [(position in its global batch, micro-batch), ...]) for `epoch`'s whole global batches,
    continuing mid-epoch after a resume without replaying or skipping data. Rank r's m-th micro-batch is the
    dataloader's batch m x processes + r (Accelerate shards by batches), so position accumulation-index x processes
    + rank holds the same images for any split of the global batch into processes and accumulation steps."""
    accumulation, per_epoch = run.config.gradient_accumulation_steps, run.steps_per_epoch
    run.dataloader.set_epoch(epoch)
    done = max(0, run.state.global_step - epoch * per_epoch)  # this epoch's updates before a resume
    batches = run.accelerator.skip_first_batches(run.dataloader, done * accumulation) if done else run.dataloader
    group = []
    for images in run.tracker.timed(batches):
        if done == per_epoch:
            return  # the rest cannot fill a global batch: every epoch has the same whole updates
        group.append((len(group) * run.world + run.rank, images))
        if len(group) == accumulation:
            yield epoch * per_epoch + done, group
            done, group = done + 1, []


def finished(run: Run) -> bool:
    """The run's length is reached: max_train_steps/num_epochs, or the max_train_seconds budget (the same answer on
    every rank at the same step: trainer/budget.py)."""
    return run.state.global_step >= run.total_steps or run.clock.spent


def train_step(run: Run, stats: StepStats, update: int, micro_batches: list[tuple[int, torch.Tensor]]) -> None:
    """One optimizer update, in order. No host sync (but foreach AdamW's skip decision); nothing here per micro-batch
    that the maths does not need."""
    accelerator, config, unet = run.accelerator, run.config, run.unet
    accumulation = len(micro_batches)
    for i, (position, images) in enumerate(micro_batches):
        clean = to_model_range(images).contiguous(memory_format=run.memory_format)
        # DDP all-reduces the summed gradients in the backward of the update's last micro-batch only
        with accelerator.no_sync(unet) if i < accumulation - 1 else nullcontext():
            # noise, timesteps and flips keyed by (seed, update, position); forward; MSE to the target
            loss = training_loss(run.forward, run.noise_scheduler, clean, seed=config.seed, update=update,
                                 position=position, random_flip=config.random_flip,
                                 loss_weighting=config.loss_weighting, snr_gamma=config.snr_gamma)
            accelerator.backward(loss / accumulation)  # gradients of the mean over the global batch
        stats.add_loss(loss.detach())
    grad_norm = accelerator.clip_grad_norm_(run.parameters, config.max_grad_norm)
    bad = ~torch.isfinite(grad_norm)  # a non-finite loss or gradient: this update leaves the weights as they are
    if skip_update_if_nonfinite(run.optimizer, bad, config.optimizer_impl):
        run.optimizer.step()
    run.lr_scheduler.step()  # counted in updates, skipped or not
    if run.ema is not None:
        run.ema.step(run.parameters)
    run.optimizer.zero_grad(set_to_none=True)
    stats.add_update(grad_norm, bad)
    run.state.global_step += 1
    run.stall.progress(f"optimizer update {run.state.global_step}")
    run.tracker.step()
    if run.world == 1:  # the only rank: its clock is the agreed one (several: shared at each log, trainer/budget.py)
        run.clock.agree(run.clock.seconds())


def skip_update_if_nonfinite(optimizer, bad: torch.Tensor, impl: str) -> bool:
    """Whether to call optimizer.step(). Fused AdamW skips on device: no host sync. Foreach AdamW cannot, so it
    pays one host sync per update to decide."""
    if impl == "fused":
        # No public argument takes it: fused AdamW reads the `found_inf` attribute that torch.amp.GradScaler sets.
        optimizer.optimizer.found_inf = bad.float()
        return True
    return not bad.item()


def log_interval(run: Run, stats: StepStats, epoch: int) -> bool:
    """Reduce and log the interval's statistics; returns whether any rank asked to stop. Raises Diverged."""
    step = run.state.global_step
    values = stats.read(run.accelerator, step - run.tracker.last_step, stop=SIGNALS.received is not None,
                        seconds=run.clock.seconds() if run.accelerator.is_main_process else 0.0)
    run.clock.agree(values["seconds"])  # rank 0's clock, the same on every rank: max_train_seconds decides on it
    run.state.nonfinite_total += int(values["nonfinite_steps"])
    run.tracker.log(step, epoch, {"loss": values["loss"], "lr": run.lr_scheduler.get_last_lr()[0],
                                  "grad_norm": values["grad_norm"], "nonfinite_steps": values["nonfinite_steps"]},
                    images_per_step=run.global_batch)
    if values["worst_streak"] >= run.config.max_nonfinite_steps:
        raise Diverged(divergence_message(run, int(values["worst_streak"]), int(values["streak"])))
    return values["stop"]


def divergence_message(run: Run, worst: int, streak: int) -> str:
    """Which checkpoint to go back to: never 'intact' for one saved during the streak, or the one the run resumed
    from and diverged again soon after (resuming from it repeats the same computation)."""
    step, saved = run.state.global_step, run.last_checkpoint_step
    first_bad = step - streak + 1 if streak else None
    text = (f"{worst} consecutive non-finite losses by step {step} (max_nonfinite_steps "
            f"{run.config.max_nonfinite_steps}); the weights were not updated by them. ")
    if saved < 0:
        text += "No checkpoint was written before them. "
    elif first_bad is not None and saved >= first_bad:
        text += (f"The newest checkpoint, checkpoint-{saved}, was saved during them: resuming from it repeats them; "
                 "resume from an older one (resume_from_checkpoint <path>). ")
    elif saved == run.resumed_step:
        text += (f"The run resumed from checkpoint-{saved} and diverged {step - saved} steps later: that checkpoint "
                 "is likely the source, and resuming from it will diverge again. ")
    else:
        text += f"The newest checkpoint, checkpoint-{saved}, predates them. "
    return text + "Lower learning_rate (or max_grad_norm), or check the data."


def sampler_step(run: Run) -> bool:
    """Before each sampler step of an evaluation: progress for the stall deadline, and whether to stop (a signal:
    host-side flags only, no sync)."""
    run.stall.progress("a sampler step of an evaluation")
    return SIGNALS.received is not None


class EvaluationInterrupted(Exception):
    """A stop request arrived during an evaluation, on some rank: every rank stops sampling and checkpoints."""


def evaluate(run: Run, epoch: int) -> Path | None:
    """Every rank samples its share of the images (EMA weights); rank 0 scores them and saves the grid. NaN/inf
    images are reported (console, TensorBoard eval/nonfinite_images, a Warning Event), never saved or scored, and
    training goes on; the end of the run checks the saved pipeline (finish)."""
    accelerator, config = run.accelerator, run.config
    model = accelerator.unwrap_model(run.unet)
    model.eval()
    num_images = max(config.eval_batch_size, run.num_quality)
    indices = shard(num_images, run.rank, run.world)
    images, failure, interrupted = None, None, False
    with ema_weights(model, run.ema):
        try:
            images = sample_for_eval(model, config, run.noise_scheduler.config, indices,
                                     should_stop=lambda: sampler_step(run))
        except NonFiniteSamples as e:  # not raised: the other ranks would wait for this one in the gather
            failure = e
        except SamplingInterrupted:  # likewise: every rank learns it in the one all-reduce below
            interrupted = True
    model.train()
    bad, checked, stops = sum_over_processes(
        accelerator, [failure.bad, failure.checked, interrupted] if failure else [0, len(indices), interrupted])
    if stops:
        raise EvaluationInterrupted
    step = run.state.global_step
    accelerator.log({"eval/nonfinite_images": bad}, step=step)
    if bad:
        error = NonFiniteSamples(sampling.describe_eval(config), int(bad), int(checked))
        run.tracker.message(f"WARNING: evaluation at step {step}: {error}. No grid saved, no score; training goes on")
        run.events.nonfinite_samples(step, str(error))
        return None
    images = accelerator.gather(images)[:num_images]
    if not accelerator.is_main_process:
        return None
    step = run.state.global_step
    if run.reference is not None:
        scores = quality.swd(run.reference, images[:run.num_quality], seed=config.seed)
        accelerator.log({f"quality/{name}": value for name, value in scores.items()}, step=step)
        run.tracker.message(f"sample quality at step {step}: {quality.format_scores(scores)}")
        run.events.evaluated(step, scores)
    grid = to_grid(images[: config.eval_batch_size])
    path = run.run_dir.save_grid(grid, epoch)
    run.tracker.image("samples", grid, step)
    run.tracker.message(f"saved sample grid {path}")
    return path


def save_model(run: Run) -> None:
    """The pipeline with the EMA weights (rank 0); raises Diverged rather than save non-finite weights."""
    with run.stall.phase("the pipeline's save"):
        if run.accelerator.is_main_process:
            model = run.accelerator.unwrap_model(run.unet)
            with ema_weights(model, run.ema):
                run.run_dir.save_pipeline(model, run.noise_scheduler)
            run.tracker.message(f"saved pipeline to {run.run_dir.root}")
        run.accelerator.wait_for_everyone()
    run.stall.progress(f"the pipeline saved at step {run.state.global_step}")


def check_saved_pipeline(run: Run) -> None:
    """Rank 0 samples a few images from the pipeline as saved, with its own scheduler (what
    DDPMPipeline.from_pretrained(output_dir) gives), at num_inference_steps; NaN/inf ones raise NonFiniteSamples
    on every rank before the completion marker is written (exit 3)."""
    config = run.config
    tick = run.stall.ticker("a sampler step of the saved pipeline's check")
    with run.stall.phase("the saved pipeline's check"):
        drawn = decided_by_main(run.accelerator, lambda: sampling.check_saved_pipeline(
            run.run_dir.root, num_inference_steps=config.num_inference_steps, seed=config.seed,
            device=run.accelerator.device, should_stop=tick))
    run.tracker.message(f"the saved pipeline samples finite images ({drawn}, its own scheduler)")


def save_checkpoint(run: Run) -> None:
    run.state.training_seconds = run.clock.seconds()  # rank 0's is the one written
    with run.stall.phase(f"the save of checkpoint-{run.state.global_step}"):
        path = checkpoint.save_checkpoint(run.accelerator, run.state, run.run_dir,
                                          run.config.checkpoints_total_limit, run.checkpoint_bytes)
    run.stall.progress(f"checkpoint-{run.state.global_step} saved")
    run.last_checkpoint_step = run.state.global_step
    run.tracker.message(f"saved checkpoint {path} (step {run.state.global_step})")
    run.events.checkpoint(run.state.global_step, run.total_steps, str(path), loss=run.tracker.last_loss,
                          eta_seconds=run.tracker.last_eta_s)


def finish(run: Run) -> None:
    """Final checkpoint, pipeline (checked to sample finite images) and model card, then the completion marker, last.
    A signal that arrives during these saves lets them finish but not the marker: the retry resumes at the final
    step and completes the end."""
    config, state, accelerator = run.config, run.state, run.accelerator
    if run.last_checkpoint_step != state.global_step:
        save_checkpoint(run)
    if run.last_grid is None and accelerator.is_main_process:
        run.last_grid = run.run_dir.last_grid()
    save_model(run)
    check_saved_pipeline(run)
    if any_process(accelerator, SIGNALS.received is not None):
        raise SIGNALS.stopped(f"checkpoint and pipeline saved at step {state.global_step}; the retry marks the run "
                              "complete")
    run.stall.stop()  # the rest is rank 0's few writes and the push, which has its own deadline
    if accelerator.is_main_process:
        run.run_dir.write_model_card(config, state.global_step, run.last_grid)
        write_marker(config, run.run_dir, run.record, state.global_step, state.epoch)
        run.events.completed(state.global_step, str(run.run_dir.root))
        run.tracker.message(
            f"done: {state.global_step} steps (run {run.record.run_id}).\n"
            f"  samples:     {run.run_dir.samples}\n"
            f"  pipeline:    {run.run_dir.root} (DDPMPipeline.from_pretrained)\n"
            f"  tensorboard: tensorboard --logdir {run.run_dir.logs}")
        if config.push_to_hub:
            from trainer.hub import PushOptions, push

            push(config, run.run_dir, PushOptions(), say=lambda message, stream=None: run.tracker.message(message))
    accelerator.wait_for_everyone()
