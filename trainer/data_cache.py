"""The pre-decoded dataset: every image decoded, converted and resized once into one uint8 array on disk.

Training then slices a memory-mapped file instead of decoding PNG/JPEG every epoch: no DataLoader workers are
needed, all ranks on a node share one copy through the page cache, and a later run (or a restarted pod) with the
same images and preprocessing reuses the file. The key covers everything that changes the pixels: the dataset's
fingerprint (datasets hashes the data files), image_size, center_crop and CACHE_VERSION.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from trainer.config import TrainingConfig
from trainer.data import (
    ImageSource,
    TrainDataset,
    available_cpus,
    build_transform,
    load_image_source,
    to_rgb,
    worker_init,
)
from trainer.errors import DataError
from trainer.outputs import disk_full

CACHE_VERSION = 2  # bump when build_transform's output changes (2: 16-bit greyscale scaled, not clipped)


class CachedImages(torch.utils.data.Dataset):
    cached = True  # build_dataloader: no workers needed

    def __init__(self, array: np.ndarray, rows: list[int]):
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[self.rows[i]]))  # a copy: the memmap is read-only


def cache_path(config: TrainingConfig, source: ImageSource) -> Path:
    identity = {"version": CACHE_VERSION, "dataset": source.name, "fingerprint": source.fingerprint,
                "length": source.length, "image_size": config.image_size, "center_crop": config.center_crop}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", source.name).strip("-")[-40:]
    return config.resolved_data_cache_dir / f"{slug}-{config.image_size}px-{digest}.npy"


class _Decode(torch.utils.data.Dataset):
    """(index, uint8 image or the error) so one corrupt file is recorded, not fatal."""

    def __init__(self, source: ImageSource, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return self.source.length

    def __getitem__(self, i: int):
        try:
            return i, self.transform(to_rgb(self.source.load(i)))
        except Exception as e:  # PIL raises many types for corrupt data
            return i, f"{type(e).__name__}: {e}"


def _build_workers(num_images: int) -> int:
    return 0 if num_images < 512 else min(8, available_cpus())  # starting workers costs more than a few images


def _identity(item):
    return item


def _build(config: TrainingConfig, source: ImageSource, path: Path) -> dict:
    """Decode everything (in parallel) into `path` atomically: a crash or a signal leaves only a .tmp file (removed
    here, or by the next start), never a file that looks like a cache. The builder holds a lock on its .tmp file,
    so `remove_orphans` can tell a dead builder's leftovers from a live one's on a shared volume."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{socket.gethostname()}-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            meta = _write(config, source, tmp)
            if meta["rows"]:
                # The sidecar first, the array renamed last: the array's presence means the cache is complete.
                _write_atomically(path.with_suffix(".json"), json.dumps(meta))
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # no-op after the rename
    return meta


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def remove_orphans(cache_dir: Path) -> list[Path]:
    """Delete .tmp-* files left by builders that died (a live builder holds a lock on its file)."""
    removed = []
    for tmp in cache_dir.glob(".tmp-*") if cache_dir.is_dir() else []:
        try:
            with open(tmp, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
        except (BlockingIOError, FileNotFoundError):
            continue
    return removed


def _write(config: TrainingConfig, source: ImageSource, tmp: Path) -> dict:
    size = config.image_size
    array = open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(source.length, 3, size, size))
    rows, skipped = [], []
    loader = torch.utils.data.DataLoader(_Decode(source, build_transform(config)), batch_size=None,
                                         num_workers=_build_workers(source.length), collate_fn=_identity,
                                         worker_init_fn=worker_init)
    for i, image in loader:
        if isinstance(image, str):
            skipped.append(f"{source.describe(i)}: {image}")
        else:
            array[i] = image.numpy()
            rows.append(i)
    array.flush()
    del array
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    return {"dataset": source.name, "rows": rows, "skipped": skipped}


def _open(config: TrainingConfig, source: ImageSource, path: Path) -> tuple[np.ndarray, dict] | str:
    """The mapped cache and its sidecar, or why the file on disk cannot be used (then it is rebuilt)."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        rows, skipped = meta["rows"], meta["skipped"]
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    shape = (source.length, 3, config.image_size, config.image_size)
    if array.shape != shape or array.dtype != np.uint8:
        return f"it holds {array.dtype} {array.shape}, expected uint8 {shape}"
    if not isinstance(rows, list) or not isinstance(skipped, list) or any(not 0 <= r < source.length for r in rows):
        return "its sidecar lists rows outside the dataset"
    return array, meta


def cached_dataset(config: TrainingConfig, source: ImageSource) -> tuple[CachedImages, str]:
    """The cache for (config, source), built first if missing or damaged; also fills source.skipped/indices.
    Returns (dataset, what happened: 'reused', 'built now' or 'rebuilt: <why>'). Call it on one process per node
    first (Accelerate's local_main_process_first); concurrent builders on a shared volume are safe, each renames a
    finished file. Raises DataError when no image is readable (and then leaves no cache behind)."""
    path = cache_path(config, source)
    remove_orphans(path.parent)
    opened = _open(config, source, path) if path.exists() else "missing"
    note = "reused"
    if isinstance(opened, str):
        note = "built now" if opened == "missing" else f"rebuilt: the cache file was damaged ({opened})"
        for stale in (path, path.with_suffix(".json")):
            stale.unlink(missing_ok=True)
        try:
            meta = _build(config, source, path)
        except OSError as e:
            needed = source.length * 3 * config.image_size ** 2
            raise disk_full(e, "the data cache", path, needed) or DataError(
                f"cannot write the data cache {path}: {e}; set data_cache_dir to a writable volume with room for "
                f"{needed / 2**30:.1f} GiB, or data_cache: false") from e
        if not meta["rows"]:
            raise DataError(f"dataset {source.name} has no readable images ({len(meta['skipped'])} unreadable: "
                            + "; ".join(meta["skipped"][:3]) + ")")
        opened = _open(config, source, path)
        if isinstance(opened, str):
            raise DataError(f"the data cache {path} just built cannot be read back ({opened}); check the volume")
    array, meta = opened
    source.skipped, source.indices = meta["skipped"], meta["rows"]
    return CachedImages(array, meta["rows"]), note


def training_dataset(config: TrainingConfig, main_process_first) -> tuple[ImageSource, torch.utils.data.Dataset, str]:
    """The images the loop trains on: (source, dataset, a line for the log). `main_process_first` is Accelerate's
    local_main_process_first: one process per node builds the cache, the others then map it."""
    source = load_image_source(config, scan=not config.data_cache)
    if not config.data_cache:
        return source, TrainDataset(source, build_transform(config)), "data cache off: decoding every epoch"
    with main_process_first():
        dataset, note = cached_dataset(config, source)
    return source, dataset, f"data cache {cache_path(config, source)} ({note})"
