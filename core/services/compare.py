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

# A cost row's latency engines, as the cost table names them (the INT8 one once the INT8 step ran).
ENGINES = {"torch": "fp32 torch", "onnxruntime": "fp32 ONNX Runtime", "onnxruntime_int8": "INT8 ONNX Runtime"}
INT8_ENGINE = "onnxruntime_int8"  # core.quantize.INT8_ENGINE (not imported: it imports torch)
NOT_FASTER = "not faster"  # the speed-up cell's marker where the after model is not faster
# What most often makes a pruned model slower on ONNX Runtime (bench/results/latency.md).
SLOWER_CAUSE = (" Channel counts that are not multiples of 16 keep ONNX Runtime off its blocked convolution "
                "kernels: prune with channel counts rounded to 16 (--round-to 16).")
OVERLAP = " The timings' p10-p90 ranges overlap, so other work on the machine may have decided it: measure again."
# the INT8 step's keys that join a model's cost row (sizes of both files, both files' defect mIoU)
INT8_KEYS = ("size_bytes_onnx", "size_bytes_int8", "latency_int8_ms", "defect_miou_onnx", "defect_miou_int8")


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
    notes: list[str]  # one line per engine in not_faster, then one per model in int8_not_faster
    int8_not_faster: list[str] = field(default_factory=list)  # the models (before, after) whose INT8 file is not
    # faster than their fp32 file on ONNX Runtime


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


def _mib(value: float) -> str:
    return f"{value / 2**20:.2f} MiB"


def _miou(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _points(before: float | None, after: float | None) -> str:
    return "-" if before is None or after is None else f"{after - before:+.2f} pts"


def with_int8(row: dict[str, Any], int8: dict[str, Any]) -> dict[str, Any]:
    """A `core.compare.cost_row` with its model's row of the INT8 step
    (`core.quantize.int8_cost_rows`): the fp32 and INT8 ONNX files' sizes and defect mIoU, and
    their latency, fp32 ONNX Runtime's taking the place of the row's own (the INT8 step timed
    both files in turns, so the two stand side by side; torch's stays)."""
    merged = {**row, **{key: int8[key] for key in INT8_KEYS if key in int8}}
    merged["latency"] = {**row.get("latency", {}), **int8["latency"]}
    return merged


def compare_costs(before: dict[str, Any], after: dict[str, Any], int8: dict[str, Any] | None = None) -> CostComparison:
    """Two `core.compare.cost_row`s as the cost table: MACs and parameters in M or G, size in
    MiB, latency per engine as median (p10-p90) of the timed runs, the change in percent and
    the speed-up (before's median / after's). An engine on which the after model is not
    faster is marked in its speed-up cell and explained in ``notes``.

    With ``int8``, the INT8 step's result (`core.services.compare_int8.run_int8_cost`: a
    ``before`` and an ``after`` row of `core.quantize.int8_cost_rows`): the fp32 and INT8 ONNX
    files' sizes, INT8 ONNX Runtime latency beside fp32 torch and fp32 ONNX Runtime, each
    model's INT8 speed-up over its fp32 file (marked where INT8 is not faster, with a note),
    and both files' defect mIoU on the comparison's split, with INT8's change in points."""
    if int8 is not None:
        before, after = with_int8(before, int8["before"]), with_int8(after, int8["after"])
    rows, not_faster, notes, int8_slower = [], [], [], []

    def measure(name: str, was: str, now: str, change: str, speedup: str = "") -> None:
        rows.append({"measure": name, "before": was, "after": now, "change": change, "speed-up": speedup})

    for name, key, show in (("MACs", "macs", amount), ("parameters", "params", amount),
                            ("size on disk", "size_bytes", _mib)):
        measure(name, show(before[key]), show(after[key]), _change(before[key], after[key]))
    if int8 is not None:
        for name, key in (("fp32 ONNX size", "size_bytes_onnx"), ("INT8 ONNX size", "size_bytes_int8")):
            measure(name, _mib(before[key]), _mib(after[key]), _change(before[key], after[key]))
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
        measure(f"{label} latency, median (p10-p90)", _latency(was), _latency(now),
                _change(was["median_ms"], now["median_ms"]), marker)
    if int8 is not None:
        cells = []
        for role, row in (("before", before), ("after", after)):
            fp32, quantised = row["latency"]["onnxruntime"], row["latency"][INT8_ENGINE]
            gain = fp32["median_ms"] / quantised["median_ms"]
            cells.append(f"{gain:.2f}x" + (f" ⚠ {NOT_FASTER}" if gain <= 1.0 else ""))
            if gain <= 1.0:
                int8_slower.append(role)
        measure("INT8 speed-up over fp32 ONNX Runtime", *cells, "")
        for role in int8_slower:
            row = before if role == "before" else after
            notes.append(_int8_slower_note(role, row["latency"]["onnxruntime"], row["latency"][INT8_ENGINE]))
        fp32_miou = (before.get("defect_miou_onnx"), after.get("defect_miou_onnx"))
        int8_miou = (before.get("defect_miou_int8"), after.get("defect_miou_int8"))
        split = f"{int8.get('split', '')}, {int8.get('images', '?')} images".lstrip(", ")
        measure(f"defect mIoU, fp32 ONNX Runtime ({split})", *map(_miou, fp32_miou), _points(*fp32_miou))
        measure(f"defect mIoU, INT8 ONNX Runtime ({split})", *map(_miou, int8_miou), _points(*int8_miou))
        measure("INT8 defect mIoU change from fp32", *(_points(f, i) for f, i in zip(fp32_miou, int8_miou)), "")
    models = pd.DataFrame([{"model": "before", **_flat(before)}, {"model": "after", **_flat(after)}])
    return CostComparison(models=models, table=pd.DataFrame(rows).set_index("measure"), not_faster=not_faster,
                          notes=notes, int8_not_faster=int8_slower)


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A cost row with its spreads as columns (latency_torch_p10_ms, ...): the report's record."""
    flat = {k: v for k, v in row.items() if k != "latency"}
    for engine, stats in row.get("latency", {}).items():
        flat.update({f"latency_{engine}_{k}": v for k, v in stats.items()})
    return flat


def _slower_note(engine: str, was: dict[str, float], now: dict[str, float]) -> str:
    overlap = now["p10_ms"] <= was["p90_ms"]  # the spreads overlap: the machine's load may decide
    why = SLOWER_CAUSE if "ONNX Runtime" in engine else ""
    if overlap:
        why += OVERLAP
    return (f"⚠ The pruned model is not faster on {engine}: {was['median_ms']:.2f} -> {now['median_ms']:.2f} ms "
            f"median.{why}")


def _int8_slower_note(role: str, fp32: dict[str, float], int8: dict[str, float]) -> str:
    why = OVERLAP if int8["p10_ms"] <= fp32["p90_ms"] else (
        " On this CPU and input size the INT8 file gains nothing: ship the fp32 file, or measure on the device "
        "the model will run on.")
    return (f"⚠ The {role} model's INT8 file is not faster than its fp32 file on ONNX Runtime: "
            f"{fp32['median_ms']:.2f} -> {int8['median_ms']:.2f} ms median.{why}")


def checkpoint_zip(folder: str | Path) -> bytes:
    """The checkpoint folder as a zip archive's bytes."""
    with tempfile.TemporaryDirectory() as scratch:
        return Path(shutil.make_archive(str(Path(scratch) / "checkpoint"), "zip", folder)).read_bytes()
