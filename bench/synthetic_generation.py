"""How long the built-in synthetic datasets take to generate on first use, and to load from
the cache afterwards, at default settings (300 images of 128 px, seed 0).

    .venv/bin/python bench/synthetic_generation.py [--num-images 300] [--image-size 128] [--out FILE.md]

Generates into a fresh temporary folder, so the workspace cache is never touched. The
product's target: the default dataset (synthetic-steel) in under 20 s on a 2-core machine,
a cached load in under 2 s. The table is printed and written to ``--out`` (default
bench/results/synthetic_generation.md) with the command and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.data import synthetic  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=synthetic.DEFAULT_NUM_IMAGES)
    parser.add_argument("--image-size", type=int, default=synthetic.DEFAULT_IMAGE_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "synthetic_generation.md")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    header = ["family", "first use s", "generate s", "cached load s", "defect-free", "images per class"]
    rows = []
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
            rows.append([family, f"{first_use:.2f}", f"{generated:.2f}", f"{cached:.2f}",
                         f"{free / len(index.samples):.0%}", counts])
            print("  ".join(rows[-1]), flush=True)
    command = "python bench/synthetic_generation.py " + shlex.join(sys.argv[1:])
    lines = ["# Synthetic datasets: generation and cached-load time", "", f"Command: `{command.strip()}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s); load average {load_before:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end (other work shares the CPU when it is above 0). "
             f"{args.num_images} images of {args.image_size} px, seed {args.seed}. "
             "Targets: first use of the default (steel) under 20 s, a cached load under 2 s.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
