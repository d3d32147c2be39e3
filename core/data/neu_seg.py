"""NEU-Seg: hot-rolled steel strip surface defects, pixel-annotated.

Data: 4470 grayscale images of 200x200 px (stored as RGB-encoded JPEG) with PNG masks whose
pixel value is the class index: 0 background, 1 inclusion, 2 patches, 3 scratches. Official
split (mmsegmentation layout): train 3129, val 894, test 447.
Layout: ``img_dir/{train,val,test}/NNNNNN.jpg`` and ``ann_dir/{train,val,test}/NNNNNN.png``.
Licence: released by Northeastern University for research use (K. Song et al.).
Reference: K. Song, Y. Yan, "A noise robust method based on completed local binary patterns
for hot-rolled steel strip surface defects", Applied Surface Science 285 (2013); segmentation
masks as redistributed in the NEU-Seg / mmsegmentation split.
"""

from __future__ import annotations

from pathlib import Path

from core.data.base import (
    FormatTraits, IMAGE_SUFFIXES, SPLITS, DatasetIndex, MissingMaskError, SampleRecord, build_index,
    index_mask_reader, list_images, reject_options, require_root, warn_skipped,
)

FORMAT = "neu-seg"
CLASSES = ["background", "inclusion", "patches", "scratches"]
DEFAULT_SIZE = (128, 128)
LAYOUT = "img_dir/ and ann_dir/"  # what --root must hold


def build(root: Path, seed: int = 0, strict: bool = False, **options) -> DatasetIndex:
    reject_options(FORMAT, options)
    root = require_root(root, LAYOUT)
    records, skipped = [], []
    for split in SPLITS:
        image_dir, mask_dir = root / "img_dir" / split, root / "ann_dir" / split
        if not image_dir.is_dir():
            continue
        for image in list_images(image_dir):
            mask = mask_dir / f"{image.stem}.png"
            if not mask.is_file():
                raise MissingMaskError(
                    f"image {image} has no mask {mask}; NEU-Seg needs ann_dir/{split}/{image.stem}.png: "
                    "restore the mask or remove the image"
                )
            records.append(SampleRecord(str(image), str(mask), split=split))
        for other in sorted(image_dir.iterdir()):
            if other.is_file() and other.suffix.lower() not in IMAGE_SUFFIXES:
                warn_skipped(other, "not an image", skipped)
    return build_index(
        FormatTraits(FORMAT, CLASSES, index_mask_reader, DEFAULT_SIZE, layout=LAYOUT),
        root, records, seed=seed, skipped=skipped, strict=strict,
    )
