"""CrackForest (CFD): cracks in urban road surfaces, pixel-annotated.

Data: colour road images of 480x320 px (width x height); the 118 annotated ones each have a
ground-truth file: a MATLAB ``.mat`` holding the struct ``groundTruth`` (1x1) whose field
``Segmentation`` is 1 = background, 2 = crack (mapped here to class ids 0 and 1); 22 published
files also hold 3 and 4 (whole areas enclosed by cracks), read as background with a warning
naming the files. Images
without ground truth are unlabeled: they are skipped and reported in ``skipped``. No official
split: the seeded 70/15/15 split of `core.data.base.seeded_split` is used.
Layout: ``image/NNN.jpg`` + ``groundTruth/NNN.mat``.
The ``.mat`` files are read with ``scipy.io.loadmat``, which parses MATLAB's format itself
(no pickle, no code run from the file).
Licence: released for research use by the authors (github.com/cuilimeng/CrackForest-dataset).
Reference: Y. Shi, L. Cui, Z. Qi, F. Meng, Z. Chen, "Automatic road crack detection using
random structured forests", IEEE Transactions on Intelligent Transportation Systems 17 (2016).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import scipy.io

from core.data.base import (
    IMAGE_SUFFIXES, CorruptImageError, DatasetIndex, FormatTraits, MaskValueError, NoImagesFoundError, SampleRecord,
    build_index, reject_options, require_root, warn_skipped,
)

FORMAT = "crackforest"
CLASSES = ["background", "crack"]
DEFAULT_SIZE = (128, 192)  # the images are 480 wide by 320 high
LAYOUT = "image/ and groundTruth/"  # what --root must hold
STRUCT = "groundTruth"
FIELD = "Segmentation"
GT_VALUES = {1: 0, 2: 1}  # CrackForest's Segmentation value -> class id


def _unwrap(value: object, depth: int = 0) -> object:
    """MATLAB cells and 1x1 structs load as nested object arrays: take the first element
    until a struct or a numeric array remains (with several annotators, the first one)."""
    while isinstance(value, np.ndarray) and value.dtype == object and value.size and depth < 8:
        value, depth = value.flat[0], depth + 1
    return value


def find_segmentation(mat: dict) -> np.ndarray | None:
    """``groundTruth.Segmentation`` of a loaded .mat file, or None where it has none."""
    struct = _unwrap(mat.get(STRUCT))
    if isinstance(struct, np.ndarray) and struct.dtype.names and struct.size:
        struct = struct.flat[0]
    if isinstance(struct, np.void) and struct.dtype.names and FIELD in struct.dtype.names:
        seg = _unwrap(struct[FIELD])
        if isinstance(seg, np.ndarray) and seg.ndim == 2 and seg.dtype.kind in "uifb":
            return seg
    return None


ENCLOSED_VALUES = (3, 4)  # areas enclosed by cracks in 22 published files: background by convention


def read_ground_truth(path: str | None, label: int, shape: tuple[int, int],
                      enclosed: set[str] | None = None) -> np.ndarray:
    """A CrackForest ``.mat`` -> uint8 class ids (0 background, 1 crack). Values 3 and 4
    (whole areas enclosed by cracks) are read as background, the usual reading, and the file
    is added to ``enclosed`` so the dataset can say which files had them."""
    if path is None:
        return np.zeros(shape, np.uint8)
    try:
        mat = scipy.io.loadmat(path, variable_names=[STRUCT])
    except NotImplementedError:  # MATLAB v7.3 files are HDF5, which loadmat does not read
        raise CorruptImageError([(path, "a MATLAB v7.3 (HDF5) file; save it with -v7")]) from None
    except Exception as exc:  # truncated or not a .mat file at all
        raise CorruptImageError([(path, f"not a readable MATLAB file ({exc})")]) from None
    seg = find_segmentation(mat)
    if seg is None:
        raise CorruptImageError([(path, f"holds no struct {STRUCT} with a 2-D field {FIELD}")])
    values = np.unique(seg)
    held = values.tolist()
    if enclosed is not None and any(v in ENCLOSED_VALUES for v in held):
        enclosed.add(str(path))
    bad = [v for v in held if v not in GT_VALUES and v not in ENCLOSED_VALUES]
    if bad:
        raise MaskValueError(
            f"ground truth {path} has {STRUCT}.{FIELD} value {bad[0]:g}; CrackForest uses "
            "1 = background, 2 = crack (3 and 4: areas enclosed by cracks, read as background): fix the "
            "file or remove it"
        )
    return (seg == 2).astype(np.uint8)


def build(root: Path, seed: int = 0, strict: bool = False, **options) -> DatasetIndex:
    reject_options(FORMAT, options)
    root = require_root(root, LAYOUT)
    image_dir, truth_dir = root / "image", root / "groundTruth"
    records: list[SampleRecord] = []
    skipped: list[dict] = []
    images = sorted(p for p in image_dir.iterdir() if p.is_file()) if image_dir.is_dir() else []
    truths = sorted(p for p in truth_dir.iterdir() if p.is_file()) if truth_dir.is_dir() else []
    image_stems = {p.stem for p in images if p.suffix.lower() in IMAGE_SUFFIXES}
    for path in images:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            warn_skipped(path, "not an image", skipped)
            continue
        truth = truth_dir / f"{path.stem}.mat"
        if not truth.is_file():
            warn_skipped(path, f"unlabeled: no ground truth groundTruth/{truth.name}", skipped)
            continue
        records.append(SampleRecord(str(path), str(truth), label=1))
    for path in truths:
        if path.suffix.lower() != ".mat":
            warn_skipped(path, "not a .mat ground-truth file", skipped)
        elif path.stem not in image_stems:
            warn_skipped(path, f"ground truth without its image image/{path.stem}.jpg", skipped)
    if not records and image_stems:
        raise NoImagesFoundError(
            f"none of the {len(image_stems)} images under {image_dir} has a ground-truth file "
            f"groundTruth/NNN.mat; add {truth_dir} with the .mat files"
        )
    enclosed: set[str] = set()
    index = build_index(
        FormatTraits(FORMAT, CLASSES, functools.partial(read_ground_truth, enclosed=enclosed), DEFAULT_SIZE,
                     native_channels=3, layout=LAYOUT),
        root, records, seed=seed, skipped=skipped, strict=strict,
    )
    if enclosed:
        names = ", ".join(sorted(Path(p).name for p in enclosed))
        index.warnings.append(
            f"{len(enclosed)} ground-truth file(s) hold {STRUCT}.{FIELD} values 3/4 (areas enclosed by cracks), "
            f"read as background (crack = 2 only): {names}"
        )
    index.read_mask = read_ground_truth  # later reads need no record of it
    return index
