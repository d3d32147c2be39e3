"""Format name -> module. Add a format by adding a module with ``FORMAT``, ``CLASSES``,
``DEFAULT_SIZE`` and ``build(root, seed=0, **options) -> DatasetIndex``, and one line here."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from core.data.base import DatasetIndex, DatasetRootMissingError, UnknownFormatError

FORMAT_MODULES: dict[str, str] = {
    "neu-seg": "core.data.neu_seg",
    "magnetic-tile": "core.data.magnetic_tile",
    "kolektorsdd": "core.data.kolektorsdd",
    "crackforest": "core.data.crackforest",
    "mvtec": "core.data.mvtec",
    "folder": "core.data.folder",
    "synthetic-steel": "core.data.synthetic",
    "synthetic-tile": "core.data.synthetic",
    "synthetic-fabric": "core.data.synthetic",
    "synthetic-metal": "core.data.synthetic",
}

DEFAULT_FORMAT = "synthetic-steel"


def format_names() -> list[str]:
    return list(FORMAT_MODULES)


def is_synthetic(format_name: str) -> bool:
    return format_name.startswith("synthetic-")


def format_module(format_name: str) -> ModuleType:
    try:
        return importlib.import_module(FORMAT_MODULES[format_name])
    except KeyError:
        raise UnknownFormatError(
            f"unknown dataset format {format_name!r}; choose one of {', '.join(FORMAT_MODULES)}"
        ) from None


def load_index(format_name: str, root: str | Path | None = None, seed: int = 0, strict: bool = False,
               **options) -> DatasetIndex:
    """Build (and validate) the sample index of a dataset. For synthetic formats ``root`` is
    the generation cache (default: the workspace's); real formats need ``root``. A file whose
    values the format does not define is skipped with a warning, or stops it all when ``strict``."""
    module = format_module(format_name)
    if is_synthetic(format_name):
        return module.build(root, seed=seed, family=format_name.removeprefix("synthetic-"), strict=strict, **options)
    if root is None:
        raise DatasetRootMissingError(f"format {format_name} needs a dataset folder: pass --root PATH")
    return module.build(Path(root), seed=seed, strict=strict, **options)
