"""What a person sees: TensorBoard scalars, images, text and hparams (all through Accelerate's tracker API) and
the console status; and the step statistics behind them, kept on the device between logs.

On a TTY the console shows a progress bar; otherwise (kubectl logs, CI) one plain line per logging step, with
no carriage returns. Only rank 0 prints or writes.
"""

from __future__ import annotations

import math
import sys
import time
from datetime import timedelta

import numpy as np
import torch
from accelerate import Accelerator

from trainer.budget import TrainClock


class StepStats:
    """Sums over one logging interval, on the device: adding to them never syncs with the host. `read` does the
    interval's one all-reduce and returns them by name."""

    def __init__(self, device: torch.device):
        zero = lambda: torch.zeros((), device=device)  # noqa: E731
        self.loss_sum, self.loss_count = zero(), zero()  # finite micro-batch losses only
        self.grad_norm_sum, self.nonfinite = zero(), zero()  # per optimizer update
        self.streak, self.worst_streak = zero(), zero()  # consecutive non-finite updates: now, and the longest

    def add_loss(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss, 0.0)
        self.loss_count += finite

    def add_update(self, grad_norm: torch.Tensor, bad: torch.Tensor) -> None:
        self.grad_norm_sum += torch.where(bad, 0.0, grad_norm)
        self.nonfinite += bad
        self.streak = (self.streak + 1) * bad
        self.worst_streak = torch.maximum(self.worst_streak, self.streak)

    def read(self, accelerator: Accelerator, updates: int, stop: bool, seconds: float = 0.0) -> dict[str, float]:
        """All ranks: reduce, reset the interval, and return loss (NaN when every loss was non-finite), grad_norm
        (mean over the finite updates), nonfinite_steps, streak, worst_streak, stop (any rank asked to stop) and
        seconds (the sum of what the ranks passed: rank 0's training clock, 0 elsewhere; trainer/budget.py)."""
        world = accelerator.num_processes
        device = self.loss_sum.device
        packed = torch.stack([self.loss_sum, self.loss_count, self.grad_norm_sum, self.nonfinite, self.streak,
                              self.worst_streak, torch.tensor(float(stop), device=device),
                              torch.tensor(float(seconds), device=device)])
        loss_sum, loss_count, grad_norm_sum, nonfinite, streak, worst, stops, seconds = \
            accelerator.reduce(packed, "sum").tolist()  # the sync point of the interval
        nonfinite, streak, worst = nonfinite / world, streak / world, worst / world  # equal on every rank
        for total in (self.loss_sum, self.loss_count, self.grad_norm_sum, self.nonfinite, self.worst_streak):
            total.zero_()
        return {"loss": loss_sum / loss_count if loss_count else math.nan,
                "grad_norm": grad_norm_sum / world / max(updates - nonfinite, 1.0) if updates > nonfinite else math.nan,
                "nonfinite_steps": nonfinite, "streak": streak, "worst_streak": worst, "stop": stops > 0,
                "seconds": seconds}


def format_status(step: int, total: int, epoch: int, scalars: dict[str, float], eta_s: float) -> str:
    eta = str(timedelta(seconds=int(eta_s)))
    line = (
        f"step {step}/{total} epoch {epoch} loss {scalars['loss']:.4f} lr {scalars['lr']:.2e} "
        f"img/s {scalars['images_per_sec']:.1f} eta {eta}"
    )
    if scalars.get("nonfinite_steps"):
        line += f" nonfinite {int(scalars['nonfinite_steps'])}"
    return line


class Tracker:
    def __init__(self, accelerator: Accelerator, total_steps: int, start_step: int, stream=None, *,
                 flops_per_image: float = 0.0, peak_flops: float | None = None, clock: TrainClock | None = None,
                 timer=time.perf_counter):
        self.accelerator = accelerator
        self.clock = clock  # the max_train_seconds budget, when it may end the run before total_steps
        self._now = timer
        self.flops_per_image, self.peak_flops = flops_per_image, peak_flops
        self.data_wait = 0.0  # seconds the loop waited for batches since the last log
        self.first_update_s = None
        self.total, self.stream = total_steps, stream or sys.stdout
        self.bar = None
        if accelerator.is_main_process and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, file=self.stream)
        self._last_time, self.last_step = self._now(), start_step
        self.last_loss: float | None = None  # of the newest logged interval, for the Events
        self.last_eta_s: float | None = None

    def timed(self, batches):
        """Yield from `batches`, adding the time spent waiting for each to data_wait (host clock only)."""
        iterator = iter(batches)
        while True:
            start = self._now()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.data_wait += self._now() - start
            yield batch

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if self.first_update_s is None:  # warm-up (allocator, cuDNN autotune, torch.compile) shown apart
            self.first_update_s = self._now() - self._last_time
            self.message(f"first update took {self.first_update_s:.1f} s (warm-up, torch.compile if on)")

    def log(self, step: int, epoch: int, scalars: dict[str, float], images_per_step: int) -> dict[str, float]:
        """Log the scalars of the last interval; adds images/s. Called on every rank (tracker writes on rank 0)."""
        now = self._now()
        steps = max(1, step - self.last_step)
        seconds_per_step = (now - self._last_time) / steps
        images_per_sec = images_per_step / max(seconds_per_step, 1e-9)
        scalars = dict(scalars, images_per_sec=images_per_sec, epoch=epoch,
                       data_wait_share=self.data_wait / max(now - self._last_time, 1e-9),
                       tflops_per_sec=self.flops_per_image * images_per_sec / 1e12)
        if self.peak_flops:
            scalars["mfu"] = self.flops_per_image * images_per_sec / self.peak_flops
        if torch.cuda.is_available():  # bytes, this rank's peak so far (rank 0's is what TensorBoard shows)
            scalars["cuda_max_memory_allocated"] = float(torch.cuda.max_memory_allocated())
        self._last_time, self.last_step, self.data_wait = now, step, 0.0
        self.accelerator.log(scalars, step=step)
        total, eta = self.projected_end(step, seconds_per_step)
        self.last_loss, self.last_eta_s = scalars["loss"], eta
        if self.accelerator.is_main_process:
            if self.bar is not None:
                self.bar.total = total
                self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}", epoch=epoch)
            else:
                print(format_status(step, total, epoch, scalars, eta), file=self.stream, flush=True)
        return scalars

    def projected_end(self, step: int, seconds_per_step: float) -> tuple[int, float]:
        """(final step, seconds left) of whichever limit ends the run first: total_steps at the current pace, or the
        time budget (the agreed clock; the run stops at the first update that reaches it)."""
        eta = (self.total - step) * seconds_per_step
        if self.clock is None or self.clock.budget is None:
            return self.total, eta
        budget_left = max(0.0, self.clock.budget - self.clock.agreed)
        if budget_left >= eta:
            return self.total, eta
        return min(self.total, step + math.ceil(budget_left / max(seconds_per_step, 1e-9))), budget_left

    def message(self, text: str) -> None:
        if not self.accelerator.is_main_process:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def image(self, tag: str, image, step: int) -> None:
        if self.accelerator.is_main_process:
            self.accelerator.get_tracker("tensorboard").log_images({tag: np.asarray(image)[None]}, step,
                                                                   dataformats="NHWC")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.accelerator.log({tag: text}, step=step)  # Accelerate's TensorBoard tracker: str -> add_text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.accelerator.end_training()
