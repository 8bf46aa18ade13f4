"""max_train_seconds: the training clock, the decision to stop, and an LR schedule that runs over a time budget.

The clock counts the seconds of the step loop (training steps and the periodic grids and checkpoints inside it),
from the seconds earlier processes of the run spent (TrainState.training_seconds, saved in every checkpoint), so a
resumed run neither resets its clock nor counts the work it redoes after the checkpoint twice. Startup and the
end-of-run saves are not counted.

Every rank must stop at the same step. Rank 0's clock decides: with one process it is read after every update; with
several, rank 0's seconds travel in the logging all-reduce that already happens every `logging_steps`
(StepStats.read), so all ranks see the same number at the same step and no extra collective is added. A run then
overshoots its budget by at most one logging interval.

The LR schedule of a budgeted run (the lr_scheduler's shape: cosine, linear, constant...) advances with the larger of
the step fraction and the time fraction, so it ends where the run ends, whichever limit comes first. Warmup stays in
optimizer updates. The time fraction is the value all ranks agree on, so the LR is equal on every rank.
"""

from __future__ import annotations

import math
import time

import torch
from diffusers.optimization import get_scheduler

from trainer.config import TrainingConfig


class TrainClock:
    def __init__(self, budget_seconds: float | None, spent_before: float = 0.0):
        self.budget = budget_seconds
        self.before = float(spent_before)  # seconds of earlier processes of this run (from the checkpoint)
        self.started: float | None = None
        self.stopped: float | None = None  # the reading when the loop ended (the end-of-run work is not counted)
        self.agreed = self.before  # rank 0's seconds as every rank knows them (shared at the last sync)

    def start(self) -> None:
        self.started = time.perf_counter()

    def stop(self) -> None:
        if self.stopped is None:
            self.stopped = self.seconds()

    def seconds(self) -> float:
        """This process's reading: earlier processes' seconds plus the step loop's so far."""
        if self.stopped is not None:
            return self.stopped
        return self.before + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def agree(self, seconds: float) -> None:
        self.agreed = seconds

    @property
    def fraction(self) -> float:
        return min(1.0, self.agreed / self.budget) if self.budget else 0.0

    @property
    def spent(self) -> bool:
        """The budget is spent (on every rank the same answer at the same step)."""
        return self.budget is not None and self.agreed >= self.budget


def budget_lr_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int, clock: TrainClock):
    """A LambdaLR of shape `name` (cosine, linear, constant, constant_with_warmup) whose progress after warmup is
    max(step fraction, time fraction). The lambda is a plain function, so the LambdaLR's state_dict (last_epoch)
    holds no clock: the clock comes back from TrainState on resume."""
    warm = warmup_steps if name != "constant" else 0

    def factor(step: int) -> float:
        if step < warm:
            return step / max(1, warm)
        progress = max((step - warm) / max(1, total_steps - warm), clock.fraction)
        progress = min(1.0, progress)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "linear":
            return 1.0 - progress
        return 1.0  # constant, constant_with_warmup

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_lr_scheduler(config: TrainingConfig, optimizer, total_steps: int, clock: TrainClock):
    """Counted in optimizer updates: warmup N means N updates whatever the accumulation and world size. With
    max_train_seconds the schedule follows the budget too (above); without, it is diffusers' own."""
    if config.max_train_seconds is not None:
        return budget_lr_scheduler(config.lr_scheduler, optimizer, config.lr_warmup_steps, total_steps, clock)
    return get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=total_steps)
