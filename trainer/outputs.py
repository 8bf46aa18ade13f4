"""Whether a run may use output_dir: what may live there, when an old run may be cleared, whether it can hold the run,
and the lock that keeps one writer on it.

The layout itself, and every reader and writer of the run's files, is trainer.run_dir. Nothing here deletes a file
that is not in that layout: `overwrite_output_dir` clears a folder only when every entry in it is ours, and never
one that holds (or sits inside) the training images, the cache or the config file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.config import RUN_IDENTITY_FIELDS, TrainingConfig
from trainer.errors import OutputDirError, TransientError
from trainer.run_dir import (CHECKPOINTS_NAME, CONFIG_NAME, DATA_CACHE_NAME, GRID_NAME, HISTORY_NAME, LOCK_NAME,
                             LOGS_NAME, MODEL_CARD_NAME, PIPELINE_ENTRIES, SAMPLES_NAME, TEMPORARIES,
                             TRACKER_RUN_NAME, COMPLETE_MARKER, RunDir, nearest_existing)

# Every top-level entry a run of ours writes; anything else makes the folder "not ours".
OUR_ENTRIES = frozenset({
    *PIPELINE_ENTRIES, MODEL_CARD_NAME, SAMPLES_NAME, LOGS_NAME, CHECKPOINTS_NAME, CONFIG_NAME,
    HISTORY_NAME, COMPLETE_MARKER, DATA_CACHE_NAME, LOCK_NAME,
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
    SAMPLES_NAME: re.compile(rf"(\.tmp-)?{GRID_NAME.pattern}"),
    LOGS_NAME: re.compile(rf"{TRACKER_RUN_NAME}/(\d+(\.\d+)?/)?(events\.out\.tfevents\.[^/]+|hparams\.yml)"),
    CHECKPOINTS_NAME: re.compile(rf"(\.tmp-|{DAMAGED_PREFIX}|{ABANDONED_PREFIX})?checkpoint-\d+(\.\d+)?(/.+)?"),
}


def _is_ours(name: str) -> bool:
    return name in OUR_ENTRIES or name in TEMPORARIES


def inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@dataclass(frozen=True)
class OutputPlan:
    """What `ddpm train` will do with output_dir: start in a new or empty folder, continue the run in it
    (resume, extend, or start it again after a crash before its first checkpoint), or clear an old run first."""

    action: str  # "new" | "continue" | "clear"
    reason: str = ""


def plan_output_dir(config: TrainingConfig, run_dir: RunDir, config_file: Path | None = None) -> OutputPlan:
    """Read-only: decide what to do with output_dir, or raise OutputDirError saying why it cannot be used."""
    out = run_dir.root
    problems = _overlaps(config, run_dir)
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
    theirs = run_dir.run_config()  # training_config.yaml, else (a start cut short between its records) the history
    if theirs is None and run_dir.history_file.is_file():
        return OutputPlan("continue", "a run of ours whose record was cut short")
    if theirs is None and _started_before_its_record(out, entries):
        return OutputPlan("continue", "a run of ours that stopped before writing its record")
    if theirs is None:  # no record of a run: whatever the names, not ours
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise OutputDirError(
            f"output_dir {out} is not empty and is not a ddpm-trainer run (it holds {shown}, but no "
            f"{CONFIG_NAME} or {HISTORY_NAME}: the record every run of ours writes before it trains); "
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
    clash = _clear_clashes(config, run_dir, config_file)
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


def _overlaps(config: TrainingConfig, run_dir: RunDir) -> list[str]:
    """Layouts that would mix the run with its inputs, whatever the folder holds now."""
    out = _resolved(run_dir.root)
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


def _clear_clashes(config: TrainingConfig, run_dir: RunDir, config_file: Path | None) -> str:
    """What clearing output_dir would delete that is not the old run: the config file in use, or a cache that the
    user put there on purpose (the default data_cache is kept: it is keyed by content, so still valid)."""
    out = _resolved(run_dir.root)
    config_path = _resolved(config_file)
    if config_path is not None and inside(config_path, out):
        return f"it holds the config file in use, {config_file}; move the config file out of output_dir first"
    cache = _resolved(config.data_cache_dir)
    if cache is not None and inside(cache, out) and cache != out / DATA_CACHE_NAME:
        return f"it holds data_cache_dir {config.data_cache_dir}; put the cache outside output_dir"
    return ""


def clear_output_dir(run_dir: RunDir) -> list[str]:
    """Delete the old run (plan_output_dir said every entry is ours): what it wrote, and in samples/, logs/ and
    checkpoints/ only that (WRITTEN_INSIDE), so the user's own files there stay. Keeps the lock and the data cache.
    Returns what was removed, relative to output_dir."""
    out = run_dir.root
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


def check_writable(out: Path) -> None:
    """Read-only: output_dir (or the folder it will be created in) can be written. Checked before the lock is taken:
    the lock is the first thing written."""
    base = nearest_existing(out)
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


def check_space(out: Path, keep: int | None, checkpoint_bytes: int, weights_bytes: int,
                existing_checkpoints: int) -> None:
    """Read-only preflight: output_dir can be created and written, and holds what the run will add at its peak:
    checkpoints up to `keep` (checkpoints_total_limit) + 1 (a new one is complete before the oldest goes) and the
    pipeline."""
    base = nearest_existing(out)
    check_writable(out)
    new_checkpoints = max(1, (keep + 1 - existing_checkpoints) if keep else 1)
    needed = new_checkpoints * checkpoint_bytes + weights_bytes
    free = shutil.disk_usage(base).free
    if free < needed:
        raise OutputDirError(
            f"no space left for this run in {out}: {free / 2**20:.0f} MiB free, it needs about {needed / 2**20:.0f} "
            f"MiB ({new_checkpoints} more checkpoint(s) of {checkpoint_bytes / 2**20:.0f} MiB with "
            f"checkpoints_total_limit {keep}, and the pipeline); free space, use a bigger volume or lower "
            "checkpoints_total_limit")


def take_lock(run_dir: RunDir, holder: dict[str, str]) -> OutputDirLock:
    """The first write: output_dir itself if missing, and the lock. Refused (exit 2) on a read-only volume or a folder
    this uid may not write, before anything is created."""
    check_writable(run_dir.root)
    try:
        run_dir.root.mkdir(parents=True, exist_ok=True)
        return OutputDirLock(run_dir.lock_file).acquire(holder)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise not_writable(run_dir.root, Path(e.filename or run_dir.root), e) from e


# ---- the lock: one writer per output_dir ------------------------------------------------------------------------------
# One writer per output_dir: rank 0 of a run holds an exclusive `flock` on output_dir/.ddpm-train.lock for the
# whole run, with who holds it (host, pid, start time, pod) written inside.
#
# flock is released by the kernel when the process dies, however it dies, so a crashed or killed trainer never
# leaves a stale lock on a local disk. On NFS, Linux emulates flock with POSIX byte-range locks (NFSv4 locks, or
# NLM for v3; see flock(2), "NFS details"), so a second client sees the lock too; the server releases a dead client's
# lock when its lease expires (NFSv4: 90 s by default). Two limits, documented in the README: a mount with
# `local_lock=flock` (or `nolock`) makes the lock node-local, and a node that vanished holds its lock until the
# lease expires, so a replacement pod of the same workload waits for that long instead of failing.

SAME_WORKLOAD_WAIT_S = 180.0  # two NFSv4 lease periods: a dead predecessor's lock is gone by then
POLL_S = 2.0


class OutputDirLock:
    def __init__(self, path: Path):
        self.path = Path(path)  # RunDir.lock_file
        self.created_file = False
        self._fd: int | None = None

    def acquire(self, holder: dict[str, str], wait_if_same_workload: float = SAME_WORKLOAD_WAIT_S) -> "OutputDirLock":
        """Take the lock or raise OutputDirError naming the holder. A holder from the same Kubernetes workload is
        this run's previous pod (its lock not yet released by the file server): wait for it, then TransientError."""
        self.created_file = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                theirs = _read_holder(fd)
                same = holder.get("workload") and theirs.get("workload") == holder.get("workload") \
                    and theirs.get("namespace") == holder.get("namespace")
                if not same:
                    os.close(fd)
                    raise OutputDirError(
                        f"output_dir {self.path.parent} is in use by another `ddpm train` ({_describe(theirs)}); two "
                        "runs would corrupt each other's checkpoints. Wait for it to end, stop it, or choose another "
                        "output_dir") from None
                deadline = deadline or time.monotonic() + wait_if_same_workload
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TransientError(
                        f"output_dir {self.path.parent} is still locked by a previous pod of this workload "
                        f"({_describe(theirs)}) after {wait_if_same_workload:.0f}s; retry later") from None
                time.sleep(POLL_S)  # polling a lock held on a file server: nothing to wait on but time
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        """Unlock; `remove` also deletes the lock file (when this run created it and leaves nothing else)."""
        if self._fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def holder_info(kubernetes: dict[str, str]) -> dict[str, str]:
    return {"host": socket.gethostname(), "pid": str(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **kubernetes}


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    text = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('started', '?')}"
    if holder.get("pod"):
        text += f", pod {holder.get('namespace', '')}/{holder['pod']}"
    return text
