"""Checkpoints: Accelerate save_state into a temporary folder, a manifest written last, then renamed into place.

Layout: output_dir/checkpoints/checkpoint-<step>/ (complete), .tmp-checkpoint-<step>/ (being written),
damaged-checkpoint-<step>/ (set aside by a resume that found it damaged) and abandoned-checkpoint-<step>/ (newer than
the checkpoint a rollback went back to). Set-aside ones are never loaded or rotated; a second one of the same name is
<name>.2, and so on.

A rollback (resume_from_checkpoint <path>, at step S) starts a branch: the run's checkpoints at S or later are set
aside as abandoned, and the branch is recorded in config_history.jsonl (trainer.run_dir). Running the same command
again (a Job's retry) continues that branch from its newest intact checkpoint instead of going back again, and
rotation keeps the branch point while the command names it, so the command stays valid.

manifest.json lists every file with its size and SHA-256. Resume verifies the newest checkpoint before loading it:
every listed file present with its size and hash, and the weights, the EMA and the optimizer state all finite. A
damaged one is named with its damage and the next older one is tried; a crash mid-save leaves only a .tmp folder,
which is never resumed from and is removed on the next start.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from accelerate import Accelerator

from trainer.errors import CheckpointError
from trainer.outputs import ABANDONED_PREFIX, DAMAGED_PREFIX, inside
from trainer.run_dir import CHECKPOINT_NAME, RunDir, disk_full, sha256_file

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"


@dataclass
class TrainState:
    """What the loop needs besides model/optimizer/scheduler/EMA/RNG to continue exactly where it stopped."""

    global_step: int = 0  # optimizer updates done
    epoch: int = 0
    nonfinite_total: int = 0
    training_seconds: float = 0.0  # the step loop's seconds up to this state, over all processes (max_train_seconds)
    model: dict = field(default_factory=dict)  # the UNet2DModel config: resuming another model is refused

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


def step_of(path: Path) -> int:
    return int(CHECKPOINT_NAME.fullmatch(path.name).group(1))


def complete_checkpoints(run_dir: RunDir) -> list[Path]:
    """Checkpoints renamed into place (not .tmp, not set aside as damaged), oldest first."""
    root = run_dir.checkpoints
    found = [p for p in root.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(found, key=step_of)


# ---- integrity ---------------------------------------------------------------------------------------------------

def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"version": 1, "files": {p.relative_to(folder).as_posix(): {"size": p.stat().st_size,
                                                                            "sha256": sha256_file(p)} for p in files}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def damage(folder: Path) -> str:
    """'' for an intact checkpoint, else what is wrong with it (the first problem found)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the save never finished, or an older ddpm-trainer wrote it)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} is {size} bytes, the manifest says {expected['size']} (truncated or replaced)"
        if sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 (overwritten bytes)"
    if STATE_FILE not in manifest:
        return f"{STATE_FILE} is not in the manifest"
    return _nonfinite(folder, manifest)


def _nonfinite(folder: Path, manifest: dict) -> str:
    """Weights, EMA and optimizer state must be finite: a NaN loaded would poison the run silently."""
    import torch
    from safetensors.torch import load_file

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for value in obj.values():
                yield from tensors(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                yield from tensors(value)

    for name in sorted(manifest):
        path = folder / name
        try:
            if name.endswith(".safetensors"):
                content = load_file(path)
            elif name.endswith((".bin", ".pkl")) and not name.startswith(("random_states", "sampler")):
                content = torch.load(path, map_location="cpu", weights_only=True)
            elif name.startswith("random_states"):
                torch.load(path, map_location="cpu", weights_only=False)  # RNG state must at least unpickle
                continue
            else:
                continue
        except Exception as e:  # any reader's error is "unreadable", whichever library raised it
            return f"{name} cannot be read ({type(e).__name__}: {e})"
        bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors(content) if t.is_floating_point())
        if bad:
            return f"{name} holds {bad} NaN/inf values"
    return ""


# ---- choosing what to resume -------------------------------------------------------------------------------------

@dataclass
class Resume:
    """The checkpoint to load (None: start fresh), the newer ones found damaged on the way to it, and for a
    rollback (resume_from_checkpoint <path>) the run's checkpoints it leaves behind and the branch it records."""

    path: Path | None
    damaged: list[tuple[Path, str]] = field(default_factory=list)
    aside: list[Path] = field(default_factory=list)  # where the damaged ones went (filled when the run begins)
    abandoned: list[Path] = field(default_factory=list)  # this run's checkpoints at or after the rollback's step
    abandoned_aside: list[Path] = field(default_factory=list)  # where they went (filled when the run begins)
    branch: dict | None = None  # {"from": branch_key(path), "step": S}: recorded in config_history.jsonl
    continued: bool = False  # the same rollback as the recorded branch: a retry, continuing it


def resolve_resume(mode: str, run_dir: RunDir) -> Resume:
    """resume_from_checkpoint (`mode`) = auto | latest | none | <path>, verified. Raises CheckpointError when a
    checkpoint is required (latest, a path, or auto with checkpoints present) and none is intact."""
    if mode == "none":
        return Resume(None)
    if mode not in ("auto", "latest"):
        return _rollback(run_dir, Path(mode))
    candidates = list(reversed(complete_checkpoints(run_dir)))
    if not candidates:
        if mode == "latest":
            raise CheckpointError(f"resume_from_checkpoint latest: no checkpoint in "
                                  f"{run_dir.checkpoints}; use auto to start fresh when there is none")
        return Resume(None)
    return _newest_intact(candidates, mode, run_dir)


def _newest_intact(candidates: list[Path], mode: str, run_dir: RunDir) -> Resume:
    damaged = []
    for path in candidates:
        problem = damage(path)
        if not problem:
            return Resume(path, damaged)
        damaged.append((path, problem))
    listing = "\n".join(f"  - {path.name}: {problem}" for path, problem in damaged)
    raise CheckpointError(
        f"no intact checkpoint in {run_dir.checkpoints} ({mode}); every one is damaged:\n{listing}\n"
        "Restore one from a backup, or start again in a new output_dir (or with resume_from_checkpoint none)")


def branch_key(path: Path, run_dir: RunDir) -> str:
    """How a rollback's checkpoint is recorded: relative to output_dir when inside it (so a volume mounted
    elsewhere is still the same run), else its absolute path."""
    resolved, root = Path(path).resolve(), run_dir.root.resolve()
    return resolved.relative_to(root).as_posix() if inside(resolved, root) else str(resolved)


def recorded_branch(run_dir: RunDir) -> dict | None:
    """The rollback the run's newest record was started with (None: the newest start named no checkpoint)."""
    history = run_dir.read_history()
    branch = history[-1].get("branch") if history else None
    return branch if isinstance(branch, dict) and "from" in branch and "step" in branch else None


def _rollback(out: RunDir, path: Path) -> Resume:
    """resume_from_checkpoint <path>. The first time: that checkpoint, verified, and this run's checkpoints at its
    step or later set aside (they are another branch: auto-resume must never take them). The same command again
    (the recorded branch): the branch's newest intact checkpoint, else the chosen one."""
    branch = recorded_branch(out)
    if branch is not None and branch["from"] == branch_key(path, out):
        damaged = []
        for later in reversed(complete_checkpoints(out)):
            if step_of(later) <= branch["step"]:
                break
            problem = damage(later)
            if not problem:
                return Resume(later, damaged, branch=branch, continued=True)
            damaged.append((later, problem))
        return replace(_chosen(path), damaged=damaged, branch=branch, continued=True)  # nothing newer is intact
    resume = _chosen(path)
    step = json.loads((path / STATE_FILE).read_text()).get("global_step", 0)
    chosen = path.resolve()
    abandoned = [p for p in complete_checkpoints(out) if step_of(p) >= step and p.resolve() != chosen]
    return replace(resume, abandoned=abandoned, branch={"from": branch_key(path, out), "step": step})


def _chosen(path: Path) -> Resume:
    problem = damage(path) if path.is_dir() else "it does not exist or is not a folder"
    if problem:
        raise CheckpointError(f"resume_from_checkpoint {path} cannot be used: {problem}")
    return Resume(path)


def set_aside(damaged: list[tuple[Path, str]]) -> list[Path]:
    """Rename damaged checkpoints so they are never tried or rotated again (kept for a post-mortem); returns their
    new paths."""
    return [_rename_aside(path, DAMAGED_PREFIX) for path, _ in damaged]


def set_aside_abandoned(abandoned: list[Path]) -> list[Path]:
    """Rename the checkpoints a rollback leaves behind: never resumed by auto, never rotated, never deleted by us."""
    return [_rename_aside(path, ABANDONED_PREFIX) for path in abandoned]


def _rename_aside(path: Path, prefix: str) -> Path:
    """`path` renamed <prefix><name>, or <prefix><name>.<n> when that is taken: one set aside before (by an
    earlier start) is never replaced, and a rename onto it would fail (ENOTEMPTY) on every start."""
    target, n = path.with_name(f"{prefix}{path.name}"), 1
    while target.exists() or target.is_symlink():
        n += 1
        target = path.with_name(f"{prefix}{path.name}.{n}")
    os.rename(path, target)
    return target


def check_model(resume_state: dict, model_config: dict, path: Path, preset: str) -> None:
    """Refuse a checkpoint of another UNet: loading it would fail deep in PyTorch, or worse, half-succeed."""
    theirs = resume_state.get("model") or {}
    if theirs and theirs.get("config") != model_config:
        raise CheckpointError(
            f"checkpoint {path} holds a different model (model_preset {theirs.get('preset')!r}, "
            f"{_brief(theirs.get('config'))}) than this run (model_preset {preset!r}, {_brief(model_config)}); "
            "use the checkpoint's model settings, or another output_dir / resume_from_checkpoint")


def _brief(unet: dict | None) -> str:
    unet = unet or {}
    return f"block_out_channels {list(unet.get('block_out_channels') or [])}, sample_size {unet.get('sample_size')}"


def remove_incomplete(run_dir: RunDir) -> None:
    root = run_dir.checkpoints
    if root.is_dir():
        for path in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)


# ---- saving ------------------------------------------------------------------------------------------------------

def save_checkpoint(accelerator: Accelerator, state: TrainState, run_dir: RunDir, total_limit: int | None,
                    size_estimate: int = 0) -> Path:
    """Every rank writes its part (Accelerate names per-rank files); rank 0 writes the manifest, publishes and
    rotates. A failed save (disk full, ...) removes its temporary folder and leaves the previous checkpoint."""
    final = run_dir.checkpoint(state.global_step)
    tmp = final.with_name(f".tmp-{final.name}")
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state.state_dict()))
            _fsync_tree(tmp)
            write_manifest(tmp)  # last: a folder with a manifest is a folder whose every file was flushed
            _fsync_tree(tmp, only=MANIFEST)
            if final.exists():  # same step saved twice (e.g. preempted right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            rotate(run_dir, total_limit)
    except Exception as e:  # OSError, or a writer's own error type: SafetensorError, torch's RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full(e, f"checkpoint {final.name}", tmp.parent, size_estimate)
        if full is not None:
            raise full from e
        raise
    accelerator.wait_for_everyone()
    return final


def rotate(run_dir: RunDir, total_limit: int | None) -> None:
    """Remove the oldest complete checkpoints beyond total_limit (only called after a newer one is complete). The
    checkpoint the run's current command rolled back to is kept: the same command must stay valid for a retry."""
    if total_limit is None:
        return
    keep = branch_point(run_dir)
    for old in complete_checkpoints(run_dir)[:-total_limit]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def branch_point(run_dir: RunDir) -> Path | None:
    """The checkpoint of this output_dir that the recorded rollback went back to, if it is one of its own."""
    branch = recorded_branch(run_dir)
    if branch is None or Path(branch["from"]).is_absolute():
        return None
    return run_dir.root / branch["from"]


def _fsync_tree(root: Path, only: str | None = None) -> None:
    """Flush file contents before the rename publishes them (a node crash must not leave empty files)."""
    for path in root.rglob(only or "*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def checkpoint_bytes_estimate(num_parameters: int, use_ema: bool) -> int:
    """fp32 weights + AdamW's two moments (+ EMA), with 20% headroom for RNG/scheduler files and metadata."""
    copies = 3 + (1 if use_ema else 0)
    return int(num_parameters * 4 * copies * 1.2)
