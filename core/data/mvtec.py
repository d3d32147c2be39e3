"""MVTec AD (one category): industrial objects and textures with pixel-annotated anomalies.

Data: 15 categories (bottle, cable, ..., carpet, grid, ...), each with defect-free training
images ``train/good``, test images ``test/good`` and ``test/<defect>`` (700-1024 px, square,
colour or grey), and for every defective test image a binary mask
``ground_truth/<defect>/NNN_mask.png`` (0 / 255). One category is one dataset here: its
classes are background plus its defect folders, sorted by name; ``good`` images have no mask
and are all background. MVTec's own split has no defects in train, which does not suit a
supervised segmenter, so all images are pooled and given the seeded, class-stratified
70/15/15 split of `core.data.base.seeded_split`. A defect image without its mask is unlabeled:
it is skipped and reported in ``skipped``.
Layout: ``<category>/{train,test}/<defect>/NNN.png`` + ``<category>/ground_truth/<defect>/NNN_mask.png``;
``root`` is the category folder, or the MVTec folder with option ``category``.
Licence: CC BY-NC-SA 4.0 (MVTec Software GmbH).
Reference: P. Bergmann, M. Fauser, D. Sattlegger, C. Steger, "MVTec AD - A comprehensive
real-world dataset for unsupervised anomaly detection", CVPR 2019.
"""

from __future__ import annotations

from pathlib import Path

from core.data.base import (
    IMAGE_SUFFIXES, DatasetIndex, FormatTraits, InvalidOptionError, NoImagesFoundError, SampleRecord, option_folder,
    binary_mask_reader, build_index, probe_image, reject_options, require_root,
    size_keeping_aspect, warn_skipped,
)

FORMAT = "mvtec"
CLASSES = ["background"]  # then the category's defect folders, sorted: see `category_classes`
DEFAULT_SIZE = (256, 256)  # MVTec images are square; a category of other shape keeps its aspect
LAYOUT = "an MVTec AD category (bottle/, carpet/, ...) or the categories"  # what --root must hold
GOOD = "good"
MASK_SUFFIX = "_mask"
THRESHOLD = 128


def category_folder(root: Path, category: str | None) -> Path:
    """The folder of the one category to read: ``root/category``, or ``root`` itself when it
    holds ``test/``, or the only category under ``root``."""
    if category:
        if Path(category).name != category or category in (".", ".."):
            raise InvalidOptionError(
                f"category {category!r} is not a category name (one folder name, e.g. bottle, "
                "no path): it must name a folder directly under the dataset folder"
            )
        folder = option_folder(root, category, "category", category)
        if not (folder / "test").is_dir():
            raise InvalidOptionError(
                f"category {category!r} not found: {folder}/test does not exist; choose one of "
                f"{', '.join(_categories(root)) or '(none under ' + str(root) + ')'}"
            )
        return folder
    if (root / "test").is_dir():
        return root
    found = _categories(root)
    if len(found) == 1:
        return root / found[0]
    if not found:
        raise NoImagesFoundError(
            f"no MVTec category under {root}: expected {root}/test/<defect>/ or "
            f"{root}/<category>/test/<defect>/; point --root at a category folder"
        )
    raise InvalidOptionError(
        f"{root} holds {len(found)} MVTec categories ({', '.join(found)}); pick one with option "
        "category (command line: --option category=NAME) or point --root at its folder"
    )


def _categories(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "test").is_dir())


def category_classes(folder: Path) -> list[str]:
    """background + the defect folders of ``test/``, sorted."""
    defects = sorted(p.name for p in (folder / "test").iterdir() if p.is_dir() and p.name != GOOD)
    return ["background", *defects]


def _images(folder: Path, skipped: list[dict]) -> list[Path]:
    out = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            out.append(path)
        else:
            warn_skipped(path, "not an image", skipped)
    return out


def build(root: Path, seed: int = 0, category: str | None = None, strict: bool = False, **options) -> DatasetIndex:
    reject_options(FORMAT, options, ["category"])
    root = require_root(root, LAYOUT)
    if category is not None and not isinstance(category, str):
        raise InvalidOptionError(f"option category must be a category name (text), not {category!r}")
    folder = category_folder(root, category)
    classes = category_classes(folder)
    records: list[SampleRecord] = []
    skipped: list[dict] = []
    for part in ("train", "test"):
        part_dir = folder / part
        if not part_dir.is_dir():
            continue
        for sub in sorted(p for p in part_dir.iterdir() if p.is_dir()):
            if sub.name == GOOD:
                records += [SampleRecord(str(p), None, label=0) for p in _images(sub, skipped)]
                continue
            if part == "train":
                warn_skipped(sub, "a train folder other than good (MVTec trains on good only)", skipped)
                continue
            label = classes.index(sub.name)
            truth_dir = folder / "ground_truth" / sub.name
            for path in _images(sub, skipped):
                mask = truth_dir / f"{path.stem}{MASK_SUFFIX}.png"
                if not mask.is_file():
                    warn_skipped(path, f"unlabeled: no mask ground_truth/{sub.name}/{mask.name}", skipped)
                    continue
                records.append(SampleRecord(str(path), str(mask), label=label))
    truth_root = folder / "ground_truth"
    if truth_root.is_dir():
        for sub in sorted(p for p in truth_root.iterdir() if p.is_dir()):
            for mask in sorted(p for p in sub.iterdir() if p.is_file()):
                stem = mask.stem.removesuffix(MASK_SUFFIX)
                if not any((folder / "test" / sub.name / f"{stem}{s}").is_file() for s in IMAGE_SUFFIXES):
                    warn_skipped(mask, f"mask without its image test/{sub.name}/{stem}.png", skipped)
    index = build_index(
        FormatTraits(FORMAT, classes, binary_mask_reader(THRESHOLD), DEFAULT_SIZE, native_channels=3, layout=LAYOUT),
        folder, records, seed=seed, skipped=skipped, strict=strict,
    )
    height, width, channels = probe_image(index.samples["image"].iloc[0])
    index.native_channels = channels
    index.default_size = size_keeping_aspect(height, width, short_side=DEFAULT_SIZE[0])
    return index
