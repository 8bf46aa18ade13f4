"""Checkpoints: Accelerate save_state into a temporary folder, renamed into place only when complete.

Layout: output_dir/checkpoints/checkpoint-<step>/ (complete) and .tmp-checkpoint-<step>/ (being written).
A crash mid-save leaves only a .tmp folder, which is never resumed from and is removed on the next start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator

from trainer.config import ConfigError, TrainingConfig

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainState:
    """What the loop needs besides model/optimizer/scheduler/EMA/RNG to continue exactly where it stopped."""

    global_step: int = 0  # optimizer updates done
    epoch: int = 0
    nonfinite_total: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _NAME.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume(config: TrainingConfig) -> Path | None:
    """The checkpoint to load for resume_from_checkpoint = auto | latest | none | <path>."""
    mode = config.resume_from_checkpoint
    if mode == "none":
        return None
    if mode in ("auto", "latest"):
        found = complete_checkpoints(config.output_dir)
        if not found and mode == "latest":
            raise ConfigError([f"resume_from_checkpoint latest: no complete checkpoint in {checkpoints_dir(config.output_dir)}"])
        return found[-1] if found else None
    path = Path(mode)
    if not (path / STATE_FILE).is_file():
        raise ConfigError([f"resume_from_checkpoint {path} is not a complete checkpoint (no {STATE_FILE})"])
    return path


def remove_incomplete(output_dir: Path) -> None:
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for path in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, state: TrainState, output_dir: Path, total_limit: int | None) -> Path:
    """Every rank writes its part (Accelerate names per-rank files); rank 0 publishes and rotates."""
    final = checkpoints_dir(output_dir) / f"checkpoint-{state.global_step}"
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state.state_dict()))
        _fsync_tree(tmp)
        if final.exists():  # same step saved twice (e.g. preempted right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        rotate(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def rotate(output_dir: Path, total_limit: int | None) -> None:
    """Remove the oldest complete checkpoints beyond total_limit (only called after a newer one is complete)."""
    if total_limit is None:
        return
    for old in complete_checkpoints(output_dir)[:-total_limit]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename publishes them (a node crash must not leave empty files)."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def checkpoint_bytes_estimate(num_parameters: int, use_ema: bool) -> int:
    """fp32 weights + AdamW's two moments (+ EMA), with 20% headroom for RNG/scheduler files and metadata."""
    copies = 3 + (1 if use_ema else 0)
    return int(num_parameters * 4 * copies * 1.2)
