"""The pre-decoded dataset: every image decoded, converted and resized once into one uint8 array on disk.

Training then slices a memory-mapped file instead of decoding PNG/JPEG every epoch: no DataLoader workers are
needed, all ranks on a node share one copy through the page cache, and a later run (or a restarted pod) with the
same images and preprocessing reuses the file. The key covers everything that changes the pixels: the dataset's
fingerprint (datasets hashes the data files), image_size, center_crop and CACHE_VERSION.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from trainer.config import TrainingConfig
from trainer.data import DataError, ImageSource, TrainDataset, available_cpus, build_transform, load_image_source

CACHE_VERSION = 1  # bump when build_transform's output changes


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
            return i, self.transform(self.source.load(i).convert("RGB"))
        except Exception as e:  # PIL raises many types for corrupt data
            return i, f"{type(e).__name__}: {e}"


def _build_workers(num_images: int) -> int:
    return 0 if num_images < 512 else min(8, available_cpus())  # starting workers costs more than a few images


def _identity(item):
    return item


def _build(config: TrainingConfig, source: ImageSource, path: Path) -> None:
    """Decode everything (in parallel) into `path` atomically: a crash leaves only a .tmp file, never a bad cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        meta = _write(config, source, tmp)
        # The sidecar first, the array renamed last: the array's presence means the cache is complete.
        path.with_suffix(".json").write_text(json.dumps(meta))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write(config: TrainingConfig, source: ImageSource, tmp: Path) -> dict:
    size = config.image_size
    array = open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(source.length, 3, size, size))
    rows, skipped = [], []
    loader = torch.utils.data.DataLoader(_Decode(source, build_transform(config)), batch_size=None,
                                         num_workers=_build_workers(source.length), collate_fn=_identity)
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


def cached_dataset(config: TrainingConfig, source: ImageSource) -> tuple[CachedImages, bool]:
    """The cache for (config, source), built first if missing; also fills source.skipped/indices.
    Returns (dataset, whether it was built now). Call it on one process per node first (Accelerate's
    local_main_process_first); concurrent builders on a shared volume are safe, each renames a finished file."""
    path = cache_path(config, source)
    built = not path.exists()
    if built:
        try:
            _build(config, source, path)
        except OSError as e:
            raise DataError(f"cannot write the data cache {path}: {e}; set data_cache_dir to a writable volume "
                            f"with room for {source.length * 3 * config.image_size ** 2 / 2**30:.1f} GiB, "
                            f"or data_cache: false") from e
    meta = json.loads(path.with_suffix(".json").read_text())
    source.skipped, source.indices = meta["skipped"], meta["rows"]
    if not meta["rows"]:
        raise DataError(f"dataset {source.name} has no readable images ({len(meta['skipped'])} unreadable)")
    return CachedImages(np.load(path, mmap_mode="r"), meta["rows"]), built


def training_dataset(config: TrainingConfig, main_process_first) -> tuple[ImageSource, torch.utils.data.Dataset, str]:
    """The images the loop trains on: (source, dataset, a line for the log). `main_process_first` is Accelerate's
    local_main_process_first: one process per node builds the cache, the others then map it."""
    source = load_image_source(config, scan=not config.data_cache)
    if not config.data_cache:
        return source, TrainDataset(source, build_transform(config)), "data cache off: decoding every epoch"
    with main_process_first():
        dataset, built = cached_dataset(config, source)
    return source, dataset, f"data cache {cache_path(config, source)} ({'built now' if built else 'reused'})"
