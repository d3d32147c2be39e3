"""What every dataset format shares: the sample index, named errors, image and mask reading,
validation, and the seeded split.

A format module builds a list of `SampleRecord`s (image path, mask path or none, and the
label a binary mask stands for) plus a mask reader, and hands them to `build_index`, which
reads every image and mask once, validates them, and returns a `DatasetIndex` whose
``samples`` DataFrame has the columns

    image, mask, label, group, split, height, width, classes, pixel_counts

``classes`` is the tuple of class ids present in the mask (background 0 included when
present); ``pixel_counts`` is a tuple with one pixel count per class of the class map.
Nothing in the dataset folder is ever written.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from core.errors import DefectPruneError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
SAMPLE_COLUMNS = [
    "image", "mask", "label", "group", "split", "height", "width", "classes", "pixel_counts",
]


# ---------------------------------------------------------------- named errors
class DatasetError(DefectPruneError):
    """Base of every problem with a dataset on disk."""


class DatasetRootMissingError(DatasetError):
    pass


class NoImagesFoundError(DatasetError):
    pass


class MissingMaskError(DatasetError):
    pass


class MaskSizeMismatchError(DatasetError):
    pass


class MaskValueError(DatasetError):
    pass


class CorruptImageError(DatasetError):
    """One or more images or masks could not be decoded; lists every one of them at once."""

    def __init__(self, failures: Sequence[tuple[str, str]]):
        self.failures = list(failures)
        lines = "; ".join(f"{path}: {reason}" for path, reason in self.failures[:20])
        more = f" (and {len(self.failures) - 20} more)" if len(self.failures) > 20 else ""
        super().__init__(
            f"{len(self.failures)} file(s) could not be read: {lines}{more}. "
            "Re-export or remove them, then load the dataset again."
        )


class UnknownFormatError(DatasetError):
    pass


class InvalidOptionError(DatasetError):
    """A format option (class map, colours, category, folders) that cannot work."""


class InvalidSizeError(DefectPruneError):
    pass


class ImageTooLargeError(DatasetError):
    """An image whose header declares more pixels than the limit (a decompression bomb, or
    a scan far larger than any inspection image): refused before it is decoded."""


# ---------------------------------------------------------------- records and index
@dataclass(frozen=True)
class SampleRecord:
    """One image of a dataset as a format module finds it on disk.

    ``label`` is the class a binary mask stands for (magnetic tile: the folder's class), or
    -1 where the mask file holds class ids itself. ``group`` keeps dependent images in one
    split (KolektorSDD: the ``kosNN`` folder)."""

    image: str
    mask: str | None
    label: int = -1
    group: str = ""
    split: str = ""  # official split where the format has one


MaskReader = Callable[[str | None, int, tuple[int, int]], np.ndarray]
"""(mask path or None, label, (height, width) of the image) -> uint8 class-id array."""


@dataclass
class DatasetIndex:
    format: str
    root: Path
    classes: list[str]  # background first
    samples: pd.DataFrame
    read_mask: MaskReader
    default_size: tuple[int, int]
    native_channels: int = 1
    skipped: list[dict] = field(default_factory=list)  # {"file": ..., "reason": ...}
    warnings: list[str] = field(default_factory=list)
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> pd.DataFrame:
        return self.samples[self.samples["split"] == name].reset_index(drop=True)

    def mask_of(self, row: pd.Series) -> np.ndarray:
        mask = row["mask"]
        mask = mask if isinstance(mask, str) and mask else None  # no mask: all background
        return self.read_mask(mask, int(row["label"]), (int(row["height"]), int(row["width"])))

    def image_of(self, row: pd.Series, channels: int | None = None) -> np.ndarray:
        return read_image(row["image"], channels or self.native_channels)

    def split_counts(self) -> dict[str, int]:
        counts = self.samples["split"].value_counts()
        return {s: int(counts.get(s, 0)) for s in SPLITS}

    def images_per_class(self) -> dict[str, int]:
        """Images in which each class appears (background counts every image with background)."""
        out = {name: 0 for name in self.classes}
        for present in self.samples["classes"]:
            for c in present:
                out[self.classes[c]] += 1
        return out


# ---------------------------------------------------------------- reading
def check_pixels(path: str | Path, data: np.ndarray) -> None:
    """Refuse ``data`` (an encoded image's bytes) when its header declares more pixels than
    `core.config.max_image_pixels`, before anything is decoded."""
    from PIL import Image

    from core.config import max_image_pixels

    limit = max_image_pixels()
    if data.size < 1024 and limit >= 1024 * 1024:
        return  # too few bytes to be a bomb under a real limit (and maybe not an image at all)
    Image.MAX_IMAGE_PIXELS = None  # this check replaces PIL's own (which would hide the size)
    try:
        with Image.open(io.BytesIO(data.tobytes())) as header:
            width, height = header.size
    except Exception:  # not an image PIL knows: OpenCV decides (and names it if corrupt)
        return
    if width * height > limit:
        raise ImageTooLargeError(
            f"image {path} is {width}x{height} pixels, more than the limit of {limit:,} "
            "(DEFECTPRUNE_MAX_IMAGE_PIXELS); it was not decoded: shrink it or raise the limit"
        )


def decode_file(path: str | Path, flag: int, what: str = "image") -> np.ndarray | None:
    """Bytes of ``path`` decoded by OpenCV with ``flag`` (None: not decodable), after the
    pixel limit is checked from the header."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise CorruptImageError([(str(path), f"cannot open {what} ({exc.strerror})")]) from exc
    if not data.size:
        return None
    check_pixels(path, data)
    return cv2.imdecode(data, flag)


def read_image(path: str | Path, channels: int = 1) -> np.ndarray:
    """Decode an image to uint8, HxW (channels=1) or HxWx3 RGB (channels=3).

    Decodes from bytes, so paths with any characters work, and a file that is not a
    decodable image raises `CorruptImageError` instead of returning None."""
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    image = decode_file(path, flag)
    if image is None:
        raise CorruptImageError([(str(path), "not a decodable image")])
    if channels == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def read_label_image(path: str | Path) -> np.ndarray:
    """A mask file as stored (grayscale uint8, no colour conversion, no rescaling)."""
    mask = decode_file(path, cv2.IMREAD_UNCHANGED, "mask")
    if mask is None:
        raise CorruptImageError([(str(path), "mask is not a decodable image")])
    if mask.ndim == 3:  # an RGB(A) mask of grey levels: one channel; a coloured one is refused
        colour = mask[..., :3]
        if not (colour == colour[..., :1]).all():
            y, x = np.argwhere((colour != colour[..., :1]).any(axis=2))[0]
            raise MaskValueError(
                f"mask {path} is painted in colour (first at x={x}, y={y}) where its format expects "
                "class values (one grey level per class); export it as a grey-level mask of class ids"
            )
        mask = mask[..., 0]
    if mask.dtype != np.uint8:
        if mask.dtype.kind != "u" or (mask.size and int(mask.max()) > 255):
            top = mask.max() if mask.size else 0
            raise MaskValueError(
                f"mask {path} holds {mask.dtype} values (up to {top:g}) where its format expects "
                "whole class values 0..255; export it as an 8-bit grey-level mask of class ids"
            )
        mask = mask.astype(np.uint8)
    return mask


def index_mask_reader(path: str | None, label: int, shape: tuple[int, int]) -> np.ndarray:
    """Masks whose pixel values are the class ids (NEU-Seg, synthetic, folder by values)."""
    if path is None:
        return np.zeros(shape, np.uint8)
    return read_label_image(path)


def binary_mask_reader(threshold: int) -> MaskReader:
    """Masks that mark one class: pixels >= threshold belong to the record's label."""

    def read(path: str | None, label: int, shape: tuple[int, int]) -> np.ndarray:
        if path is None:
            return np.zeros(shape, np.uint8)
        raw = read_label_image(path)
        return np.where(raw >= threshold, max(label, 0), 0).astype(np.uint8)

    return read


def probe_image(path: str | Path) -> tuple[int, int, int]:
    """(height, width, channels) of one image; channels is 1 for grey stored as RGB, since the
    colour carries nothing. Used to pick a format's default size and native channels."""
    image = decode_file(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise CorruptImageError([(str(path), "not a decodable image")])
    if image.ndim == 2:
        return image.shape[0], image.shape[1], 1
    colour = image[..., :3]
    grey = bool((colour == colour[..., :1]).all())
    return image.shape[0], image.shape[1], 1 if grey else 3


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def reject_options(format_name: str, options: dict, allowed: Sequence[str] = ()) -> None:
    """A misspelt option must not be silently ignored: name it and the ones that exist."""
    if options:
        known = ", ".join(allowed) if allowed else "none"
        raise InvalidOptionError(
            f"format {format_name} has no option {', '.join(sorted(options))}; its options: {known}"
        )


def option_folder(root: Path, value: object, option: str, default: str) -> Path:
    """The folder a format option names (``images``, ``masks``, ``category``), relative to the
    dataset root: anything that resolves outside the root (an absolute path elsewhere, ``..``,
    a symbolic link out) is refused, so an option cannot reach past the folder that was
    confined to the data roots."""
    from core.config import PathOutsideDataRootsError, confine_to_data_roots

    if value is None or value == "":
        value = default
    if not isinstance(value, (str, Path)):
        raise InvalidOptionError(f"option {option} must be a folder name (text), not {value!r}")
    try:
        return confine_to_data_roots(Path(value), roots=[root])
    except PathOutsideDataRootsError:
        raise InvalidOptionError(
            f"option {option}={str(value)!r} points outside the dataset folder {root}; give a folder "
            "inside it (relative to --root)"
        ) from None


def require_root(root: str | Path, what: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetRootMissingError(
            f"dataset folder {root} does not exist; point --root at the folder that holds {what}"
        )
    return root


# ---------------------------------------------------------------- sizes
def parse_size(text: str | int | Sequence[int] | None, default: tuple[int, int]) -> tuple[int, int]:
    """'128' -> (128, 128); '320x128' -> (320, 128) as height x width; None -> default."""
    if text is None or text == "":
        return default
    if isinstance(text, int):
        size = (text, text)
    elif isinstance(text, (tuple, list)):
        size = (int(text[0]), int(text[1]))
    else:
        parts = str(text).lower().replace(" ", "").split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise InvalidSizeError(f"size {text!r} is not N or HxW (e.g. 128 or 320x128)") from None
        if len(values) == 1:
            size = (values[0], values[0])
        elif len(values) == 2:
            size = (values[0], values[1])
        else:
            raise InvalidSizeError(f"size {text!r} is not N or HxW (e.g. 128 or 320x128)")
    if min(size) < 32 or size[0] % 32 or size[1] % 32:
        raise InvalidSizeError(f"size {size[0]}x{size[1]} must be multiples of 32 (at least 32)")
    check_input_size(size, "size")
    return size


def check_input_size(size: Sequence[int], what: str) -> None:
    """Refuse a model input larger than `core.config.max_input_size` per side (a 16384 px
    side asks for tens of GB of activations)."""
    from core.config import max_input_size

    cap = max_input_size()
    if max(size) > cap:
        raise InvalidSizeError(f"{what} {size[0]}x{size[1]} is larger than the limit of {cap} px per side "
                               "(DEFECTPRUNE_MAX_INPUT_SIZE)")


def size_keeping_aspect(height: float, width: float, short_side: int = 128) -> tuple[int, int]:
    """A default input size with the images' aspect ratio, both sides multiples of 32."""
    scale = short_side / min(height, width)
    return (max(32, round(height * scale / 32) * 32), max(32, round(width * scale / 32) * 32))


# ---------------------------------------------------------------- validation
def _index_workers() -> int:
    """Threads for reading files: decoding (OpenCV, zlib, libjpeg) releases the GIL, and the
    disk waits overlap, so a few threads per core pay off without using much memory."""
    return max(2, min(16, (os.cpu_count() or 2) * 2))


def _inspect(
    rec: SampleRecord, read_mask: MaskReader, classes: Sequence[str]
) -> dict | list[tuple[str, str]]:
    """Read one record: its row of the index, or the list of files that could not be decoded.
    Structural problems (size, values) raise their named error."""
    n_classes = len(classes)
    try:
        image = read_image(rec.image, 1)
    except CorruptImageError as exc:
        failures = list(exc.failures)
        try:  # report a broken mask of the same sample in the same error
            if rec.mask is not None:
                read_mask(rec.mask, rec.label, (1, 1))
        except CorruptImageError as mask_exc:
            failures.extend(mask_exc.failures)
        except DatasetError:
            pass
        return failures
    shape = image.shape[:2]
    del image
    try:
        mask = read_mask(rec.mask, rec.label, shape)
    except CorruptImageError as exc:
        return list(exc.failures)
    except MaskValueError as exc:  # one file's values: the caller skips it, or stops when strict
        return {"skip": exc, "file": rec.mask or rec.image}
    if mask.shape[:2] != shape:
        raise MaskSizeMismatchError(
            f"mask {rec.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {rec.image} "
            f"is {shape[1]}x{shape[0]} (width x height); masks must have their image's size: "
            "re-export the mask at the image's size"
        )
    counts = np.bincount(mask.ravel(), minlength=n_classes)
    if counts.size > n_classes and counts[n_classes:].any():
        bad = int(np.flatnonzero(counts[n_classes:])[0]) + n_classes
        return {"skip": MaskValueError(
            f"mask {rec.mask} holds value {bad}, outside the class map 0..{n_classes - 1} "
            f"({', '.join(classes)}); fix the mask or the class map"
        ), "file": rec.mask}
    counts = counts[:n_classes]
    return {
        "image": rec.image, "mask": rec.mask, "label": rec.label, "group": rec.group,
        "split": rec.split, "height": int(shape[0]), "width": int(shape[1]),
        "classes": tuple(int(c) for c in np.flatnonzero(counts)),
        "pixel_counts": tuple(int(c) for c in counts),
    }


@dataclass(frozen=True)
class FormatTraits:
    """What `build_index` needs to know of a format: fixed for the format, or for one folder
    and its options (a folder's class names, a mask reader with its threshold)."""

    name: str
    classes: Sequence[str]
    read_mask: MaskReader
    default_size: tuple[int, int]
    native_channels: int = 1
    require_masks: bool = False  # every image has a mask (else: no mask = all background)
    layout: str = ""  # the expected layout, for the message when no image is found
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)  # the seeded split where there is none


def build_index(
    traits: FormatTraits,
    root: Path,
    records: Sequence[SampleRecord],
    seed: int = 0,
    skipped: Sequence[dict] = (),
    strict: bool = False,
) -> DatasetIndex:
    """Read every image and mask once, validate, compute per-class pixels, assign splits.

    Files are read by a small thread pool (results keep the records' order, so the index and
    the error reported do not depend on timing). Corrupt files are collected and reported
    together in one `CorruptImageError`; the first structural problem in record order
    (missing mask, size mismatch, values outside the class map) raises its own named error
    naming the file.

    A mask holding a value the format does not define (outside the class map, a colour where
    values are expected) is one file's problem: that sample is skipped and listed in
    ``skipped`` and ``warnings``, unless ``strict``, where it stops the whole dataset."""
    _check_records(traits, root, records)
    rows, value_problems = _validate_records(traits, records, strict)
    skipped = list(skipped)
    for problem in value_problems:
        skipped.append({"file": str(problem["file"]), "reason": f"{problem['skip']} (skipped; --strict stops instead)"})
    if not rows:
        # rows are only ever empty here when every record was skipped for its values
        raise MaskValueError(f"{value_problems[0]['skip']} (every image under {root} was skipped "
                             "for values its format does not define)")
    samples = pd.DataFrame(rows, columns=SAMPLE_COLUMNS)
    # keep "no mask" as None: a string column would turn it into NaN, a float
    samples["mask"] = pd.Series([row["mask"] for row in rows], index=samples.index, dtype=object)
    if (samples["split"] == "").any():
        samples["split"] = seeded_split(samples, seed=seed, ratios=traits.ratios)
    return DatasetIndex(
        format=traits.name, root=Path(root), classes=list(traits.classes), samples=samples,
        read_mask=traits.read_mask, default_size=traits.default_size, native_channels=traits.native_channels,
        skipped=skipped, seed=seed,
        warnings=[f"{len(value_problems)} file(s) skipped for values the format does not define, e.g. "
                  f"{value_problems[0]['file']}; pass --strict to stop on them instead"] if value_problems else [],
    )


def _check_records(traits: FormatTraits, root: Path, records: Sequence[SampleRecord]) -> None:
    """What is wrong before any file is read: the class names, no images at all, an image
    without the mask its format requires."""
    check_class_names(traits.classes)
    if not records:
        expected = f"it should hold {traits.layout}" if traits.layout else "check the folder layout"
        raise NoImagesFoundError(
            f"no images found under {root} for format {traits.name}; {expected} "
            "(see the README's dataset formats)"
        )
    if traits.require_masks:
        for rec in records:
            if rec.mask is None:
                raise MissingMaskError(
                    f"image {rec.image} has no mask; add the mask file or remove the image"
                )


def _validate_records(traits: FormatTraits, records: Sequence[SampleRecord],
                      strict: bool) -> tuple[list[dict], list[dict]]:
    """The validation pass: every image and mask read once by a small thread pool, in the
    records' order. Returns the sample rows and the samples skipped for mask values the format
    does not define (``strict``: the first of those raises); corrupt files raise together in
    one `CorruptImageError`, any other problem raises its own named error."""
    rows, corrupt, value_problems = [], [], []
    pool = ThreadPoolExecutor(max_workers=_index_workers(), thread_name_prefix="index")
    try:
        for result in pool.map(lambda rec: _inspect(rec, traits.read_mask, traits.classes), records):
            if isinstance(result, list):
                corrupt.extend(result)
            elif "skip" in result:
                if strict:
                    raise result["skip"]
                value_problems.append(result)
            else:
                rows.append(result)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if corrupt:
        raise CorruptImageError(corrupt)
    return rows, value_problems


def check_class_names(classes: object, option: str = "class_names") -> list[str]:
    """Background first, then 1 to 255 defect classes: distinct, non-empty text (a checkpoint
    saved with anything else could never be loaded again)."""
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (list, tuple)):
        raise InvalidOptionError(f"{option} must be a list of class names, background first, e.g. "
                                 f"[\"background\", \"scratch\"]; not {classes!r}")
    if not all(isinstance(c, str) and c.strip() for c in classes):
        raise InvalidOptionError(f"{option} {list(classes)!r} must hold non-empty text names only")
    if len(classes) < 2 or len(classes) > 256:
        raise InvalidOptionError(
            f"{option} has {len(classes)} entries; give background first and then 1 to 255 defect classes, "
            "e.g. [\"background\", \"scratch\"]"
        )
    if len(set(classes)) != len(classes):
        raise InvalidOptionError(f"{option} {list(classes)} repeats a name; each class needs its own")
    return list(classes)


def warn_skipped(path: Path | str, reason: str, skipped: list[dict]) -> None:
    skipped.append({"file": str(path), "reason": reason})
    warnings.warn(f"skipped {path}: {reason}", stacklevel=2)


# ---------------------------------------------------------------- splits
def primary_class(classes: Sequence[int]) -> int:
    """The stratum of an image: its first defect class, 0 for a defect-free image."""
    defects = [c for c in classes if c != 0]
    return defects[0] if defects else 0


def _group_stratum(strata: pd.Series) -> int:
    """A group's stratum: its most common defect class, 0 only when no image has a defect
    (one cracked part makes a KolektorSDD commutator a defect unit)."""
    defects = strata[strata != 0]
    return int((defects if len(defects) else strata).mode().iloc[0])


def seeded_split(
    samples: pd.DataFrame, seed: int = 0, ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
) -> list[str]:
    """A split stratified by primary defect class, grouped by ``group`` where it is set.

    Units (groups, or single images when no group is set) are shuffled with a seeded RNG
    within each stratum and dealt out by cumulative ratio, so every stratum is spread over
    the splits and the same seed always gives the same split."""
    strata = samples["classes"].map(primary_class)
    units = samples["group"].where(samples["group"] != "", samples["image"])
    unit_stratum = strata.groupby(units).agg(_group_stratum)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    bounds = np.cumsum(ratios) / sum(ratios)
    for stratum in sorted(unit_stratum.unique()):
        members = sorted(unit_stratum.index[unit_stratum == stratum])
        order = rng.permutation(len(members))
        n = len(members)
        for position, i in enumerate(order):
            # centre of the position's slot, so small strata still reach val and test
            frac = (position + 0.5) / n
            split = SPLITS[int(np.searchsorted(bounds, frac, side="right"))] if frac < 1 else "test"
            assignment[members[i]] = split
    return [assignment[u] for u in units]
