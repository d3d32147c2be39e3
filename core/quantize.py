"""INT8 for the edge: static quantisation of an ONNX export with ONNX Runtime's tools, and the
accuracy of an ONNX file (fp32 or INT8) measured with ONNX Runtime.

Quantisation is ONNX Runtime's `quantize_static` in QDQ format (QuantizeLinear /
DequantizeLinear pairs around each quantised operator, which ONNX Runtime's CPU kernels fuse
into integer convolutions), weights signed 8-bit per output channel, activations unsigned
8-bit with a MinMax range calibrated on seeded training images of the model's dataset. The
weights use 7 of their 8 bits (``reduce_range``): on x86 CPUs without VNNI (AVX2 only, as this
machine) the u8 x s8 multiply-add saturates at full range; the bit costs little accuracy.

The export is first run through `quant_pre_process` (shape inference and ONNX Runtime's basic
graph optimisation). The TorchScript exporter leaves each convolution's folded bias behind an
``Identity`` node; without the pre-processing the quantiser skips those biases ("Expected bias
... to be an initializer") and the INT8 model was slower than fp32 (Unet-resnet18, 128 px, one
thread: 168 ms against 133 ms fp32; 74 ms with the pre-processing).

`evaluate_onnx` scores an ONNX file on a split exactly as `core.train.evaluate` scores a
torch model (argmax of the logits, one confusion matrix accumulated over the split), so an
INT8 file's defect mIoU stands beside its fp32 model's.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from core.atomic import atomic_path
from core.errors import DefectPruneError
from core.metrics import EvaluationResult
from core.profile import DEFAULT_THREADS, onnx_session
from core.progress import StageProgress
from core.train import EmptySplitError, ProgressCallback
from core.train.datasets import dataset_class_names
from core.train.evaluation import split_metrics

DEFAULT_CALIBRATION_IMAGES = 32
MAX_CALIBRATION_IMAGES = 512  # MinMax keeps two numbers per tensor per image: time, not memory, is the cap
DEFAULT_CALIBRATION_SEED = 0
CALIBRATION_SPLIT = "train"
INT8_ENGINE = "onnxruntime_int8"  # the latency key of an INT8 file beside "torch" and "onnxruntime"


class QuantizationError(DefectPruneError):
    """An ONNX file could not be quantised to INT8."""


@dataclass(frozen=True)
class QuantizationSettings:
    """How an INT8 file was made: written into its ``metadata_props`` as ``quantization``."""

    calibration_images: int  # images actually used (the split may hold fewer than asked)
    calibration_seed: int
    calibration_split: str = CALIBRATION_SPLIT
    calibration_dataset: str = ""  # the dataset format
    format: str = "QDQ"
    weights: str = "int8, per channel, symmetric, reduce_range (7 bits)"
    activations: str = "uint8, per tensor, asymmetric"
    calibration_method: str = "MinMax"
    preprocessed: bool = True  # onnxruntime.quantization.shape_inference.quant_pre_process

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QuantizationResult:
    path: Path
    settings: QuantizationSettings
    seconds: float


def seeded_rows(total: int, count: int, seed: int) -> list[int]:
    """``count`` rows of ``total`` (all of them when there are fewer), drawn with ``seed``,
    in order."""
    if total <= count:
        return list(range(total))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(total, size=count, replace=False))


class DatasetCalibrationReader:
    """ONNX Runtime's calibration data reader over a `SegmentationDataset` (any dataset of
    (image, mask) pairs): the images of ``count`` seeded rows, one at a time (batch 1)."""

    def __init__(self, dataset: Dataset, count: int, seed: int, input_name: str = "image"):
        self.dataset = dataset
        self.rows = seeded_rows(len(dataset), count, seed)
        self.input_name = input_name
        self.position = 0

    def __len__(self) -> int:
        return len(self.rows)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.rows):
            return None
        image = self.dataset[self.rows[self.position]][0]
        self.position += 1
        return {self.input_name: np.ascontiguousarray(image.numpy()[None], dtype=np.float32)}

    def rewind(self) -> None:
        self.position = 0


def write_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Replace an ONNX file's ``metadata_props`` with ``metadata`` (text keys and values)."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.save(proto, str(path))


def quantize_onnx(fp32_path: str | Path, out: str | Path, calibration: Dataset, images: int = DEFAULT_CALIBRATION_IMAGES,
                  seed: int = DEFAULT_CALIBRATION_SEED, metadata: dict[str, str] | None = None,
                  dataset_name: str = "", preprocess: bool = True) -> QuantizationResult:
    """Static INT8 copy of the fp32 ONNX file at ``out`` (QDQ, per-channel weights),
    calibrated on ``images`` seeded images of ``calibration``; ``metadata`` plus a
    ``quantization`` entry (`QuantizationSettings` as JSON) in its ``metadata_props``. Written
    beside the target and renamed into place, as `core.profile.export_onnx` writes."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise EmptySplitError("the calibration split has no images: INT8 calibration needs training images")
    if not 1 <= images <= MAX_CALIBRATION_IMAGES:
        raise QuantizationError(f"{images} calibration images: use 1 to {MAX_CALIBRATION_IMAGES}")
    out = Path(out)
    if out.is_dir():
        raise QuantizationError(f"{out} is a folder; give a file name such as {out / 'model.int8.onnx'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    session = onnx_session(fp32_path)
    reader = DatasetCalibrationReader(calibration, images, seed, session.get_inputs()[0].name)
    del session
    settings = QuantizationSettings(calibration_images=len(reader), calibration_seed=seed,
                                    calibration_dataset=dataset_name, preprocessed=preprocess)
    try:
        with tempfile.TemporaryDirectory(prefix="defectprune-int8-") as scratch, atomic_path(out) as tmp, \
                warnings.catch_warnings(), _quiet_quantiser():
            warnings.simplefilter("ignore")
            source = Path(fp32_path)
            if preprocess:
                source = Path(scratch) / "preprocessed.onnx"
                quant_pre_process(str(fp32_path), str(source))
            quantize_static(str(source), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
            write_metadata(tmp, {**(metadata or {}), "quantization": json.dumps(settings.to_dict())})
    except DefectPruneError:
        raise
    except Exception as exc:  # the quantiser raises many types; the user needs one line
        raise QuantizationError(f"INT8 quantisation of {fp32_path} failed: {type(exc).__name__}: {exc}"
                                .splitlines()[0]) from exc
    return QuantizationResult(path=out, settings=settings, seconds=time.perf_counter() - start)


@contextlib.contextmanager
def _quiet_quantiser():
    """The quantiser logs through the root logger and prints: keep the command's stdout (its
    JSON) clean and its stderr to warnings."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        root.setLevel(level)


def evaluate_onnx(onnx_path: str | Path, dataset: Dataset, class_names: Sequence[str] | None = None,
                  threads: int = DEFAULT_THREADS, batch_size: int = 8, progress: ProgressCallback | None = None,
                  per_image: bool = True) -> EvaluationResult:
    """Metrics of an ONNX file (fp32 or INT8) on every sample of ``dataset``, run by ONNX
    Runtime on the CPU with ``threads`` threads: the argmax of its logits against the masks,
    one confusion matrix over the split (`core.metrics`), the per-image table behind it, as
    `core.train.evaluate` reports a torch model. A callback returning True raises
    `StopRequested`."""
    if len(dataset) == 0:
        raise EmptySplitError("the evaluation split has no images; pick another split or dataset")
    session = onnx_session(onnx_path, threads)
    input_name = session.get_inputs()[0].name
    names = list(class_names) if class_names is not None else dataset_class_names(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)

    def logits_of(images) -> np.ndarray:
        logits = session.run(None, {input_name: np.ascontiguousarray(images.numpy(), dtype=np.float32)})[0]
        if names is not None and logits.shape[1] != len(names):
            raise DefectPruneError(f"{onnx_path} predicts {logits.shape[1]} classes but the dataset has "
                                   f"{len(names)}: {', '.join(names)}")
        return logits

    return split_metrics(loader, logits_of, dataset, names, per_image, progress)


def checkpoint_dataset(index: Any, split: str, size: Sequence[int], spec: Any, limit: int | None = None) -> Dataset:
    """The split a checkpoint's ONNX file is calibrated or scored on: its images at ``size``
    with the checkpoint's channels, normalised as every model here sees its images (as
    `core.services.evaluate` builds it; one place to change with the normalisation)."""
    from core.data.dataset import SegmentationDataset

    return SegmentationDataset(index, split, tuple(int(v) for v in size), spec.in_channels, limit=limit,
                               normalisation=spec.normalisation)


def int8_cost_rows(checkpoints: Sequence[str | Path], calibration: Dataset, runs: int = 10, threads: int = 1,
                   images: int = DEFAULT_CALIBRATION_IMAGES, seed: int = DEFAULT_CALIBRATION_SEED,
                   evaluate_on: Dataset | None = None, warmup: int = 2,
                   progress: StageProgress | None = None) -> list[dict[str, Any]]:
    """What the "fp32 / INT8 ONNX Runtime" rows of a cost table need, per checkpoint (the same
    input size and channels, as `core.compare.cost_rows` takes them): each exported at its
    input size, quantised (calibrated on ``images`` seeded images of ``calibration``, one
    dataset for all, so the models are quantised alike), and every fp32 and INT8 file timed in
    turns with the others, so that INT8 against fp32 and one model against another hold on a
    busy machine.

    A row: ``checkpoint``, ``size_bytes_int8`` and ``size_bytes_onnx`` (the INT8 and fp32
    files), ``latency_int8_ms`` (the median) and ``latency`` = {``"onnxruntime"``,
    ``"onnxruntime_int8"``: median_ms, p10_ms, p90_ms}, the shape of a cost row's ``latency``
    entries, so ``row["latency"].update(int8["latency"])`` adds the engine to a `cost_rows`
    row; with ``evaluate_on``, ``defect_miou_onnx`` and ``defect_miou_int8``: both files
    scored on it with ONNX Runtime (`evaluate_onnx`). ``progress(fraction, message)`` hears
    each stage and each batch scored; answering True raises `StopRequested`."""
    from core.models.checkpoint import load_checkpoint
    from core.profile import export_onnx, onnx_latency_in_turns
    from core.train import StopRequested

    def stage(fraction: float, message: str) -> None:
        if progress is not None and progress(min(fraction, 1.0), message):
            raise StopRequested()

    loaded = [load_checkpoint(c, device="cpu") for c in checkpoints]
    inputs = {(tuple(entry.spec.input_size), entry.spec.in_channels) for entry in loaded}
    if len(inputs) > 1:
        raise QuantizationError(f"models with different inputs {sorted(inputs)} are not timed side by side")
    ((size, channels),) = inputs
    count = len(loaded)
    # the share of the work each stage takes (scoring reads the whole split twice per model)
    build, timing = (0.4, 0.15) if evaluate_on is not None else (0.8, 0.2)

    def scoring(done: int, of: int) -> float:  # where the scoring stage stands, one file in ``of`` done
        return build + timing + (1 - build - timing) * done / of

    with tempfile.TemporaryDirectory(prefix="defectprune-int8-") as scratch:
        files = []
        for i, entry in enumerate(loaded):
            stage(build * i / count, f"model {i + 1} of {count}: exporting to ONNX")
            fp32 = export_onnx(entry.model, Path(scratch) / f"model{i}.onnx", size, channels)
            stage(build * (i + 0.3) / count, f"model {i + 1} of {count}: calibrating INT8 on "
                                             f"{min(images, len(calibration))} training images")
            files.append((fp32, quantize_onnx(fp32, Path(scratch) / f"model{i}.int8.onnx", calibration, images,
                                              seed).path))
        stage(build, f"timing fp32 and INT8 with ONNX Runtime ({runs} runs each, in turns)")
        timed = onnx_latency_in_turns([path for pair in files for path in pair], size, channels, runs=runs,
                                      warmup=warmup, threads=threads)
        rows = []
        for i, (checkpoint, entry, (fp32, int8)) in enumerate(zip(checkpoints, loaded, files)):
            spreads = {engine: {"median_ms": r.median_ms, "p10_ms": r.p10_ms, "p90_ms": r.p90_ms}
                       for engine, r in (("onnxruntime", timed[2 * i]), (INT8_ENGINE, timed[2 * i + 1]))}
            row: dict[str, Any] = {
                "checkpoint": str(checkpoint), "size_bytes_int8": int8.stat().st_size,
                "size_bytes_onnx": fp32.stat().st_size, "latency_int8_ms": spreads[INT8_ENGINE]["median_ms"],
                "latency": spreads,
            }
            if evaluate_on is not None:
                for j, (key, path, what) in enumerate((("defect_miou_onnx", fp32, "fp32"),
                                                       ("defect_miou_int8", int8, "INT8"))):
                    start, end = scoring(2 * i + j, 2 * count), scoring(2 * i + j + 1, 2 * count)
                    message = f"model {i + 1} of {count}: scoring the {what} file on {len(evaluate_on)} images"
                    stage(start, message)

                    def batch(report: Any, start: float = start, end: float = end, message: str = message) -> bool:
                        at = end if report.fraction >= 1 else start + (end - start) * report.fraction
                        return bool(progress and progress(at, message))

                    row[key] = evaluate_onnx(path, evaluate_on, entry.spec.classes, threads=threads, per_image=False,
                                             progress=batch).metrics.defect_miou
            rows.append(row)
    stage(1.0, "INT8 measured")
    return rows
