"""The benchmark's second dataset: real photographs, so the defaults are not tuned to the built-in butterflies alone.

scikit-image ships a few colour photographs inside its wheel (no download: `skimage.data`'s bundled files). This cuts
`count` square crops from them at random positions and sizes (a quarter to the whole of the shorter side), resizes
each to `size` px and writes them as PNGs: an image folder that both loops read like the butterflies. Deterministic
for a seed. Unlike the butterflies (a flat background, saturated figures), these are textured natural scenes with
no common layout: a different distribution for the same model.

    python bench/photos.py OUT_DIR [--count 1000] [--size 128] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The RGB photographs bundled in the scikit-image wheel (skimage/data/*.png|jpg), not the fetched-on-demand ones.
# stereo_motorcycle returns (left, right, disparity): the left view is used.
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "stereo_motorcycle",
          "retina", "rocket")


def crop_boxes(shapes: list[tuple[int, int]], count: int, seed: int) -> list[tuple[int, int, int, int]]:
    """(photo index, top, left, side) of `count` square crops, photos in turn, sides 1/4..1 of the shorter side."""
    import numpy as np

    rng = np.random.default_rng(seed)
    boxes = []
    for i in range(count):
        k = i % len(shapes)
        h, w = shapes[k]
        side = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
        boxes.append((k, int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)), side))
    return boxes


def write_crops(out: Path, count: int = 1000, size: int = 128, seed: int = 0) -> Path:
    import skimage.data
    from PIL import Image

    loaded = [getattr(skimage.data, name)() for name in PHOTOS]
    photos = [(image[0] if isinstance(image, tuple) else image)[..., :3] for image in loaded]
    out.mkdir(parents=True, exist_ok=True)
    for i, (k, top, left, side) in enumerate(crop_boxes([p.shape[:2] for p in photos], count, seed)):
        crop = Image.fromarray(photos[k][top:top + side, left:left + side])
        crop.resize((size, size), Image.Resampling.LANCZOS).save(out / f"{i:04d}.png")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_crops(args.out, args.count, args.size, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
