"""Compare two checkpoints on the same split: the request the Compare page builds, the
comparison it draws (`run_compare`), its cost table and the checkpoint as a zip.

The page calls these through Streamlit's cache; nothing here knows Streamlit, so a job or the
command line can run the same comparison."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

import core.compare as analysis  # module-qualified: a test may stand in for its checks
from core.progress import StageProgress
from core.compare import Comparison, pixel_changes
from core.data.base import SPLITS, DatasetIndex
from core.data.dataset import SegmentationDataset
from core.data.registry import DEFAULT_FORMAT, load_index
from core.errors import DefectPruneError
from core.models.checkpoint import CheckpointMissingFileError, read_spec, restore_interrupted_save
from core.models.zoo import ModelSpec
from core.train import EmptySplitError

# A cost row's latency engines, as the cost table names them.
ENGINES = {"torch": "torch", "onnxruntime": "ONNX Runtime"}
NOT_FASTER = "not faster"  # the speed-up cell's marker where the after model is not faster
# What most often makes a pruned model slower on ONNX Runtime (bench/results/latency.md).
SLOWER_CAUSE = (" Channel counts that are not multiples of 16 keep ONNX Runtime off its blocked convolution "
                "kernels: prune with channel counts rounded to 16 (--round-to 16).")


class CompareRequestError(DefectPruneError):
    """A comparison asked for with values it cannot take."""


@dataclass(frozen=True)
class CompareRequest:
    """Two checkpoints (folders) predicted on one split of one dataset."""

    before: str
    after: str
    split: str = "val"
    format: str = DEFAULT_FORMAT
    root: str | None = None  # None: a synthetic format's cache in the workspace
    split_seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # the format's options, e.g. {"category": "bottle"}
    max_images: int | None = None  # a seeded sample of the split; None: all of it (the page)

    def __post_init__(self) -> None:
        if not self.before or not self.after:
            raise CompareRequestError("a comparison needs two checkpoint folders, before and after")
        if self.split not in SPLITS:
            raise CompareRequestError(f"split {self.split!r} is not one of {', '.join(SPLITS)}")
        if self.max_images is not None and (isinstance(self.max_images, bool) or not isinstance(self.max_images, int)
                                            or self.max_images < 1):
            raise CompareRequestError(f"max_images must be a whole number of at least 1 or None, "
                                      f"not {self.max_images!r}")


@dataclass
class CompareResult:
    """What the Compare page draws: the comparison and the request it answers."""

    request: CompareRequest
    comparison: Comparison

    def images_with(self, class_name: str | None) -> pd.DataFrame:
        """The per-image table as the page lists it (file name, defect mIoU before and after,
        change; worst change first), of the images showing ``class_name`` (None: all)."""
        table = self.comparison.per_image
        if class_name is not None:
            table = table[table[f"present {class_name}"]]
        return table[["index", "image", "defect_miou before", "defect_miou after", "change"]].assign(
            image=lambda frame: frame["image"].map(lambda path: Path(path).name))

    def pixel_changes(self, index: int) -> pd.DataFrame:
        """Pixels of image ``index`` the after model gained and lost, over all classes and per class."""
        c = self.comparison
        return pixel_changes(c.truth[index], c.before[index], c.after[index], c.class_names)

    def report(self, cost: pd.DataFrame | None) -> dict[str, Any]:
        """The downloadable report: both models, the split, per-class IoU, cost and defect mIoU."""
        c = self.comparison
        return {"before": self.request.before, "after": self.request.after, "split": self.request.split,
                "per_class": c.per_class.to_dict("records"),
                "cost": cost.to_dict("records") if cost is not None else None,
                "defect_miou": {"before": c.metrics_before.defect_miou, "after": c.metrics_after.defect_miou}}


def checked_specs(request: CompareRequest) -> tuple[ModelSpec, ModelSpec]:
    """Both checkpoints' specs, once both folders are there and the models are comparable
    (read from the spec files alone: no weights are loaded to refuse a pair)."""
    specs = []
    for role, path in (("before", request.before), ("after", request.after)):
        restore_interrupted_save(path)  # a save killed between its renames left the old folder aside
        if not Path(path).is_dir():
            raise CheckpointMissingFileError(f"checkpoint folder {path} does not exist (the {role} model); "
                                             "choose another model")
        specs.append(read_spec(path))
    analysis.check_comparable(specs[0], specs[1])
    return specs[0], specs[1]


def run_compare(request: CompareRequest, progress: StageProgress | None = None,
                index: DatasetIndex | None = None) -> CompareResult:
    """Predict the split with both models (masks cached on disk per checkpoint version) and
    compare them. ``progress(fraction, message)`` hears after every image read and batch
    predicted and reaches 1.0 at the end; answering True raises `core.train.StopRequested`.
    ``index`` saves reading the dataset again when the caller holds it (it must be the
    request's dataset)."""
    spec, _ = checked_specs(request)
    if index is None:
        index = load_index(request.format, request.root, seed=request.split_seed, **request.options)
    dataset = SegmentationDataset(index, request.split, tuple(spec.input_size), spec.in_channels,
                                  limit=request.max_images, normalisation=spec.normalisation)
    if len(dataset) == 0:
        raise EmptySplitError(f"the {request.split} split of {index.format} has no images; "
                              "choose another split or dataset")
    comparison = analysis.compare_models(request.before, request.after, dataset, list(spec.classes), progress)
    return CompareResult(request=request, comparison=comparison)


@dataclass(frozen=True)
class CostComparison:
    """The cost of two models side by side (the Compare page's cost table)."""

    models: pd.DataFrame  # one row per model (before, after), the raw numbers: what the report keeps
    table: pd.DataFrame  # one row per measure: before, after, change (%), speed-up (latency only)
    not_faster: list[str]  # the engines (as ENGINES names them) on which the after model is not faster
    notes: list[str]  # one line per engine in not_faster


def amount(value: float, unit: str = "") -> str:
    """A count in G, M or k (MACs, parameters), two significant decimals."""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def _change(before: float, after: float) -> str:
    return f"{(after / before - 1) * 100:+.1f}%" if before else "-"


def _latency(stats: dict[str, float]) -> str:
    return f"{stats['median_ms']:.2f} ms ({stats['p10_ms']:.2f}-{stats['p90_ms']:.2f})"


def compare_costs(before: dict[str, Any], after: dict[str, Any]) -> CostComparison:
    """Two `core.compare.cost_row`s as the cost table: MACs and parameters in M or G, size in
    MiB, latency per engine as median (p10-p90) of the timed runs, the change in percent and
    the speed-up (before's median / after's). An engine on which the after model is not
    faster is marked in its speed-up cell and explained in ``notes``."""
    rows, not_faster, notes = [], [], []
    for measure, key, show in (("MACs", "macs", amount), ("parameters", "params", amount),
                               ("size on disk", "size_bytes", lambda v: f"{v / 2**20:.2f} MiB")):
        rows.append({"measure": measure, "before": show(before[key]), "after": show(after[key]),
                     "change": _change(before[key], after[key]), "speed-up": ""})
    for engine, label in ENGINES.items():
        was, now = before["latency"].get(engine), after["latency"].get(engine)
        if was is None or now is None:
            continue
        speedup = was["median_ms"] / now["median_ms"]
        marker = f"{speedup:.2f}x"
        if speedup <= 1.0:
            marker += f" ⚠ {NOT_FASTER}"
            not_faster.append(label)
            notes.append(_slower_note(label, was, now))
        rows.append({"measure": f"{label} latency, median (p10-p90)", "before": _latency(was),
                     "after": _latency(now), "change": _change(was["median_ms"], now["median_ms"]),
                     "speed-up": marker})
    models = pd.DataFrame([{"model": "before", **_flat(before)}, {"model": "after", **_flat(after)}])
    return CostComparison(models=models, table=pd.DataFrame(rows).set_index("measure"), not_faster=not_faster,
                          notes=notes)


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A cost row with its spreads as columns (latency_torch_p10_ms, ...): the report's record."""
    flat = {k: v for k, v in row.items() if k != "latency"}
    for engine, stats in row.get("latency", {}).items():
        flat.update({f"latency_{engine}_{k}": v for k, v in stats.items()})
    return flat


def _slower_note(engine: str, was: dict[str, float], now: dict[str, float]) -> str:
    overlap = now["p10_ms"] <= was["p90_ms"]  # the spreads overlap: the machine's load may decide
    why = (SLOWER_CAUSE if engine == ENGINES["onnxruntime"] else "")
    if overlap:
        why += " The timings' p10-p90 ranges overlap, so other work on the machine may have decided it: measure again."
    return (f"⚠ The pruned model is not faster on {engine}: {was['median_ms']:.2f} -> {now['median_ms']:.2f} ms "
            f"median.{why}")


def checkpoint_zip(folder: str | Path) -> bytes:
    """The checkpoint folder as a zip archive's bytes."""
    with tempfile.TemporaryDirectory() as scratch:
        return Path(shutil.make_archive(str(Path(scratch) / "checkpoint"), "zip", folder)).read_bytes()
