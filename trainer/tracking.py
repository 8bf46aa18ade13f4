"""What a person sees: TensorBoard scalars/images/text (through Accelerate's tracker) and the console status.

On a TTY the console shows a progress bar; otherwise (kubectl logs, CI) one plain line per logging step, with
no carriage returns. Only rank 0 prints or writes.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import numpy as np
import torch
from accelerate import Accelerator


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
                 flops_per_image: float = 0.0, peak_flops: float | None = None):
        self.accelerator = accelerator
        self.flops_per_image, self.peak_flops = flops_per_image, peak_flops
        self.data_wait = 0.0  # seconds the loop waited for batches since the last log
        self.first_update_s = None
        self.total, self.stream = total_steps, stream or sys.stdout
        self.bar = None
        if accelerator.is_main_process and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, file=self.stream)
        self._last_time, self._last_step = time.perf_counter(), start_step

    def timed(self, batches):
        """Yield from `batches`, adding the time spent waiting for each to data_wait (host clock only)."""
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.data_wait += time.perf_counter() - start
            yield batch

    def tensorboard(self):
        return self.accelerator.get_tracker("tensorboard", unwrap=True) if self.accelerator.is_main_process else None

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if self.first_update_s is None:  # warm-up (allocator, cuDNN autotune, torch.compile) shown apart
            self.first_update_s = time.perf_counter() - self._last_time
            self.message(f"first update took {self.first_update_s:.1f} s (warm-up, torch.compile if on)")

    def log(self, step: int, epoch: int, scalars: dict[str, float], images_per_step: int) -> dict[str, float]:
        """Log the scalars of the last interval; adds images/s. Called on every rank (tracker writes on rank 0)."""
        now = time.perf_counter()
        steps = max(1, step - self._last_step)
        seconds_per_step = (now - self._last_time) / steps
        images_per_sec = images_per_step / max(seconds_per_step, 1e-9)
        scalars = dict(scalars, images_per_sec=images_per_sec, epoch=epoch,
                       data_wait_share=self.data_wait / max(now - self._last_time, 1e-9),
                       tflops_per_sec=self.flops_per_image * images_per_sec / 1e12)
        if self.peak_flops:
            scalars["mfu"] = self.flops_per_image * images_per_sec / self.peak_flops
        if torch.cuda.is_available():  # bytes, this rank's peak so far (rank 0's is what TensorBoard shows)
            scalars["cuda_max_memory_allocated"] = float(torch.cuda.max_memory_allocated())
        self._last_time, self._last_step, self.data_wait = now, step, 0.0
        self.accelerator.log(scalars, step=step)
        if self.accelerator.is_main_process:
            eta = (self.total - step) * seconds_per_step
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}", epoch=epoch)
            else:
                print(format_status(step, self.total, epoch, scalars, eta), file=self.stream, flush=True)
        return scalars

    def message(self, text: str) -> None:
        if not self.accelerator.is_main_process:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def image(self, tag: str, image, step: int) -> None:
        writer = self.tensorboard()
        if writer is not None:
            writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
            writer.flush()

    def text(self, tag: str, text: str) -> None:
        writer = self.tensorboard()
        if writer is not None:
            writer.add_text(tag, text, 0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.accelerator.end_training()
