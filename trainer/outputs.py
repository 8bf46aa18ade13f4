"""output_dir: what may live there, when it may be cleared, whether it can hold the run, and the saved pipeline.

Layout (the tutorial's, plus run metadata; trainer.run_record and trainer.checkpoint own their parts):
  model_index.json, unet/, scheduler/   DDPMPipeline.save_pretrained (EMA weights)
  README.md                              model card
  samples/<epoch:04d>.png                sample grids
  logs/                                  TensorBoard
  checkpoints/checkpoint-<step>/         full training state (trainer.checkpoint)
  training_config.yaml                   the resolved config in effect now
  config_history.jsonl                   every resolved config of the run, with the step it took effect
  training_complete.json                 written last, when the run finished (the push waits for it)
  data_cache/                            the decoded-image cache, unless data_cache_dir points elsewhere
  .ddpm-train.lock                       held by the running trainer (trainer.lock)

Nothing here deletes a file that is not in this layout: `overwrite_output_dir` clears a folder only when every
entry in it is ours, and never one that holds (or sits inside) the training images, the cache or the config file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import resource
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from trainer.config import RESOLVED_CONFIG_NAME, RUN_IDENTITY_FIELDS, TrainingConfig, config_yaml
from trainer.errors import Diverged, OutputDirError

HISTORY_NAME = "config_history.jsonl"
COMPLETE_MARKER = "training_complete.json"
LOCK_NAME = ".ddpm-train.lock"
DATA_CACHE_NAME = "data_cache"
PIPELINE_ENTRIES = ("model_index.json", "unet", "scheduler")
MODEL_CARD_NAME = "README.md"
SAMPLES_NAME, LOGS_NAME, CHECKPOINTS_NAME = "samples", "logs", "checkpoints"
TRACKER_RUN_NAME = "train"  # accelerator.init_trackers(TRACKER_RUN_NAME): TensorBoard writes under logs/train/
PIPELINE_TMP = ".tmp-pipeline"  # save_pretrained writes here, then each part is renamed into place
# Every top-level entry a run of ours writes; anything else makes the folder "not ours".
OUR_ENTRIES = frozenset({
    *PIPELINE_ENTRIES, MODEL_CARD_NAME, SAMPLES_NAME, LOGS_NAME, CHECKPOINTS_NAME, RESOLVED_CONFIG_NAME,
    HISTORY_NAME, COMPLETE_MARKER, DATA_CACHE_NAME, LOCK_NAME,
})


def temporary(name: str) -> str:
    """The name under which `name` (one of our top-level files) is written before it is renamed into place."""
    return f".tmp-{name}"


def replaced(name: str) -> str:
    """Where save_pipeline moves the previous `name` (a pipeline entry) while the new one is renamed in."""
    return f".tmp-old-{name}"


# Half-written entries of ours (atomic writes that were interrupted), by exact name: a user's `.tmp-notes.txt` is
# not ours, so it is neither removed at start nor taken for part of a run.
OUR_TEMPORARIES = frozenset({
    PIPELINE_TMP, *map(replaced, PIPELINE_ENTRIES),
    *map(temporary, (RESOLVED_CONFIG_NAME, COMPLETE_MARKER, MODEL_CARD_NAME)),
})
# In the data cache folder (trainer.data_cache, often a shared volume): a builder's temporary files start with this,
# and only those are removed as orphans.
CACHE_TEMPORARY_PREFIX = ".tmp-ddpm-cache-"
# A cache file of ours (trainer.data_cache.cache_path): <dataset slug>-<image_size>px-<key digest>.npy, its .json
# sidecar. Only a data_cache/ holding nothing else marks a folder as a run of ours that stopped before its record.
CACHE_FILE = re.compile(r"[A-Za-z0-9-]*-\d+px-[0-9a-f]+\.[a-z]+")
# Inside checkpoints/ (trainer.checkpoint): checkpoints set aside are renamed <prefix>checkpoint-<step>, and
# <prefix>checkpoint-<step>.<n> (n = 2, 3, ...) when one of that name was set aside before: never overwritten.
DAMAGED_PREFIX = "damaged-"  # found damaged by a resume
ABANDONED_PREFIX = "abandoned-"  # newer than the checkpoint a rollback (resume_from_checkpoint <path>) went back to
# What a run writes inside its folders (paths relative to the folder): only these are ours to delete there; a
# user's samples/my.png or logs/notes.txt is not. Grids are samples/<epoch:04d>.png; Accelerate's TensorBoard tracker
# writes logs/train/events.out.tfevents.* and logs/train/<time>/ (hparams); a checkpoint folder is ours whole.
WRITTEN_INSIDE = {
    SAMPLES_NAME: re.compile(r"(\.tmp-)?\d{4,}\.png"),
    LOGS_NAME: re.compile(rf"{TRACKER_RUN_NAME}/(\d+(\.\d+)?/)?(events\.out\.tfevents\.[^/]+|hparams\.yml)"),
    CHECKPOINTS_NAME: re.compile(rf"(\.tmp-|{DAMAGED_PREFIX}|{ABANDONED_PREFIX})?checkpoint-\d+(\.\d+)?(/.+)?"),
}


def _is_ours(name: str) -> bool:
    return name in OUR_ENTRIES or name in OUR_TEMPORARIES


def inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@dataclass(frozen=True)
class OutputPlan:
    """What `ddpm train` will do with output_dir: start in a new or empty folder, continue the run in it
    (resume, extend, or start it again after a crash before its first checkpoint), or clear an old run first."""

    action: str  # "new" | "continue" | "clear"
    reason: str = ""


def plan_output_dir(config: TrainingConfig, config_file: Path | None = None) -> OutputPlan:
    """Read-only: decide what to do with output_dir, or raise OutputDirError saying why it cannot be used."""
    out = Path(config.output_dir)
    problems = _overlaps(config)
    if problems:
        raise OutputDirError("output_dir " + str(out) + " cannot be used:\n" + "\n".join(f"  - {p}" for p in problems))
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir {out} is a file, not a folder; choose a folder path")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    links = links_leaving(out, entries)
    if links:
        shown = ", ".join(links[:5]) + (f" and {len(links) - 5} more" if len(links) > 5 else "")
        raise OutputDirError(
            f"output_dir {out} holds links that lead outside it ({shown}); a run writes and deletes inside these, so "
            "it would change files elsewhere; nothing was changed. Replace each link by a real folder or file (or "
            "remove it), or choose another output_dir (to share the data cache, set data_cache_dir instead)")
    if not [e for e in entries if e != LOCK_NAME]:
        return OutputPlan("new")
    foreign = [e for e in entries if not _is_ours(e)]
    listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    saved = out / RESOLVED_CONFIG_NAME
    if saved.is_file():
        try:
            theirs = yaml.safe_load(saved.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise OutputDirError(f"{saved} cannot be read ({e}); move it away or choose another output_dir") from e
    elif (out / HISTORY_NAME).is_file():  # a start that stopped between its two records
        from trainer.run_record import read_history

        history = read_history(out)
        theirs = (history[-1].get("config") or {}) if history else {}
        if not theirs:
            return OutputPlan("continue", "a run of ours whose record was cut short")
    elif _started_before_its_record(out, entries):
        return OutputPlan("continue", "a run of ours that stopped before writing its record")
    else:  # no record of a run: whatever the names, not ours
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise OutputDirError(
            f"output_dir {out} is not empty and is not a ddpm-trainer run (it holds {shown}, but no "
            f"{RESOLVED_CONFIG_NAME} or {HISTORY_NAME}: the record every run of ours writes before it trains); "
            "nothing was changed. Choose a new or empty folder for output_dir (overwrite_output_dir only ever deletes "
            "a ddpm-trainer run)")
    mine = json.loads(config.model_dump_json())
    diff = [f"{k}: {theirs.get(k)!r} -> {mine[k]!r}" for k in RUN_IDENTITY_FIELDS if theirs.get(k) != mine[k]]
    if not diff:
        return OutputPlan("continue")  # the same run: resume, extend, or finish it; files of the user's stay
    what = f"output_dir {out} holds a different run ({'; '.join(diff)})"
    if not config.overwrite_output_dir:
        raise OutputDirError(f"{what}; choose another output_dir, or set overwrite_output_dir true to delete it")
    if foreign:
        raise OutputDirError(f"{what}, but overwrite_output_dir cannot clear it: it also holds files that are not a "
                             f"ddpm-trainer run's ({listed}); move them out, or choose another output_dir")
    clash = _clear_clashes(config, config_file)
    if clash:
        raise OutputDirError(f"{what}, but overwrite_output_dir cannot clear it: {clash}")
    return OutputPlan("clear", what)


def links_leaving(out: Path, entries: list[str]) -> list[str]:
    """'<path> -> <target>' for each symbolic link in our part of output_dir (entries of our layout and everything
    under them) that resolves outside output_dir: a run would write or delete through it. The user's own entries
    are never written, so links there are theirs to keep."""
    root = out.resolve()
    found = []
    for name in entries:
        if not _is_ours(name):
            continue
        top = out / name
        paths = [top]
        if top.is_dir() and not top.is_symlink():
            for folder, dirs, files in os.walk(top):  # does not follow links
                paths += [Path(folder) / child for child in sorted(dirs + files)]
        found += [f"{p.relative_to(out)} -> {os.readlink(p)}" for p in paths if p.is_symlink() and not _stays(p, root)]
    return found


def _stays(link: Path, root: Path) -> bool:
    try:
        return inside(link.resolve(), root)
    except (OSError, RuntimeError):  # a loop of links leads nowhere we could check
        return False


def _started_before_its_record(out: Path, entries: list[str]) -> bool:
    """What a start of ours writes before its record (trainer.setup): the lock file, and the data cache folder with
    our cache files (and a builder's leftovers) in it. Nothing else, so a user's folder is never taken for it."""
    if not set(entries) <= {LOCK_NAME, DATA_CACHE_NAME}:
        return False
    cache = out / DATA_CACHE_NAME
    return DATA_CACHE_NAME not in entries or cache.is_dir() and not cache.is_symlink() and all(
        CACHE_FILE.fullmatch(name) or name.startswith(CACHE_TEMPORARY_PREFIX) for name in os.listdir(cache))


def _resolved(path: Path | str | None) -> Path | None:
    return Path(path).expanduser().resolve() if path else None


def _overlaps(config: TrainingConfig) -> list[str]:
    """Layouts that would mix the run with its inputs, whatever the folder holds now."""
    out = _resolved(config.output_dir)
    problems = []
    data = _resolved(config.train_data_dir) if config.dataset_name == "imagefolder" else None
    if data is not None and (inside(out, data) or inside(data, out)):
        where = "is the same folder as" if out == data else "is inside" if inside(out, data) else "contains"
        problems.append(f"it {where} train_data_dir {config.train_data_dir}: sample grids would become training "
                        "images and overwrite_output_dir could delete them; keep the run and the images apart")
    cache = _resolved(config.data_cache_dir)
    if cache is not None and inside(out, cache):
        problems.append(f"it is inside data_cache_dir {config.data_cache_dir}; use a folder of its own")
    return problems


def _clear_clashes(config: TrainingConfig, config_file: Path | None) -> str:
    """What clearing output_dir would delete that is not the old run: the config file in use, or a cache that the
    user put there on purpose (the default data_cache is kept: it is keyed by content, so still valid)."""
    out = _resolved(config.output_dir)
    config_path = _resolved(config_file)
    if config_path is not None and inside(config_path, out):
        return f"it holds the config file in use, {config_file}; move the config file out of output_dir first"
    cache = _resolved(config.data_cache_dir)
    if cache is not None and inside(cache, out) and cache != out / DATA_CACHE_NAME:
        return f"it holds data_cache_dir {config.data_cache_dir}; put the cache outside output_dir"
    return ""


def clear_output_dir(config: TrainingConfig) -> list[str]:
    """Delete the old run (plan_output_dir said every entry is ours): what it wrote, and in samples/, logs/ and
    checkpoints/ only that (WRITTEN_INSIDE), so the user's own files there stay. Keeps the lock and the data cache.
    Returns what was removed, relative to output_dir."""
    out = Path(config.output_dir)
    removed = []
    for child in sorted(out.iterdir()):
        if child.name in (LOCK_NAME, DATA_CACHE_NAME) or not _is_ours(child.name):
            continue
        written = WRITTEN_INSIDE.get(child.name)
        if written is not None and child.is_dir() and not child.is_symlink():
            removed += [p.relative_to(out).as_posix() for p in _remove_written(child, written)]
            continue
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        removed.append(child.name)
    return removed


def last_grid(output_dir: Path) -> Path | None:
    """The newest sample grid the run wrote (highest epoch), never a user's image that sits next to them."""
    samples = Path(output_dir) / SAMPLES_NAME
    grids = [p for p in samples.glob("*.png") if WRITTEN_INSIDE[SAMPLES_NAME].fullmatch(p.name) and p.stem.isdigit()] \
        if samples.is_dir() else []
    return max(grids, key=lambda p: int(p.stem)) if grids else None


def _remove_written(folder: Path, written: re.Pattern) -> list[Path]:
    """Delete the files (and links) under `folder` whose relative path `written` matches, then the folders that this
    emptied, up to `folder` itself. Links are never followed."""
    removed = []
    for parent, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(parent) / name
            if not written.fullmatch(path.relative_to(folder).as_posix()):
                continue
            if name in dirs and not path.is_symlink():
                shutil.rmtree(path)  # a folder of ours whole (a checkpoint)
                dirs.remove(name)
            else:
                path.unlink()
            removed.append(path)
    for path in removed:
        for emptied in path.parents:
            if not inside(emptied, folder):
                break
            try:
                emptied.rmdir()
            except OSError:  # not empty: the user's files are in it
                break
    return removed


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable(config: TrainingConfig) -> None:
    """Read-only: output_dir (or the folder it will be created in) can be written. Checked before the lock is taken:
    the lock is the first thing written."""
    out = Path(config.output_dir)
    base = _nearest_existing(out)
    if not os.access(base, os.W_OK | os.X_OK):
        raise not_writable(out, base)


def not_writable(out: Path, base: Path, error: OSError | None = None) -> OutputDirError:
    read_only = error.errno == errno.EROFS if error is not None else _read_only(base)
    why = f"{base} is on a read-only file system" if read_only else f"{base} does not let uid {os.getuid()} write"
    return OutputDirError(f"output_dir {out} is not writable ({why}); fix the volume's permissions or mount (fsGroup, "
                          "chown the folder, readOnly: false) or choose another path")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_space(config: TrainingConfig, checkpoint_bytes: int, weights_bytes: int, existing_checkpoints: int) -> None:
    """Read-only preflight: output_dir can be created and written, and holds what the run will add at its peak:
    checkpoints up to checkpoints_total_limit + 1 (a new one is complete before the oldest goes) and the pipeline."""
    out = Path(config.output_dir)
    base = _nearest_existing(out)
    check_writable(config)
    keep = config.checkpoints_total_limit
    new_checkpoints = max(1, (keep + 1 - existing_checkpoints) if keep else 1)
    needed = new_checkpoints * checkpoint_bytes + weights_bytes
    free = shutil.disk_usage(base).free
    if free < needed:
        raise OutputDirError(
            f"no space left for this run in {out}: {free / 2**20:.0f} MiB free, it needs about {needed / 2**20:.0f} "
            f"MiB ({new_checkpoints} more checkpoint(s) of {checkpoint_bytes / 2**20:.0f} MiB with "
            f"checkpoints_total_limit {keep}, and the pipeline); free space, use a bigger volume or lower "
            "checkpoints_total_limit")


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no room: on the device, in the quota, under ulimit -f
# torch.save's zip writer reports a failed write without its errno ("unexpected pos ...", "iostream error")
_TORCH_WRITE_FAILED = ("PytorchStreamWriter", "inline_container", "iostream error", "file write failed")


def disk_full(error: BaseException, what: str, path: Path, needed_bytes: int) -> OutputDirError | None:
    """The user-facing error (exit 2) when writing `what` to `path` failed for want of room, else None. Whichever
    library wrote: an OSError's errno, or the errno in the message of an error that wraps it (safetensors raises
    SafetensorError '... (os error 28)'), anywhere in the chain of causes; torch's writer, which loses the errno,
    when the volume or the file size limit leaves less than `needed_bytes`."""
    code = _full_errno(error)
    base = _nearest_existing(Path(path))
    free = shutil.disk_usage(base).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code is None and any(marker in text for text in _chain_texts(error) for marker in _TORCH_WRITE_FAILED):
        code = errno.EFBIG if limit != resource.RLIM_INFINITY and limit < needed_bytes else \
            errno.ENOSPC if free < needed_bytes else None
    if code is None:
        return None
    reason = "" if code == errno.ENOSPC else f" ({os.strerror(code)}" + (
        f": the file size limit (ulimit -f) is {_size(limit)})" if code == errno.EFBIG and
        limit != resource.RLIM_INFINITY else ")")
    return OutputDirError(f"no space left on device while writing {what} to {path}{reason}: {free / 2**20:.0f} MiB "
                          f"free, it needs about {needed_bytes / 2**20:.0f} MiB; free space or use a bigger volume"
                          + (", or raise the file size limit" if code == errno.EFBIG else "")
                          + " (the newest complete checkpoint is intact)")


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _chain(error: BaseException | None):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _chain_texts(error: BaseException):
    return [str(e) for e in _chain(error)]


def _full_errno(error: BaseException) -> int | None:
    for e in _chain(error):
        if getattr(e, "errno", None) in FULL_ERRNOS:
            return e.errno
        text = str(e)
        for code in FULL_ERRNOS:
            if f"os error {code})" in text or os.strerror(code) in text:
                return code
    return None


@contextmanager
def writing(what: str, path: Path, needed_bytes: int = 0, temporary_path: Path | None = None):
    """Around a write into output_dir: a failure removes `temporary_path` (what it was writing), and a full disk
    becomes the exit-2 error that says so instead of a traceback."""
    try:
        yield
    except Exception as e:
        if temporary_path is not None:
            shutil.rmtree(temporary_path, ignore_errors=True) if temporary_path.is_dir() and not \
                temporary_path.is_symlink() else temporary_path.unlink(missing_ok=True)
        full = disk_full(e, what, path, needed_bytes)
        if full is not None:
            raise full from e
        raise


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def write_resolved_config(config: TrainingConfig) -> Path:
    path = Path(config.output_dir) / RESOLVED_CONFIG_NAME
    tmp = path.with_name(temporary(path.name))
    tmp.write_text(config_yaml(config))
    os.replace(tmp, path)
    return path


def all_finite(tensors) -> bool:
    import torch

    return all(bool(torch.isfinite(t).all()) for t in tensors)


def save_pipeline(config: TrainingConfig, unet, scheduler) -> None:
    """DDPMPipeline.save_pretrained into a temporary folder, then each part renamed into place: a reader never
    sees a half-written weights file. Refuses non-finite weights: they would be a broken model on the Hub."""
    from diffusers import DDPMPipeline

    if not all_finite(unet.parameters()):
        raise Diverged("the model's weights hold NaN/inf values: no pipeline was saved (lower learning_rate, or "
                       "resume from an earlier checkpoint)")
    out = Path(config.output_dir)
    tmp = out / PIPELINE_TMP
    shutil.rmtree(tmp, ignore_errors=True)
    needed = sum(p.numel() * p.element_size() for p in unet.parameters())
    with writing("the pipeline", out, needed, temporary_path=tmp):  # a full disk: the previous pipeline stays
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
    for name in PIPELINE_ENTRIES:
        target, old = out / name, out / replaced(name)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp / name, target)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)


def save_grid(grid, path: Path) -> None:
    """A sample grid, written whole or not at all (a full disk leaves no half PNG, and says so)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temporary(path.name))
    with writing(f"sample grid {path.name}", path, 0, temporary_path=tmp):
        grid.save(tmp, format="PNG")
        os.replace(tmp, path)


def remove_temporary(output_dir: Path) -> None:
    """Leftovers of our interrupted atomic writes at the top of output_dir (checkpoints clean their own)."""
    out = Path(output_dir)
    for name in sorted(OUR_TEMPORARIES):
        path = out / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() \
            else path.unlink(missing_ok=True)


def write_model_card(config: TrainingConfig, last_grid: Path | None, global_step: int) -> Path:
    hub_dataset = not (config.dataset_name.startswith("builtin:") or config.dataset_name == "imagefolder")
    data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=["pytorch", "diffusers", "unconditional-image-generation", "ddpm-trainer"],
        datasets=[config.dataset_name] if hub_dataset else None,
    )
    grid = f"![samples]({last_grid.relative_to(config.output_dir).as_posix()})\n" if last_grid else ""
    content = f"""---
{data.to_yaml()}
---

# {config.hub_repo_id}

An unconditional image diffusion model (DDPM) trained with ddpm-trainer on `{config.dataset_name}`
at {config.image_size}x{config.image_size} for {global_step} optimizer steps.

{grid}
## Usage

```python
from diffusers import DDPMPipeline

pipeline = DDPMPipeline.from_pretrained("{config.hub_repo_id}")
image = pipeline().images[0]
```

## Training configuration

```yaml
{config_yaml(config).strip()}
```
"""
    path = Path(config.output_dir) / MODEL_CARD_NAME
    tmp = path.with_name(temporary(path.name))
    with writing("the model card", path, len(content.encode()), temporary_path=tmp):
        ModelCard(content).save(tmp)
        os.replace(tmp, path)
    return path
