"""Generic folder: any images with masks of matching file stems, for a user's own data.

Data: ``images/<stem>.<ext>`` and ``masks/<stem>.<ext>`` (any of .png .bmp .tif .jpg ...; masks
should be lossless). The class map is given by options:

- values mode (default): the mask's pixel value is the class id; ``class_names`` names the ids
  0..n-1 (default ``["background", "defect"]``). ``threshold=T`` reads 0/255-style binary
  masks instead: pixels >= T are class 1.
- colour mode: ``colours`` lists one exact RGB colour per class name (same order); any other
  colour in a mask is an error, since a guessed class would silently corrupt training.

Options: ``images`` and ``masks`` (folders inside ``root``, relative to it; one that resolves
outside it is refused; default ``root/images`` and ``root/masks``), ``class_names``, ``colours``, ``threshold``. Every image
needs its mask. No official split: the seeded, class-stratified 70/15/15 split of
`core.data.base.seeded_split` is used.
Licence and reference: those of the user's data; nothing is assumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from core.data.base import (
    IMAGE_SUFFIXES, CorruptImageError, DatasetIndex, DatasetRootMissingError, FormatTraits, InvalidOptionError,
    MaskReader, MaskValueError, MissingMaskError, SampleRecord, build_index, check_class_names, decode_file,
    probe_image, option_folder, read_label_image, reject_options, require_root, size_keeping_aspect, warn_skipped,
)

FORMAT = "folder"
CLASSES = ["background", "defect"]  # the default class map; `class_names` replaces it
DEFAULT_SIZE = (256, 256)  # the index's default keeps the first image's aspect ratio
LAYOUT = "images/ and masks/ (or pass options images= and masks=)"  # what --root must hold
MASK_PRIORITY = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")  # lossless first


def values_reader(class_names: Sequence[str]) -> MaskReader:
    """Masks whose pixel values are class ids; values beyond the map name the way out."""
    n = len(class_names)

    def read(path: str | None, label: int, shape: tuple[int, int]) -> np.ndarray:
        if path is None:
            return np.zeros(shape, np.uint8)
        mask = read_label_image(path)
        top = int(mask.max()) if mask.size else 0
        if top >= n:
            hint = (" (0/255 masks: pass option threshold=128)" if n == 2 and top == 255 else "")
            raise MaskValueError(
                f"mask {path} holds value {top}, outside the class map 0..{n - 1} "
                f"({', '.join(class_names)}); give one class name per value with option "
                f"class_names{hint}, or fix the mask"
            )
        return mask.astype(np.uint8, copy=False)

    return read


def threshold_reader(threshold: int) -> MaskReader:
    """Binary masks (0/255 and the like): pixels >= threshold are class 1."""

    def read(path: str | None, label: int, shape: tuple[int, int]) -> np.ndarray:
        if path is None:
            return np.zeros(shape, np.uint8)
        return (read_label_image(path) >= threshold).astype(np.uint8)

    return read


def colour_reader(class_names: Sequence[str], colours: Sequence[tuple[int, int, int]]) -> MaskReader:
    """Masks painted in one exact RGB colour per class."""
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], np.int64)
    order = np.argsort(keys)
    sorted_keys, class_of = keys[order], order.astype(np.uint8)

    def read(path: str | None, label: int, shape: tuple[int, int]) -> np.ndarray:
        if path is None:
            return np.zeros(shape, np.uint8)
        mask = decode_file(path, cv2.IMREAD_UNCHANGED, "mask")
        if mask is None:
            raise CorruptImageError([(path, "mask is not a decodable image")])
        if mask.ndim == 2:
            rgb = np.repeat(mask[..., None], 3, axis=2)
        else:
            rgb = cv2.cvtColor(mask[..., :3], cv2.COLOR_BGR2RGB)
        rgb = rgb.astype(np.int64)
        key = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        pos = np.clip(np.searchsorted(sorted_keys, key), 0, len(sorted_keys) - 1)
        known = sorted_keys[pos] == key
        if not known.all():
            y, x = np.argwhere(~known)[0]
            colour = tuple(int(c) for c in rgb[y, x])
            listed = ", ".join(f"{name} {tuple(c)}" for name, c in zip(class_names, colours))
            raise MaskValueError(
                f"mask {path} has colour {colour} (first at x={x}, y={y}; {int((~known).sum())} "
                f"pixels) that is not in the class map ({listed}); add it to option colours "
                "with a class name, or repaint those pixels (anti-aliased edges are not allowed)"
            )
        return class_of[pos].astype(np.uint8)

    return read


def _check_options(
    class_names: Sequence[str] | None, colours: Sequence[Sequence[int]] | None, threshold: int | None
) -> tuple[list[str], list[tuple[int, int, int]] | None]:
    names = check_class_names(class_names if class_names is not None else list(CLASSES))
    if threshold is not None and (not isinstance(threshold, int) or isinstance(threshold, bool)):
        raise InvalidOptionError(f"threshold must be a whole number 1..255, not {threshold!r}")
    if colours is not None and not isinstance(colours, (list, tuple)):
        raise InvalidOptionError(f"colours must be a list of RGB triples, e.g. [[0, 0, 0], [255, 0, 0]]; not {colours!r}")
    if colours is None:
        if threshold is not None and (len(names) != 2 or not 1 <= int(threshold) <= 255):
            raise InvalidOptionError(
                f"threshold={threshold} reads binary masks, so it needs exactly two class names "
                f"(got {len(names)}) and a value 1..255"
            )
        return names, None
    if threshold is not None:
        raise InvalidOptionError("give either colours or threshold, not both")
    parsed = []
    for colour in colours:
        values = list(colour) if isinstance(colour, (list, tuple)) else []
        if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in values):
            raise InvalidOptionError(
                f"colour {colour!r} is not an RGB triple of 0..255 integers, e.g. [255, 0, 0]"
            )
        parsed.append((int(values[0]), int(values[1]), int(values[2])))
    if len(parsed) != len(names):
        raise InvalidOptionError(
            f"{len(parsed)} colours for {len(names)} class names; give one colour per class name, "
            "in the same order (background first)"
        )
    if len(set(parsed)) != len(parsed):
        raise InvalidOptionError(f"colours {parsed} repeat a colour; each class needs its own")
    return names, parsed


def build(
    root: Path,
    seed: int = 0,
    images: str | Path | None = None,
    masks: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    colours: Sequence[Sequence[int]] | None = None,
    threshold: int | None = None,
    strict: bool = False, **options,
) -> DatasetIndex:
    reject_options(FORMAT, options, ["images", "masks", "class_names", "colours", "threshold"])
    root = require_root(root, LAYOUT)
    names, parsed = _check_options(class_names, colours, threshold)
    image_dir = option_folder(root, images, "images", "images")
    mask_dir = option_folder(root, masks, "masks", "masks")
    for what, folder, option in (("images", image_dir, "images"), ("masks", mask_dir, "masks")):
        if not folder.is_dir():
            raise DatasetRootMissingError(
                f"{what} folder {folder} does not exist; create it or pass option {option}=FOLDER"
            )
    skipped: list[dict] = []
    mask_of: dict[str, Path] = {}
    for path in sorted(p for p in mask_dir.iterdir() if p.is_file()):
        suffix = path.suffix.lower()
        if suffix not in IMAGE_SUFFIXES:
            warn_skipped(path, "not an image", skipped)
            continue
        held = mask_of.get(path.stem)
        if held is None or MASK_PRIORITY.index(suffix) < MASK_PRIORITY.index(held.suffix.lower()):
            mask_of[path.stem] = path
    records: list[SampleRecord] = []
    for path in sorted(p for p in image_dir.iterdir() if p.is_file()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            warn_skipped(path, "not an image", skipped)
            continue
        mask = mask_of.pop(path.stem, None)
        if mask is None:
            raise MissingMaskError(
                f"image {path} has no mask {mask_dir}/{path.stem}.png (any image extension); "
                "add the mask with the same file stem or remove the image"
            )
        records.append(SampleRecord(str(path), str(mask)))
    for stem, mask in sorted(mask_of.items()):
        warn_skipped(mask, f"mask without an image named {stem}.* in {image_dir}", skipped)
    if parsed is not None:
        reader = colour_reader(names, parsed)
    elif threshold is not None:
        reader = threshold_reader(int(threshold))
    else:
        reader = values_reader(names)
    index = build_index(
        FormatTraits(FORMAT, names, reader, DEFAULT_SIZE, native_channels=3, require_masks=True, layout=LAYOUT),
        root, records, seed=seed, skipped=skipped, strict=strict,
    )
    height, width, channels = probe_image(index.samples["image"].iloc[0])
    index.native_channels = channels
    index.default_size = size_keeping_aspect(height, width, short_side=DEFAULT_SIZE[0])
    return index
