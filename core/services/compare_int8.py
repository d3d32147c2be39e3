"""The Compare page's INT8 step: both models of a comparison exported, quantised to INT8 and
timed and scored with ONNX Runtime beside their fp32 exports (`core.quantize.int8_cost_rows`),
on the comparison's dataset and split, as a background job (kind ``int8-cost``).

Quantisation, calibration and scoring take seconds to minutes: the page submits this job
instead of doing it in its first draw, follows its bar, and adds its numbers to the cost table
(`core.services.compare.compare_costs`). Nothing here imports torch at import time: the run
store reads this request type to check a job's parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.services.datasets import format_choices
from core.services.export import CALIBRATION_IMAGES, quantize_defaults
from core.services.request import OPTIONS, POSITIVE_INT, SEED, Check, Request, setting

if TYPE_CHECKING:
    from core.data.base import DatasetIndex
    from core.progress import StageProgress
    from core.services.compare import CompareRequest

MAX_RUNS = 200  # timed runs per file: four files are timed, in turns


def _splits() -> list[str]:
    from core.data.base import SPLITS

    return list(SPLITS)


RUNS = Check(int, "a whole number", lambda v: None if 1 <= v <= MAX_RUNS else f"{v} must be 1 to {MAX_RUNS}")


@dataclass(frozen=True, kw_only=True)
class Int8CostRequest(Request):
    """Two checkpoints (before, after: as the Compare page compares them) made INT8 and measured
    beside their fp32 ONNX exports on one split of one dataset."""

    KIND = "int8-cost"

    before: str = setting(required=True, help="the before checkpoint folder")
    after: str = setting(required=True, help="the after checkpoint folder")
    split: str = setting("val", choices=_splits, help="the split both files are scored on")
    format: str | None = setting(None, choices=format_choices, help="dataset format (default: the models')")
    root: str | None = setting(None, help="that dataset's folder (synthetic: generation cache)")
    split_seed: int = setting(0, check=SEED, help="split seed")
    option: dict[str, Any] = setting(kind=OPTIONS, metavar="KEY=VALUE",
                                     help="a dataset format option, VALUE as JSON where it parses (repeatable)")
    max_images: int | None = setting(None, check=POSITIVE_INT,
                                     help="a seeded sample of the split (default: all of it, as the page compares)")
    calibration_images: int | None = setting(
        None, check=CALIBRATION_IMAGES, metavar="N",
        help=lambda: (f"training images the INT8 calibration reads (1 to "
                      f"{quantize_defaults().MAX_CALIBRATION_IMAGES}, default "
                      f"{quantize_defaults().DEFAULT_CALIBRATION_IMAGES})"))
    calibration_seed: int = setting(0, check=SEED, help="seed of the calibration images' draw")
    runs: int = setting(10, check=RUNS, help=f"timed runs per file (1 to {MAX_RUNS})")
    threads: int = setting(1, check=POSITIVE_INT, help="ONNX Runtime threads")

    @classmethod
    def for_comparison(cls, compare: CompareRequest, **settings: Any) -> Int8CostRequest:
        """The INT8 step of a comparison: its models, dataset, split and sample."""
        from pathlib import Path

        return cls(before=str(Path(compare.before).expanduser().resolve()),
                   after=str(Path(compare.after).expanduser().resolve()), split=compare.split,
                   format=compare.format, root=compare.root, split_seed=compare.split_seed,
                   option=dict(compare.options), max_images=compare.max_images, **settings)

    @property
    def int8_images(self) -> int:
        return self.calibration_images or quantize_defaults().DEFAULT_CALIBRATION_IMAGES


@dataclass(frozen=True)
class Int8CostResult:
    """What a finished INT8 step measured: one `core.quantize.int8_cost_rows` row per model
    (``before``, ``after``), on ``images`` images of ``split``, calibrated on
    ``calibration_images`` training images, ``runs`` timed runs per file on ``threads`` threads."""

    before: dict[str, Any]
    after: dict[str, Any]
    split: str
    images: int
    calibration_images: int
    calibration_seed: int
    runs: int
    threads: int

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> Int8CostResult:
        return cls(before=dict(payload["before"]), after=dict(payload["after"]), split=str(payload["split"]),
                   images=int(payload["images"]), calibration_images=int(payload["calibration_images"]),
                   calibration_seed=int(payload["calibration_seed"]), runs=int(payload["runs"]),
                   threads=int(payload["threads"]))

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def run_int8_cost(request: Int8CostRequest, progress: StageProgress | None = None,
                  index: DatasetIndex | None = None) -> dict[str, Any]:
    """Both models' fp32 and INT8 ONNX files: sizes, batch-1 latency timed in turns (median,
    p10-p90) and defect mIoU scored with ONNX Runtime on the request's split, the images
    `core.services.compare.run_compare` predicts; calibrated on seeded training images of the
    same dataset. The job's JSON: ``before`` and ``after`` (`int8_cost_rows` rows), ``split``,
    ``images``, ``calibration_images``, ``calibration_seed``, ``runs``, ``threads``."""
    from core.data.dataset import SegmentationDataset
    from core.data.registry import DEFAULT_FORMAT, load_index
    from core.quantize import checkpoint_dataset, int8_cost_rows
    from core.services.compare import CompareRequest, checked_specs
    from core.train import EmptySplitError

    compare = CompareRequest(before=request.before, after=request.after, split=request.split,
                             format=request.format or DEFAULT_FORMAT, root=request.root,
                             split_seed=request.split_seed, options=dict(request.option),
                             max_images=request.max_images)
    spec, _ = checked_specs(compare)  # both there and comparable (classes, input, normalisation)
    if index is None:
        index = load_index(compare.format, compare.root, seed=compare.split_seed, **compare.options)
    size = tuple(spec.input_size)
    scored = SegmentationDataset(index, request.split, size, spec.in_channels, limit=request.max_images,
                                 normalisation=spec.normalisation)
    if len(scored) == 0:
        raise EmptySplitError(f"the {request.split} split of {index.format} has no images; "
                              "choose another split or dataset")
    calibration = checkpoint_dataset(index, "train", size, spec)
    before, after = int8_cost_rows([request.before, request.after], calibration, runs=request.runs,
                                   threads=request.threads, images=request.int8_images,
                                   seed=request.calibration_seed, evaluate_on=scored, progress=progress)
    return Int8CostResult(before=before, after=after, split=request.split, images=len(scored),
                          calibration_images=min(request.int8_images, len(calibration)),
                          calibration_seed=request.calibration_seed, runs=request.runs,
                          threads=request.threads).to_json()
