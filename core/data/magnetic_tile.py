"""Magnetic tile: surface defects of magnetic tiles (CASIA), pixel-annotated.

Data: 1344 grayscale images of varying size (roughly 100-600 px a side), one folder per class:
Blowhole 115, Break 85, Crack 57, Fray 32, Uneven 103 and Free 952 (defect-free). Each image
``<name>.jpg`` has its mask ``<name>.png`` beside it, anti-aliased 0..255: pixels >= 128 belong
to the folder's class, the rest is background (MT_Free masks are all zero). No official split:
the seeded, class-stratified 70/15/15 split of `core.data.base.seeded_split` is used.
Layout: ``MT_<Class>/Imgs/<name>.jpg`` + ``MT_<Class>/Imgs/<name>.png``.
Licence: published by the Institute of Automation, Chinese Academy of Sciences, free for
research use (distributed at github.com/abin24/Magnetic-tile-defect-datasets).
Reference: Y. Huang, C. Qiu, K. Yuan, "Surface defect saliency of magnetic tile",
The Visual Computer 36 (2020) 85-96.
"""

from __future__ import annotations

from pathlib import Path

from core.data.base import (
    FormatTraits, DatasetIndex, MissingMaskError, SampleRecord, binary_mask_reader, build_index, reject_options,
    require_root, warn_skipped,
)

FORMAT = "magnetic-tile"
CLASSES = ["background", "blowhole", "break", "crack", "fray", "uneven"]
DEFAULT_SIZE = (256, 256)
LAYOUT = "the MT_<Class> folders (MT_Blowhole, ..., MT_Free)"  # what --root must hold
THRESHOLD = 128  # masks are anti-aliased: the annotated region is where they reach half scale
FREE_FOLDER = "MT_Free"
IMAGE_SUFFIX = ".jpg"
MASK_SUFFIX = ".png"


def folder_label(name: str) -> int | None:
    """MT_<Class> -> class id (MT_Free -> 0, background); None for any other folder."""
    if name == FREE_FOLDER:
        return 0
    if name.startswith("MT_") and name[3:].lower() in CLASSES[1:]:
        return CLASSES.index(name[3:].lower())
    return None


def build(root: Path, seed: int = 0, strict: bool = False, **options) -> DatasetIndex:
    reject_options(FORMAT, options)
    root = require_root(root, LAYOUT)
    records: list[SampleRecord] = []
    skipped: list[dict] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        label = folder_label(folder.name)
        if label is None:
            warn_skipped(folder, "not a magnetic-tile class folder (MT_Blowhole, MT_Break, "
                         "MT_Crack, MT_Fray, MT_Uneven, MT_Free)", skipped)
            continue
        images_dir = folder / "Imgs"
        if not images_dir.is_dir():
            warn_skipped(folder, "has no Imgs/ folder", skipped)
            continue
        files = sorted(p for p in images_dir.iterdir() if p.is_file())
        stems = {p.stem for p in files if p.suffix.lower() == IMAGE_SUFFIX}
        for path in files:
            suffix = path.suffix.lower()
            if suffix == IMAGE_SUFFIX:
                mask = path.with_suffix(MASK_SUFFIX)
                if not mask.is_file():
                    raise MissingMaskError(
                        f"image {path} has no mask {mask.name} beside it; magnetic-tile needs "
                        f"{folder.name}/Imgs/{path.stem}{MASK_SUFFIX} (restore it or remove the image)"
                    )
                records.append(SampleRecord(str(path), str(mask), label=label))
            elif suffix == MASK_SUFFIX:
                if path.stem not in stems:
                    warn_skipped(path, f"mask without its image {path.stem}{IMAGE_SUFFIX}", skipped)
            else:
                warn_skipped(path, "not an image", skipped)
    index = build_index(
        FormatTraits(FORMAT, CLASSES, binary_mask_reader(THRESHOLD), DEFAULT_SIZE, require_masks=True, layout=LAYOUT),
        root, records, seed=seed, skipped=skipped, strict=strict,
    )
    empty = index.samples[(index.samples["label"] > 0) & (index.samples["classes"].map(max) == 0)]
    for image in empty["image"]:
        index.warnings.append(
            f"mask of {image} marks no pixel at threshold {THRESHOLD}; the image trains as defect-free"
        )
    return index
