"""How long the built-in synthetic datasets take to generate on first use, and to load from
the cache afterwards, at default settings (300 images of 128 px, seed 0).

    .venv/bin/python bench/synthetic_generation.py [--num-images 300] [--image-size 128]

Generates into a fresh temporary folder, so the workspace cache is never touched. The
product's target: the default dataset (synthetic-steel) in under 20 s on a 2-core machine,
a cached load in under 2 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.data import synthetic  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=synthetic.DEFAULT_NUM_IMAGES)
    parser.add_argument("--image-size", type=int, default=synthetic.DEFAULT_IMAGE_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{args.num_images} images of {args.image_size} px, seed {args.seed}, "
          f"{os.cpu_count()} CPU(s)")
    print(f"{'family':<8} {'first use s':>11} {'generate s':>10} {'cached load s':>13} "
          f"{'defect-free':>11}  images per class")
    with tempfile.TemporaryDirectory() as tmp:
        for family in synthetic.FAMILIES:
            options = dict(family=family, num_images=args.num_images, image_size=args.image_size)
            start = time.perf_counter()
            synthetic.ensure_generated(tmp, seed=args.seed, **options)
            generated = time.perf_counter() - start
            synthetic.build(tmp, seed=args.seed, **options)
            first_use = time.perf_counter() - start
            start = time.perf_counter()
            index = synthetic.build(tmp, seed=args.seed, **options)
            cached = time.perf_counter() - start
            per_class = index.images_per_class()
            free = sum(1 for present in index.samples["classes"] if not [c for c in present if c])
            counts = ", ".join(f"{name} {n}" for name, n in per_class.items() if name != "background")
            print(f"{family:<8} {first_use:>11.2f} {generated:>10.2f} {cached:>13.2f} "
                  f"{free / len(index.samples):>11.0%}  {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
