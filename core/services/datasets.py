"""The settings every request that reads a dataset takes, and the dataset a checkpoint runs on.

`DataRequest` is the dataset and how it is loaded (format, root, size, limit, batch size,
workers, threads, format options, strict) with the device; `CheckpointDataRequest` adds the
checkpoint, whose spec names the dataset unless the request names another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import DefectPruneError
from core.services.request import FLAG, OPTIONS, POSITIVE_INT, SEED, WORKERS, Request, setting

if TYPE_CHECKING:
    from core.data.base import DatasetIndex
    from core.models.zoo import ModelSpec

DEVICES = ("auto", "cpu", "cuda")
STRICT_HELP = ("stop on a mask holding a value its format does not define (default: skip that file, listed with "
               "a warning)")


class CheckpointDatasetMismatchError(DefectPruneError):
    pass


def format_choices() -> list[str]:
    from core.data.registry import format_names

    return list(format_names())


@dataclass(frozen=True, kw_only=True)
class DatasetInfoRequest(Request):
    """A dataset to describe: ``python -m core data info``."""

    KIND = "data info"

    format: str = setting(required=True, choices=format_choices)
    root: str | None = setting(None, help="dataset folder (synthetic: generation cache)")
    size: str | None = setting(None, help="input size N or HxW (default: the format's)")
    seed: int = setting(0, check=SEED, help="split seed")
    option: dict[str, Any] = setting(kind=OPTIONS, metavar="KEY=VALUE",
                                     help="a format option, VALUE as JSON where it parses (repeatable), e.g. "
                                          "category=bottle, class_names='[\"background\",\"scratch\"]', "
                                          "colours='[[0,0,0],[255,0,0]]', threshold=128")
    strict: bool = setting(False, kind=FLAG, help=STRICT_HELP)


@dataclass(frozen=True)
class DatasetInfo:
    format: str
    root: str
    classes: list[str]
    splits: dict[str, int]
    images_per_class: dict[str, int]
    size: list[int]
    skipped: list[dict[str, str]]
    warnings: list[str]
    images: int

    def to_json(self) -> dict[str, Any]:
        """The command's JSON (without the image count, which the splits add up to)."""
        return {"format": self.format, "root": self.root, "classes": self.classes, "splits": self.splits,
                "images_per_class": self.images_per_class, "size": self.size, "skipped": self.skipped,
                "warnings": self.warnings}


def describe_dataset(request: DatasetInfoRequest) -> DatasetInfo:
    """Classes, images per split and per class, the input size, the files skipped and the
    warnings (listed here, not also warned)."""
    import warnings

    from core.data.base import parse_size
    from core.data.registry import load_index

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = load_index(request.format, request.root, seed=request.seed, strict=request.strict, **request.option)
    return DatasetInfo(format=index.format, root=str(index.root), classes=index.classes,
                       splits=index.split_counts(), images_per_class=index.images_per_class(),
                       size=list(parse_size(request.size, index.default_size)), skipped=index.skipped,
                       warnings=index.warnings, images=len(index.samples))


@dataclass(frozen=True, kw_only=True)
class DataRequest(Request):
    """A dataset, how it is read and batched, and where to compute."""

    format: str | None = setting(None, choices=format_choices)
    root: str | None = setting(None, help="dataset folder (synthetic: generation cache)")
    size: str | None = setting(None, help="input size N or HxW (default: the format's)")
    limit: int | None = setting(None, check=POSITIVE_INT,
                                help="use at most this many images of each split, drawn seeded from the whole split")
    threads: int | None = setting(None, check=POSITIVE_INT, help="torch CPU threads")
    batch_size: int = setting(8, check=POSITIVE_INT)
    workers: int = setting(0, check=WORKERS,
                           help="data-loading worker processes (at most DEFECTPRUNE_MAX_WORKERS, default the CPU count)")
    option: dict[str, Any] = setting(kind=OPTIONS, metavar="KEY=VALUE",
                                     help="a dataset format option, VALUE as JSON where it parses (repeatable), "
                                          "e.g. num_images=24 image_size=64 for a synthetic family")
    strict: bool = setting(False, kind=FLAG, help=STRICT_HELP)
    device: str = setting("auto", choices=DEVICES, help="where to compute (auto: CUDA when present)")


@dataclass(frozen=True, kw_only=True)
class CheckpointDataRequest(DataRequest):
    """A checkpoint and the dataset it runs on: the one in its spec unless another is named."""

    checkpoint: str = setting(required=True, help="checkpoint folder")
    split_seed: int | None = setting(None, check=SEED, help="split seed (default: the checkpoint's)")

    def dataset(self, spec: ModelSpec) -> tuple[DatasetIndex, tuple[int, int]]:
        """The dataset index and the input size: the checkpoint's own size on its own format,
        the format's default size on another (unless the request gives one)."""
        from core.data.base import parse_size

        index, same_format = index_for_checkpoint(self.checkpoint, spec, self.format, self.root, self.split_seed,
                                                  self.option, strict=self.strict)
        return index, parse_size(self.size, tuple(spec.input_size) if same_format else index.default_size)


def index_for_checkpoint(checkpoint: str | Path, spec: ModelSpec, format_name: str | None, root: str | None,
                         split_seed: int | None, options: dict | None = None,
                         strict: bool = False) -> tuple[DatasetIndex, bool]:
    """The dataset a command runs a checkpoint on: the one in its spec (format, root, format
    options) unless another is given, refused when its classes differ from the model's. Also
    says whether it is the checkpoint's own format (whose input size then applies)."""
    from core.data.registry import load_index

    format_name = format_name or spec.dataset_format
    if not format_name:
        raise DefectPruneError(
            f"checkpoint {checkpoint} does not say which dataset it was trained on; give --format and --root"
        )
    same_format = format_name == spec.dataset_format
    if root is None and same_format:
        root = spec.dataset_root or None
    if not options and same_format:
        options = spec.dataset_options
    index = load_index(format_name, root, seed=spec.split_seed if split_seed is None else split_seed,
                       strict=strict, **(options or {}))
    if list(index.classes) != list(spec.classes):
        raise CheckpointDatasetMismatchError(
            f"checkpoint {checkpoint} predicts classes {', '.join(spec.classes)} but {format_name} at "
            f"{index.root} has {', '.join(index.classes)}; use a dataset with the same classes"
        )
    return index, same_format
