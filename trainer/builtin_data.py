"""`builtin:butterflies`: an offline stand-in for huggan/smithsonian_butterflies_subset.

Each image is drawn from its own index (numpy Generator seeded with (DATASET_SEED, index)), so the dataset is
the same on every machine and rank, needs no download, and renders at any image_size. A figure is left-right
symmetric by construction: every pixel is coloured from |x|.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

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
