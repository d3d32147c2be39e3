"""KolektorSDD: surface cracks on electrical commutators (Kolektor Group), pixel-annotated.

Data: 50 commutators (folders ``kosNN``), up to 8 grayscale images of each (``Part0..Part7``,
about 500x1250 px, portrait; 399 in all), each with a label image ``PartK_label.bmp`` whose
non-zero pixels mark a crack (52 images show one). Parts of one commutator look alike, so the
seeded 70/15/15 split is grouped by folder: a ``kosNN`` never lands in two splits.
Layout: ``kosNN/PartK.jpg`` + ``kosNN/PartK_label.bmp``.
Licence: CC BY-NC-SA 4.0 (ViCoS lab, University of Ljubljana, with Kolektor Group).
Reference: D. Tabernik, S. Sela, J. Skvarc, D. Skocaj, "Segmentation-based deep-learning
approach for surface-defect detection", Journal of Intelligent Manufacturing 31 (2020).
"""

from __future__ import annotations

from pathlib import Path

from core.data.base import (
    FormatTraits, IMAGE_SUFFIXES, DatasetIndex, MissingMaskError, SampleRecord, binary_mask_reader, build_index,
    reject_options, require_root, warn_skipped,
)

FORMAT = "kolektorsdd"
CLASSES = ["background", "crack"]
DEFAULT_SIZE = (320, 128)  # the parts are about 2.5 times taller than wide
LAYOUT = "the kosNN folders (kos01 ... kos50)"  # what --root must hold
LABEL_SUFFIX = "_label"
LABEL_EXTENSION = ".bmp"


def build(root: Path, seed: int = 0, strict: bool = False, **options) -> DatasetIndex:
    reject_options(FORMAT, options)
    root = require_root(root, LAYOUT)
    records: list[SampleRecord] = []
    skipped: list[dict] = []
    for other in sorted(p for p in root.iterdir() if p.is_file()):
        warn_skipped(other, "a file beside the kosNN folders (expected only folders)", skipped)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file())
        image_stems = {p.stem for p in files if p.suffix.lower() == ".jpg"}
        for path in files:
            suffix = path.suffix.lower()
            if suffix == ".jpg":
                label = path.with_name(f"{path.stem}{LABEL_SUFFIX}{LABEL_EXTENSION}")
                if not label.is_file():
                    raise MissingMaskError(
                        f"image {path} has no label {label.name} beside it; KolektorSDD needs "
                        f"{folder.name}/{label.name} (restore it or remove the image)"
                    )
                records.append(SampleRecord(str(path), str(label), label=1, group=folder.name))
            elif path.stem.endswith(LABEL_SUFFIX) and suffix == LABEL_EXTENSION:
                if path.stem.removesuffix(LABEL_SUFFIX) not in image_stems:
                    warn_skipped(path, "label without its image", skipped)
            elif suffix in IMAGE_SUFFIXES:
                warn_skipped(path, "not PartK.jpg or PartK_label.bmp", skipped)
            else:
                warn_skipped(path, "not an image", skipped)
    return build_index(
        FormatTraits(FORMAT, CLASSES, binary_mask_reader(1), DEFAULT_SIZE, require_masks=True, layout=LAYOUT),
        root, records, seed=seed, skipped=skipped, strict=strict,
    )
