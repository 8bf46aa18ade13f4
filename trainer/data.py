"""Training images: a Hub dataset, an image folder, or the built-in set; the tutorial's preprocessing; the DataLoader.

Random horizontal flips are not done here: the training step draws them per global batch from the seed and the
step (trainer.diffusion), so data loading is deterministic and resume/world-size changes cannot alter them.
Images travel as uint8 (a quarter of the bytes of float32 through workers, pinned memory and the host-to-device
copy); `to_model_range` scales them to [-1, 1] on the device.
"""

from __future__ import annotations

import colorsys
import io
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from trainer.config import TrainingConfig
from trainer.errors import DataError, TransientError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageSource:
    """An indexable set of images: `load(i)` returns a PIL image (or raises for a corrupt file)."""

    name: str
    length: int
    load: Callable[[int], Image.Image]
    skipped: list[str] = field(default_factory=list)  # unreadable entries, with the reason
    indices: list[int] | None = None  # the readable entries (None: all, or not scanned yet)
    fingerprint: str = ""  # changes when the images change (datasets' fingerprint); keys the tensor cache
    describe: Callable[[int], str] = str  # entry i for error messages (its file path where known)
    files: Callable[[], list[str]] | None = None  # the files the images are read from (the cache's content digest)

    def __len__(self) -> int:
        return self.length if self.indices is None else len(self.indices)


def _hf_source(name: str, dataset, scan: bool) -> ImageSource:
    from datasets import Image as ImageFeature

    column = next((c for c, f in dataset.features.items() if isinstance(f, ImageFeature)), None)
    if column is None:
        raise DataError(f"dataset {name} has no image column (features: {list(dataset.features)})")
    raw = dataset.cast_column(column, ImageFeature(decode=False))  # decode ourselves, so bad files are caught

    def load(i: int) -> Image.Image:
        item = raw[i][column]
        data = item.get("bytes")
        image = Image.open(io.BytesIO(data)) if data else Image.open(item["path"])
        image.load()
        return image

    def describe(i: int) -> str:
        item = raw[i][column]
        return item.get("path") or f"row {i}"

    def files() -> list[str]:
        """Image files on disk (imagefolder), and the dataset's Arrow files when images are embedded in them."""
        images = raw.data.column(column).combine_chunks()
        paths, embedded = images.field("path").to_pylist(), images.field("bytes").is_valid().to_pylist()
        on_disk = sorted({p for p, inside in zip(paths, embedded) if p and not inside})
        return on_disk + ([f["filename"] for f in dataset.cache_files] if any(embedded) else [])

    source = ImageSource(name, len(raw), load, fingerprint=dataset._fingerprint, describe=describe, files=files)
    if scan:
        _drop_unreadable(source, describe)
    return source


def _drop_unreadable(source: ImageSource, describe: Callable[[int], str]) -> None:
    """Decode every image once; unreadable ones are skipped and counted (never a crash, never silent)."""
    good = []
    for i in range(source.length):
        try:
            to_rgb(source.load(i))  # the conversion may refuse an image too (mode F)
            good.append(i)
        except Exception as e:  # PIL raises many types for corrupt data
            source.skipped.append(f"{describe(i)}: {type(e).__name__}: {e}")
    source.indices = good


def load_image_source(config: TrainingConfig, scan: bool = True) -> ImageSource:
    """The configured images. `scan` decodes every image once to find unreadable ones; the tensor cache
    (trainer.data_cache) skips it, since building the cache decodes every image anyway."""
    if config.dataset_name == "builtin:butterflies":
        images = ButterflyImages(config.builtin_num_images, config.image_size)
        return ImageSource(config.dataset_name, len(images), images.__getitem__,
                           fingerprint=f"{config.dataset_name}:{len(images)}:{config.image_size}")

    import datasets

    if config.dataset_name == "imagefolder":
        folder = Path(config.train_data_dir)
        if not folder.is_dir():
            raise DataError(f"train_data_dir {folder} does not exist or is not a folder; mount or copy images there")
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*")):
            raise DataError(f"train_data_dir {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
        source = _hf_source(f"imagefolder:{folder}", dataset, scan)
    else:
        dataset = _load_hub_dataset(config.dataset_name)
        source = _hf_source(config.dataset_name, dataset, scan)

    if scan and not len(source):
        raise DataError(f"dataset {source.name} has no readable images ({len(source.skipped)} unreadable: "
                        + "; ".join(source.skipped[:3]) + ")")
    return source


def _load_hub_dataset(name: str):
    """datasets.load_dataset(name, split="train"). A Hub that cannot be reached is transient (TransientError, exit 1:
    a retry may succeed); an id that does not exist, or offline mode without a cached copy, is not (exit 2)."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    where = ("download it where you have network (it lands in HF_HOME's cache), or copy the images into a folder "
             "and use dataset_name: imagefolder with train_data_dir, or use builtin:butterflies")
    try:
        return datasets.load_dataset(name, split="train")
    except DatasetNotFoundError as e:
        raise DataError(f"Hub dataset '{name}' does not exist or is private: {e}\n  check the id (and HF_TOKEN for a "
                        f"private or gated dataset); or {where}") from e
    except ConnectionError as e:
        if "OfflineMode" in str(e) or os.environ.get("HF_HUB_OFFLINE") == "1" or \
                os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise DataError(f"cannot load Hub dataset '{name}': HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and it is "
                            f"not in the cache\n  unset them, or {where}") from e
        raise TransientError(f"cannot reach the Hub for dataset '{name}' ({e}); this is retried (exit 1). If the "
                             f"network is gone for good: {where}") from e


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # greyscale, 0..65535 (PIL opens 16-bit PNG/TIFF so)


def to_rgb(image: Image.Image) -> Image.Image:
    """image.convert('RGB'), except for high-bit-depth greyscale, which PIL clips at 255 (50 % grey in a 16-bit PNG
    became white): those are scaled from 0..65535 to 0..255 (mode I, 32-bit, is read in the same 16-bit range,
    as PIL's PNG and TIFF readers fill it; larger values saturate). A float image (mode F) has no range to scale
    from and is refused (the file is skipped, and says why). 16-bit RGB(A) PNGs already arrive as 8-bit RGB(A)."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        scaled = (np.clip(values, 0, 65535) * 255 + 32767) // 65535  # rounded: 32768 -> 128, 65535 -> 255
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")  # mode L
    if image.mode == "F":
        raise ValueError("a 32-bit float image has no known value range; save it as an 8- or 16-bit PNG")
    return image.convert("RGB")


def build_transform(config: TrainingConfig) -> transforms.Compose:
    """The tutorial's preprocessing, after .convert('RGB'), to a uint8 CHW tensor: the flip is drawn in the step
    and ToTensor/Normalize are `to_model_range` on the device (see module doc)."""
    size = config.image_size
    resize = (
        [transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR), transforms.CenterCrop(size)]
        if config.center_crop
        else [transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR)]
    )
    return transforms.Compose([*resize, transforms.PILToTensor()])


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]: the tutorial's ToTensor + Normalize([0.5], [0.5])."""
    return images.float().div_(127.5).sub_(1.0)


class TrainDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses on every access (the tutorial's way); `data_cache` replaces it with CachedImages."""

    def __init__(self, source: ImageSource, transform: Callable):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        index = i if self.source.indices is None else self.source.indices[i]
        return self.transform(to_rgb(self.source.load(index)))


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a pod's CPU limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def default_num_workers(local_world_size: int) -> int:
    """Split this pod's CPUs between its local processes, keeping one core per process for the step itself."""
    return max(0, min(8, available_cpus() // max(1, local_world_size) - 1))


def worker_init(worker_id: int) -> None:
    # SIGTERM and SIGINT are the main process's to handle (finish the step, checkpoint); a worker dying on them
    # would crash the step instead. A signal sent to the whole process group (Ctrl-C, pkill) reaches workers too.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_dataloader(config: TrainingConfig, dataset, local_world_size: int) -> torch.utils.data.DataLoader:
    workers = config.dataloader_num_workers
    if workers is None:
        # Slicing a memory-mapped cache costs microseconds: worker processes would only add IPC.
        workers = 0 if getattr(dataset, "cached", False) else default_num_workers(local_world_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        shuffle=True,  # Accelerate swaps in a SeedableRandomSampler: same order on every rank, per epoch
        drop_last=True,  # every global batch is full, so it is the same images whatever the world size
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        worker_init_fn=worker_init,
    )


# ---- real reference images (the quality metric's) -----------------------------------------------------------------------------------
def real_images(config, num_images: int, *, dataset=None, seed: int | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """`num_images` distinct training images as uint8 (N, image_size, image_size, 3), drawn without replacement in
    an order fixed by `seed` (default config.seed). `dataset` is the training dataset the loop built (items
    (3, H, W), preprocessed as for training); by default one is built from the config with load_image_source and
    build_transform. With random_flip, each image is mirrored with probability 1/2, as the model saw them.
    Raises DataError if the dataset has fewer images."""
    if dataset is None:
        dataset = TrainDataset(load_image_source(config), build_transform(config))
    if num_images > len(dataset):
        raise DataError(f"{num_images} real images requested but dataset {config.dataset_name} has "
                        f"{len(dataset)}; compare fewer images")
    generator = torch.Generator("cpu").manual_seed(config.seed if seed is None else seed)
    order = torch.randperm(len(dataset), generator=generator)[:num_images]
    flips = torch.rand(num_images, generator=generator) < 0.5
    images = to_uint8(torch.stack([dataset[int(i)] for i in order]))
    if config.random_flip:
        images[flips] = images[flips].flip(2)
    return images.to(device)


def num_quality_images(config, dataset_size: int) -> int:
    """Images the training loop scores at each evaluation: eval_quality_images, at most the dataset's size
    (the reference set has no repeats); 0 when off or when fewer than 2 would be left."""
    count = min(config.eval_quality_images, dataset_size)
    return count if count >= 2 else 0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Training images (N, 3, H, W) -> uint8 (N, H, W, 3). uint8 values are kept; floats are read as the model's
    [-1, 1] range and quantised as the diffusers pipelines quantise generated images. Non-finite floats are refused:
    clamping would make NaN black and inf white, an image that looks like a result."""
    if images.dtype != torch.uint8:
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images with NaN/inf values cannot be quantised (or scored)")
        images = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous()

# ---- built-in dataset: builtin:butterflies ----------------------------------------------------------------------------
# `builtin:butterflies`: an offline stand-in for huggan/smithsonian_butterflies_subset.
#
# Each image is drawn from its own index (numpy Generator seeded with (DATASET_SEED, index)), so the dataset is
# the same on every machine and rank, needs no download, and renders at any image_size. A figure is left-right
# symmetric by construction: every pixel is coloured from |x|.

DATASET_SEED = 20240531  # fixed: the dataset must not change with the training seed
SUPERSAMPLE = 2  # draw at 2x, then downsample with a box filter for smooth edges


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _wing(ax, y, rng, angle_deg, length, width):
    """Masks (inside, edge band, spots, stripes) of one wing rooted near the body, in |x| coordinates."""
    a = np.deg2rad(angle_deg)
    u = (ax - 0.04) * np.cos(a) + y * np.sin(a)  # along the wing
    v = -(ax - 0.04) * np.sin(a) + y * np.cos(a)  # across the wing
    p = rng.uniform(1.6, 3.0)  # superellipse exponent: round to boxy wings
    lobes, depth = rng.integers(0, 4), rng.uniform(0.0, 0.12)
    theta = np.arctan2(v, u - length / 2)
    scale = 1.0 + depth * np.cos(lobes * theta)  # scalloped outline
    d = (np.abs((u - length / 2) / (length / 2)) ** p + np.abs(v / (width / 2)) ** p) ** (1 / p) / scale
    inside = d <= 1.0
    edge = inside & (d >= 1.0 - rng.uniform(0.12, 0.3))
    spots = np.zeros_like(inside)
    for _ in range(rng.integers(0, 4)):
        cu, cv = rng.uniform(0.3, 0.8) * length, rng.uniform(-0.25, 0.25) * width
        r = rng.uniform(0.05, 0.12) * length
        spots |= (u - cu) ** 2 + (v - cv) ** 2 <= r**2
    stripes = inside & (np.sin(u * rng.uniform(12, 30)) > 0.55) if rng.random() < 0.35 else np.zeros_like(inside)
    return inside, edge, spots & inside, stripes


def render_butterfly(index: int, image_size: int) -> Image.Image:
    rng = np.random.default_rng([DATASET_SEED, index])
    n = image_size * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
    y, x = np.meshgrid(-coords, coords, indexing="ij")  # y up
    zoom = rng.uniform(0.8, 1.05)
    x, y = x / zoom, (y - rng.uniform(-0.08, 0.08)) / zoom
    ax = np.abs(x)

    hue = rng.random()
    img = np.empty((n, n, 3), dtype=np.float32)
    img[:] = _rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.85, 1.0))  # plain light background
    palette = [_rgb(hue + rng.uniform(-0.5, 0.5), rng.uniform(0.5, 1.0), rng.uniform(0.35, 1.0)) for _ in range(4)]

    # lower wings first, upper wings drawn over them
    for angle, length, width, (base, edge_c, spot_c) in (
        (rng.uniform(-65, -30), rng.uniform(0.4, 0.7), rng.uniform(0.3, 0.5), (palette[1], palette[2], palette[3])),
        (rng.uniform(15, 50), rng.uniform(0.6, 0.95), rng.uniform(0.35, 0.6), (palette[0], palette[2], palette[3])),
    ):
        inside, edge, spots, stripes = _wing(ax, y, rng, angle, length, width)
        img[inside] = base
        img[stripes] = base * 0.55
        img[edge] = edge_c
        img[spots] = spot_c

    body = (ax / 0.045) ** 2 + (y / rng.uniform(0.35, 0.5)) ** 2 <= 1.0
    img[body] = _rgb(rng.random(), 0.3, rng.uniform(0.1, 0.3))
    antennae = (y > 0.3) & (y < 0.62) & (np.abs(ax - 0.35 * (y - 0.3)) < 0.012)
    img[antennae] = img[body].mean(0) if body.any() else 0.2

    pil = Image.fromarray((img * 255).round().astype(np.uint8), "RGB")
    return pil.resize((image_size, image_size), Image.Resampling.BOX)


class ButterflyImages:
    """A fixed-length, indexable collection of generated butterfly images (PIL, RGB)."""

    def __init__(self, num_images: int, image_size: int):
        self.num_images, self.image_size = num_images, image_size

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> Image.Image:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        return render_butterfly(index, self.image_size)
