"""setup(config) -> Run: everything the step loop needs, with every check done before the first byte is written.

The order is the guarantee. (1) Read-only checks on rank 0: what output_dir holds and whether this run may use it,
the output_dir lock (the one thing written early, and removed again if a later check fails), which checkpoint is
intact, free space, what a push at the end needs. (2) The data, on every rank: a folder or Hub dataset that cannot
be used stops here, and a cache that could not be built completely leaves nothing. (3) Only then the run begins:
an old run is cleared if asked, damaged checkpoints are set aside, the config is recorded and the completion
marker removed. (4) Model, optimizer, resume, trackers. A user error before (3) exits 2 with output_dir as it was,
so the corrected command simply works.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration, set_seed

from trainer import checkpoint, outputs
from trainer.budget import TrainClock, build_lr_scheduler
from trainer.checkpoint import Resume, TrainState
from trainer.config import TrainingConfig
from trainer.data import build_dataloader, num_quality_images, real_images
from trainer.data_cache import cache_path, training_dataset
from trainer.distributed import decided_by_main, local_world_size
from trainer.errors import ConfigError, OutputDirError
from trainer.events import MilestoneEvents
from trainer.model import (ModelSpec, build_ema, build_noise_scheduler, build_unet, model_spec, peak_flops,
                           set_backend_flags, training_flops_per_image)
from trainer.outputs import OutputDirLock, holder_info
from trainer.run_dir import (HISTORY_NAME, TRACKER_RUN_NAME, RecordedStart, RunDir, config_values, config_yaml,
                             kubernetes_workload, record_start)
from trainer.signals import SIGNALS
from trainer.stall import StallWatchdog
from trainer.tracking import Tracker


@dataclass
class Run:
    """One training run, as set up: what the loop reads and updates."""

    config: TrainingConfig
    run_dir: RunDir  # output_dir: every file the run reads or writes there
    accelerator: Accelerator
    tracker: Tracker
    record: RecordedStart
    lock: OutputDirLock | None
    events: MilestoneEvents  # Kubernetes Events (rank 0; no-op elsewhere)
    stall: StallWatchdog  # stall_timeout_seconds (trainer/stall.py)
    unet: torch.nn.Module  # prepared (DDP-wrapped with several processes)
    forward: torch.nn.Module  # the same, compiled when torch_compile
    parameters: list[torch.nn.Parameter]  # the UNet's, listed once: clipped, updated and averaged every step
    memory_format: torch.memory_format
    ema: object | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    noise_scheduler: object
    dataloader: torch.utils.data.DataLoader
    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    resumed_step: int | None  # where this process started from a checkpoint (None: fresh)
    num_quality: int  # images scored at each evaluation (0: off)
    reference: torch.Tensor | None  # the real images they are scored against (rank 0)
    checkpoint_bytes: int
    # What the loop changes: the checkpointed state, the training clock, and where the last save and grid are.
    state: TrainState
    clock: TrainClock  # max_train_seconds (trainer/budget.py)
    last_checkpoint_step: int = -1
    last_grid: Path | None = None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def global_batch(self) -> int:
        return self.config.global_batch_size


def build_accelerator(config: TrainingConfig, run_dir: RunDir) -> Accelerator:
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # Accelerate sets up gloo for several CPU processes only when told
        mixed_precision=config.mixed_precision,  # accumulation is the loop's (loop.train_step), not Accelerate's
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir.root), logging_dir=str(run_dir.logs)),
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=config.seed, non_blocking=torch.cuda.is_available()  # with pinned memory
        ),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.process_group_timeout_seconds))],
        step_scheduler_with_optimizer=False,  # we step the LR schedule once per optimizer update ourselves
    )


# ---- (1) checks, rank 0 ------------------------------------------------------------------------------------------

@dataclass
class Preflight:
    """What the read-only checks decided: what to do with output_dir, and which checkpoint to resume (its state)."""

    plan: outputs.OutputPlan
    resume: Resume
    resume_state: dict | None
    checkpoint_bytes: int  # the size of one checkpoint of this model, estimated


class UndoableWrites:
    """Rank 0's writes before the run begins (output_dir itself if it was missing, the lock file, the data cache it
    built), undone when a check fails so that an exit 2 leaves output_dir as it was, or not there at all."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self.out = run_dir.root
        self.cache_dir = run_dir.data_cache
        self.out_existed, self.cache_existed = self.out.exists(), self.cache_dir.exists()
        self.cache_before = set(os.listdir(self.cache_dir)) if self.cache_dir.is_dir() else set()
        self.cache_files: Path | None = None  # the cache this run uses: its files are removed if this run made them
        self.lock: OutputDirLock | None = None

    def undo(self) -> None:
        if self.lock is not None:
            self.lock.release(remove=self.lock.created_file)
        if self.cache_files is not None:  # e.g. the dataset turned out smaller than a global batch (exit 2)
            stem = self.cache_files.stem
            for path in self.cache_files.parent.glob(f"{stem}.*"):
                if path.name not in self.cache_before:
                    path.unlink(missing_ok=True)
        for folder, existed in ((self.cache_dir, self.cache_existed), (self.out, self.out_existed)):
            if not existed and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def check_before_writing(config: TrainingConfig, run_dir: RunDir, config_file: Path | None,
                         writes: UndoableWrites, spec: ModelSpec) -> tuple[TrainingConfig, Preflight]:
    """Rank 0's read-only checks (and the lock) for `config` as resolved (its global batch): the config, and what
    the checks decided. `spec` is the run's model (trainer.model.model_spec)."""
    plan = outputs.plan_output_dir(config, run_dir, config_file)
    writes.lock = outputs.take_lock(run_dir, holder_info(kubernetes_workload()))
    resume = Resume(None)
    if plan.action != "clear":  # a cleared run's checkpoints are the old run's, never resumed
        resume = checkpoint.resolve_resume(config.resume_from_checkpoint, run_dir)
    elif Path(config.resume_from_checkpoint).is_dir() and outputs.inside(
            Path(config.resume_from_checkpoint).resolve(), run_dir.root.resolve()):
        raise OutputDirError(f"resume_from_checkpoint {config.resume_from_checkpoint} is inside the old run that "
                             "overwrite_output_dir would delete; copy it elsewhere first")
    resume_state = None
    if resume.path is not None:
        resume_state = json.loads((resume.path / checkpoint.STATE_FILE).read_text())
        checkpoint.check_model(resume_state, spec.config, resume.path, spec.preset)
    num_params = spec.parameters
    checkpoint_bytes = checkpoint.checkpoint_bytes_estimate(num_params, config.use_ema)
    existing = len(checkpoint.complete_checkpoints(run_dir)) - len(resume.damaged) - len(resume.abandoned)
    if resume.branch is not None and not Path(resume.branch["from"]).is_absolute():
        existing -= 1  # the checkpoint gone back to stays besides the newest checkpoints_total_limit
    outputs.check_space(run_dir.root, config.checkpoints_total_limit, checkpoint_bytes, num_params * 4,
                        0 if plan.action == "clear" else existing)
    if config.push_to_hub:
        from trainer.hub import check_can_push

        check_can_push()
    return config, Preflight(plan, resume, resume_state, checkpoint_bytes)


def check_not_shorter(config: TrainingConfig, checked: Preflight, steps_per_epoch: int) -> None:
    """A run cannot end before the step it resumes at: finishing would mark it complete at that step under a config
    that asks for fewer (and a push would take that model for the shorter run). Going back is a rollback by path."""
    resumed = (checked.resume_state or {}).get("global_step", 0)
    total = config.max_train_steps or config.num_epochs * steps_per_epoch
    if resumed <= total:
        return
    asks = f"max_train_steps {total}" if config.max_train_steps else f"num_epochs {config.num_epochs}, {total} steps"
    raise ConfigError([
        f"the run in {config.output_dir} already trained to step {resumed} ({checked.resume.path.name}), past the "
        f"{total} steps this config asks for ({asks}): it cannot end at an earlier step, and marking it complete at "
        f"step {resumed} would be untrue. Set max_train_steps to {resumed} or more to finish or extend it, go back "
        "with resume_from_checkpoint <an earlier checkpoint's path> (the newer ones are set aside, not deleted), or "
        "start the shorter run in a new output_dir"])


def with_global_batch(config: TrainingConfig, run_dir: RunDir, world: int) -> TrainingConfig:
    """The config with the run's global batch fixed and gradient_accumulation_steps derived for `world` processes.
    Without global_batch_size, the run in output_dir keeps the one it started with (when it is the same run), else
    it is train_batch_size x gradient_accumulation_steps x processes."""
    total = (config.global_batch_size or run_dir.run_global_batch(config)
             or config.train_batch_size * config.gradient_accumulation_steps * world)
    per_update = config.train_batch_size * world
    if total % per_update:
        micro = total // config.train_batch_size
        valid = [n for n in range(1, micro + 1) if micro % n == 0]
        raise ConfigError([f"the global batch of {total} images cannot be split into micro-batches of "
                           f"train_batch_size {config.train_batch_size} over {world} processes; process counts that "
                           f"keep it: {', '.join(map(str, valid))} (or start a new run with another global_batch_size)"])
    return config.model_copy(update={"global_batch_size": total, "gradient_accumulation_steps": total // per_update})


# ---- (3) the run begins, rank 0 ---------------------------------------------------------------------------------

def start_run(config: TrainingConfig, run_dir: RunDir, checked: Preflight,
              steps_per_epoch: int) -> RecordedStart:
    """Rank 0, once the run is known not to end before the step it resumes at (the last check): clear an old run if
    asked, set aside damaged and abandoned checkpoints, remove leftovers of interrupted writes, and record the
    start (the config in effect; the completion marker removed)."""
    check_not_shorter(config, checked, steps_per_epoch)
    with SIGNALS.deferred():  # clearing and recording are not cut in half by a signal
        if checked.plan.action == "clear":
            outputs.clear_output_dir(run_dir)
        checked.resume.aside = checkpoint.set_aside(checked.resume.damaged)
        # Before the branch is recorded: a retry that finds the record must find the old branch already aside.
        checked.resume.abandoned_aside = checkpoint.set_aside_abandoned(checked.resume.abandoned)
        checkpoint.remove_incomplete(run_dir)
        run_dir.remove_temporary()
        step = (checked.resume_state or {}).get("global_step", 0)
        record = record_start(config, run_dir, step, branch=checked.resume.branch)
    if SIGNALS.received is not None:
        raise SIGNALS.stopped("stopped before training started")
    return record


# ---- all of it ---------------------------------------------------------------------------------------------------

def setup(config: TrainingConfig, stream=None, config_file: Path | None = None, events=None) -> Run:
    SIGNALS.grace_seconds = config.preemption_grace_seconds
    run_dir = RunDir.of(config)
    accelerator = build_accelerator(config, run_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    given_accumulation = config.gradient_accumulation_steps
    writes = UndoableWrites(run_dir) if accelerator.is_main_process else None  # before any write
    spec = model_spec(config)
    try:
        config, checked = decided_by_main(
            accelerator, lambda: check_before_writing(with_global_batch(config, run_dir, world), run_dir, config_file,
                                                      writes, spec))
        source, dataset, data_note = training_dataset(config, run_dir.data_cache, accelerator.local_main_process_first)
        if writes is not None and config.data_cache:
            writes.cache_files = cache_path(config, source, run_dir.data_cache)
        if len(dataset) < config.global_batch_size:
            raise ConfigError([f"the dataset ({len(dataset)} images) is smaller than one global batch "
                               f"({config.global_batch_size} = {config.train_batch_size} per process x "
                               f"{config.gradient_accumulation_steps} accumulation x {world} processes); lower "
                               "train_batch_size or global_batch_size"])
        steps_per_epoch = len(dataset) // config.global_batch_size  # whole global batches only
        record = decided_by_main(accelerator, lambda: start_run(config, run_dir, checked, steps_per_epoch))
    except BaseException:
        if writes is not None:
            writes.undo()
        raise

    # --- (4) model, optimizer, schedule, resume ------------------------------------------------------------------
    set_seed(config.seed)  # weight init only: noise, flips and data order have their own seeded streams
    set_backend_flags(config)
    unet, noise_scheduler = build_unet(config), build_noise_scheduler(config)
    num_params = unet.num_parameters()
    peak, flops = peak_flops(config, accelerator.device), training_flops_per_image(config)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    unet.to(memory_format=memory_format)
    ema = build_ema(config, unet)
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
        fused=config.optimizer_impl == "fused", foreach=config.optimizer_impl == "foreach",
    )
    dataloader = build_dataloader(config, dataset, local_world_size())
    unet, optimizer, dataloader = accelerator.prepare(unet, optimizer, dataloader)
    # Only the training step is compiled (as Accelerate does, around the DDP wrapper): checkpoints keep their keys
    # and the sample grids run eager instead of compiling again for their shapes and precision.
    forward = torch.compile(unet) if config.torch_compile else unet
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    total_steps = config.max_train_steps or config.num_epochs * steps_per_epoch
    state = TrainState(model=spec.recorded())
    resume = checked.resume
    if resume.path is not None:
        state.load_state_dict({**checked.resume_state, "model": state.model})
    clock = TrainClock(config.max_train_seconds, state.training_seconds)  # a resumed run's clock goes on
    lr_scheduler = build_lr_scheduler(config, optimizer.optimizer, total_steps, clock)
    accelerator.register_for_checkpointing(lr_scheduler)
    if resume.path is not None:
        accelerator.load_state(str(resume.path))

    # --- trackers and what the log says first ----------------------------------------------------------------------
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)  # TensorBoard takes scalars and strings
               for k, v in config_values(config).items()}
    accelerator.init_trackers(TRACKER_RUN_NAME, config=hparams)
    tracker = Tracker(accelerator, total_steps, state.global_step, stream, clock=clock,
                      flops_per_image=flops, peak_flops=peak * world if peak else None)  # MFU of all devices
    num_quality = num_quality_images(config, len(dataset))
    reference = real_images(config, num_quality, dataset=dataset, device=accelerator.device) \
        if num_quality and accelerator.is_main_process else None
    events = events or MilestoneEvents.off()
    stall = StallWatchdog(config.stall_timeout_seconds, rank=rank, on_stall=lambda message: report_stall(
        events, state.global_step, message))
    run = Run(config=config, run_dir=run_dir, accelerator=accelerator, tracker=tracker, record=record,
              lock=writes.lock if writes else None, events=events, stall=stall, unet=unet, forward=forward,
              parameters=list(accelerator.unwrap_model(unet).parameters()), memory_format=memory_format, ema=ema,
              optimizer=optimizer, lr_scheduler=lr_scheduler, noise_scheduler=noise_scheduler, dataloader=dataloader,
              steps_per_epoch=steps_per_epoch, total_steps=total_steps,
              num_epochs=math.ceil(total_steps / steps_per_epoch),
              resumed_step=state.global_step if resume.path else None, num_quality=num_quality, reference=reference,
              checkpoint_bytes=checked.checkpoint_bytes, state=state, clock=clock,
              last_checkpoint_step=state.global_step if resume.path else -1)
    announce(run, source, data_note, num_params, flops, resume)
    run.events.started(run.global_batch, world, state.global_step, total_steps,
                       str(resume.path) if resume.path else None)
    if config.gradient_accumulation_steps != given_accumulation:
        tracker.message(f"gradient_accumulation_steps {given_accumulation} -> {config.gradient_accumulation_steps}: the "
                        f"run's global batch of {config.global_batch_size} over {world} processes")
    if reference is not None:
        tracker.message(f"sample quality: {num_quality} generated vs {num_quality} training images at each evaluation")
    return run


def report_stall(events: MilestoneEvents, step: int, message: str) -> None:
    """From the stall watchdog's thread, just before the process ends: rank 0 posts the Warning Event."""
    events.stalled(step, message)
    events.close(timeout_s=5.0)


def announce(run: Run, source, data_note: str, num_params: int, flops: float, resume: Resume) -> None:
    config, tracker, state = run.config, run.tracker, run.state
    tracker.message(
        f"dataset {source.name}: {len(source)} images"
        + (f", skipped {len(source.skipped)} unreadable: " + "; ".join(source.skipped[:5]) if source.skipped else ""))
    tracker.message(
        f"global batch {run.global_batch} = {config.train_batch_size} per process x "
        f"{config.gradient_accumulation_steps} accumulation x {run.world} processes | {run.steps_per_epoch} steps/epoch "
        f"| {run.total_steps} total steps ({run.num_epochs} epochs) | UNet {num_params:,} parameters | "
        f"{run.accelerator.device} {config.mixed_precision}")
    tracker.message(data_note)
    tracker.message(f"{flops / 1e9:.2f} GFLOP per trained image (forward+backward)")
    tracker.message(f"run {run.record.run_id} (started {run.record.started_at})")
    if config.max_train_seconds is not None:
        tracker.message(f"time budget: {config.max_train_seconds:g} s of training ({run.clock.before:.0f} s spent), "
                        f"or {run.total_steps} steps, whichever comes first")
    for (path, problem), aside in zip(resume.damaged, resume.aside):
        tracker.message(f"checkpoint {path} is damaged ({problem}); set aside as {aside.name}")
    for path, aside in zip(resume.abandoned, resume.abandoned_aside):
        tracker.message(f"checkpoint {path.name} is newer than resume_from_checkpoint {config.resume_from_checkpoint} "
                        f"(step {resume.branch['step']}): set aside as {aside.name}, kept as it was (never resumed or "
                        "rotated; delete it when you no longer need it)")
    if resume.continued:
        tracker.message(f"resume_from_checkpoint {config.resume_from_checkpoint}: this run went back there already "
                        f"(recorded in {HISTORY_NAME}), so this start continues that branch; to go back to "
                        "another step, name that step's checkpoint")
    tracker.message(
        f"resumed from {resume.path} at step {state.global_step} epoch {state.global_step // run.steps_per_epoch}"
        if resume.path else "starting fresh at step 0 (no checkpoint to resume)")
    if run.record.changes:
        changed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in run.record.changes.items())
        tracker.message(f"settings changed since the last start (recorded in {HISTORY_NAME}): {changed}")
    tracker.text("config", "```yaml\n" + config_yaml(config) + "```")
    if source.skipped:
        tracker.text("data/skipped", "\n".join(source.skipped))

