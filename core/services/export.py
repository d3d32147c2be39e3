"""ONNX export of a checkpoint, checked against PyTorch with ONNX Runtime, and (for the export
job) its profile: params, MACs, size, latency. ``python -m core export-onnx`` exports only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.progress import StageProgress
from core.services.profile import profile_defaults
from core.services.datasets import format_choices
from core.services.request import (
    FLAG, OPTIONS, POSITIVE_INT, SEED, WHOLE_NUMBER, Check, ParameterError, Request, setting,
)
from core.services.tracking import tracked, tracking_setting



def _opset_problem(value: int) -> str | None:
    low, high = profile_defaults().MIN_OPSET, profile_defaults().MAX_OPSET
    return None if low <= value <= high else f"{value} must be {low} to {high}"


OPSET = Check(int, "a whole number", _opset_problem)


def quantize_defaults() -> Any:
    """The INT8 calibration defaults and caps (core.quantize's), read when a request is made:
    it imports torch."""
    from core import quantize

    return quantize


def _calibration_images_problem(value: int) -> str | None:
    cap = quantize_defaults().MAX_CALIBRATION_IMAGES
    return None if 1 <= value <= cap else f"{value} calibration images: use 1 to {cap}"


CALIBRATION_IMAGES = Check(int, "a whole number", _calibration_images_problem)
INT8_SETTINGS = ("calibration_images", "calibration_seed")  # only with --int8


@dataclass(frozen=True, kw_only=True)
class ExportRequest(Request):
    KIND = "export"

    checkpoint: str = setting(required=True, help="checkpoint folder")
    out: str | None = setting(None, required=True, job=False, help="ONNX file to write")
    size: str | None = setting(None, help="input size N or HxW (default: the checkpoint's)")
    opset: int = setting(default_factory=lambda: profile_defaults().DEFAULT_OPSET, check=OPSET,
                         help=lambda: f"ONNX opset ({profile_defaults().MIN_OPSET} to {profile_defaults().MAX_OPSET})")
    # the profile after the export: the export job's, not the command's (`profile` is its own command)
    no_profile: bool = setting(False, kind=FLAG, cli=False, help="skip params/MACs/latency")
    runs: int = setting(default_factory=lambda: profile_defaults().DEFAULT_RUNS, check=WHOLE_NUMBER, cli=False,
                        help="timed runs per engine")
    warmup: int = setting(default_factory=lambda: profile_defaults().DEFAULT_WARMUP, check=WHOLE_NUMBER, cli=False)
    threads: int = setting(default_factory=lambda: profile_defaults().DEFAULT_THREADS, check=WHOLE_NUMBER, cli=False,
                           help="CPU threads while timing")
    # INT8: static quantisation with ONNX Runtime, calibrated on seeded training images of the
    # model's dataset (the checkpoint's unless named; a job takes the model's from the store)
    int8: bool = setting(False, kind=FLAG, help="write a static INT8 ONNX file (ONNX Runtime's quantiser: QDQ, "
                                                 "per-channel int8 weights, uint8 activations) calibrated on seeded "
                                                 "training images of the model's dataset")
    calibration_images: int | None = setting(
        None, check=CALIBRATION_IMAGES, metavar="N",
        help=lambda: (f"training images the INT8 calibration reads (1 to {quantize_defaults().MAX_CALIBRATION_IMAGES}, "
                      f"default {quantize_defaults().DEFAULT_CALIBRATION_IMAGES}; only with --int8)"))
    calibration_seed: int | None = setting(None, check=SEED, metavar="SEED",
                                           help="seed of the calibration images' draw (default 0; only with --int8)")
    format: str | None = setting(None, choices=format_choices,
                                 help="the dataset --int8 calibrates on (default: the checkpoint's)")
    root: str | None = setting(None, help="that dataset's folder (synthetic: generation cache)")
    split_seed: int | None = setting(None, check=SEED, help="split seed (default: the checkpoint's)")
    option: dict[str, Any] = setting(kind=OPTIONS, metavar="KEY=VALUE",
                                     help="a dataset format option, VALUE as JSON where it parses (repeatable)")
    # the export job's accuracy of the INT8 file (with the profile): test images scored
    limit: int | None = setting(None, check=POSITIVE_INT, cli=False,
                                help="test images the INT8 and fp32 files are scored on (default: the whole split)")
    mlflow_uri: str | None = tracking_setting()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.int8:
            given = [f"--{name.replace('_', '-')}" for name in INT8_SETTINGS if getattr(self, name) is not None]
            if given:
                raise ParameterError(f"argument {given[0]}: calibration settings only apply with --int8")

    @property
    def int8_images(self) -> int:
        return self.calibration_images or quantize_defaults().DEFAULT_CALIBRATION_IMAGES

    @property
    def int8_seed(self) -> int:
        return quantize_defaults().DEFAULT_CALIBRATION_SEED if self.calibration_seed is None else self.calibration_seed

    def writes_same_file(self, other: ExportRequest) -> bool:
        """Whether ``other`` exports the file this request would: the same checkpoint, input size,
        opset and precision and, for INT8, calibrated on the same images (dataset, split seed,
        format options, number and seed of calibration images). Profiling settings do not count."""
        from pathlib import Path

        def key(request: ExportRequest) -> tuple:
            file = (str(Path(request.checkpoint).expanduser().resolve()), request.size, request.opset, request.int8)
            if not request.int8:
                return file
            root = None if request.root is None else str(Path(request.root).expanduser().resolve())
            return file + (request.format, root, request.split_seed, sorted(request.option.items()),
                           request.int8_images, request.int8_seed)

        return key(self) == key(other)


@dataclass(frozen=True)
class ExportResult:
    path: str
    max_abs_diff: float
    opset: int
    input_size: list[int]
    in_channels: int
    size_bytes: int
    profile: dict[str, Any] | None = field(default=None, repr=False)  # the whole profile, unless no_profile
    # --int8: how it was quantised, the fp32 export's size and, with the profile, the INT8 and
    # fp32 files' test defect mIoU (ONNX Runtime) and latency timed in turns (`int8_report`)
    int8: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> ExportResult:
        """What a finished export job returned (`to_json`); ``profile`` then holds only the
        headline numbers the job kept."""
        return cls(path=payload["path"], max_abs_diff=payload["max_abs_diff"], opset=payload["opset"],
                   input_size=list(payload["input_size"]), in_channels=payload["in_channels"],
                   size_bytes=payload["size_bytes"], profile=payload.get("profile"), int8=payload.get("int8"))

    def to_json(self) -> dict[str, Any]:
        """The command's JSON; with a profile, its headline numbers under ``profile``; with
        --int8, ``int8`` (``path`` and ``size_bytes`` are then the INT8 file's)."""
        payload = {"path": self.path, "max_abs_diff": self.max_abs_diff, "opset": self.opset,
                   "input_size": self.input_size, "in_channels": self.in_channels, "size_bytes": self.size_bytes}
        if self.profile is not None:
            payload["profile"] = {k: self.profile[k] for k in ("params", "macs", "size_bytes", "latency_ms")}
        if self.int8 is not None:
            payload["int8"] = self.int8
        return payload


def onnx_metadata_for(spec: Any, input_size: tuple[int, int], pruned: bool) -> dict[str, str]:
    """What a program running the ONNX file needs to know of it, as text (lists as JSON): the
    class names in logit order, the input size and channels, and the normalisation its inputs
    take (the one every dataset here gets)."""
    import json


    return {"classes": json.dumps(list(spec.classes)), "input_size": json.dumps(list(input_size)),
            "in_channels": str(spec.in_channels), "layout": "NCHW, float32",
            "mean": _per_channel(spec.pixel_normalisation.mean), "std": _per_channel(spec.pixel_normalisation.std),
            "normalisation": "x = (pixel / 255 - mean) / std, per channel",
            "arch": f"{spec.arch}-{spec.encoder}", "pruned": json.dumps(pruned)}


def _per_channel(values: tuple[float, ...]) -> str:
    """One number when every channel takes it (the normalisation of every model trained here),
    else a JSON list, one per channel (an imported model's own)."""
    import json

    return str(values[0]) if len(set(values)) == 1 else json.dumps(list(values))


@tracked  # logged to MLflow where a tracking URI is set (core.services.tracking)
def run_export(request: ExportRequest, progress: StageProgress | None = None) -> ExportResult:
    from core.data.base import parse_size
    from core.models.checkpoint import load_checkpoint
    from core.models.runtime import example_input
    from core.profile import export_onnx, onnx_max_abs_diff, profile_model
    from core.train import StopRequested

    def stage(fraction: float, message: str) -> None:
        if progress is not None and progress(fraction, message):
            raise StopRequested()

    if not request.out:
        raise ParameterError("the export needs the ONNX file to write (--out)")
    stage(0.05, "exporting to ONNX")
    loaded = load_checkpoint(request.checkpoint, device="cpu")
    size = parse_size(request.size, tuple(loaded.spec.input_size))
    channels = loaded.spec.in_channels
    metadata = onnx_metadata_for(loaded.spec, size, pruned=bool(loaded.history))
    if request.int8:
        return _run_int8_export(request, loaded, size, metadata, stage)
    path = export_onnx(loaded.model, request.out, size, channels, opset=request.opset, metadata=metadata)
    # Batch 2 although the export traced batch 1: proves the batch axis is really dynamic.
    diff = onnx_max_abs_diff(loaded.model, path, example_input(size, channels, batch=2))
    profile = None
    if not request.no_profile:
        stage(0.4, "profiling (params, MACs, latency)")
        profile = profile_model(loaded.model, loaded.spec, checkpoint_dir=loaded.path, runs=request.runs,
                                warmup=request.warmup, threads=request.threads, input_size=size, onnx=True)
    return ExportResult(path=str(path.resolve()), max_abs_diff=diff, opset=request.opset, input_size=list(size),
                        in_channels=channels, size_bytes=path.stat().st_size, profile=profile)


def _run_int8_export(request: ExportRequest, loaded: Any, size: tuple[int, int], metadata: dict[str, str],
                     stage: Any) -> ExportResult:
    """The fp32 export (checked against PyTorch) into a scratch folder, its INT8 copy at
    ``request.out`` and, with the profile, `int8_report`."""
    import tempfile
    from pathlib import Path

    from core.models.runtime import example_input
    from core.profile import export_onnx, onnx_max_abs_diff, onnx_session, profile_model
    from core.quantize import checkpoint_dataset, quantize_onnx
    from core.services.datasets import index_for_checkpoint

    spec, channels = loaded.spec, loaded.spec.in_channels
    # the dataset first: a checkpoint without one, or another's classes, fails before any work
    index, _ = index_for_checkpoint(request.checkpoint, spec, request.format, request.root, request.split_seed,
                                    request.option)
    calibration = checkpoint_dataset(index, "train", size, spec)
    with tempfile.TemporaryDirectory(prefix="defectprune-export-") as scratch:
        fp32 = export_onnx(loaded.model, Path(scratch) / "model.fp32.onnx", size, channels, opset=request.opset,
                           metadata=metadata)
        example = example_input(size, channels, batch=2)
        diff = onnx_max_abs_diff(loaded.model, fp32, example)
        stage(0.15, f"calibrating INT8 on {min(request.int8_images, len(calibration))} training images")
        quantized = quantize_onnx(fp32, request.out, calibration, request.int8_images, request.int8_seed,
                                  metadata=metadata, dataset_name=index.format)
        path = quantized.path
        # it loads and runs with batch 2 too (the batch axis stays dynamic through quantisation)
        session = onnx_session(path)
        logits = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
        if logits.shape[0] != 2:
            from core.quantize import QuantizationError

            raise QuantizationError(f"the INT8 file returns {logits.shape[0]} results for a batch of 2")
        int8 = {"quantization": quantized.settings.to_dict(), "size_bytes": path.stat().st_size,
                "fp32_size_bytes": fp32.stat().st_size, "seconds": round(quantized.seconds, 3)}
        profile = None
        if not request.no_profile:
            stage(0.35, "profiling (params, MACs, latency)")
            profile = profile_model(loaded.model, spec, checkpoint_dir=loaded.path, runs=request.runs,
                                    warmup=request.warmup, threads=request.threads, input_size=size, onnx=True)
            test = checkpoint_dataset(index, "test", size, spec, limit=request.limit)
            int8.update(int8_report(fp32, path, test, spec.classes, size, channels, request, stage))
            profile["int8"] = int8
    return ExportResult(path=str(path.resolve()), max_abs_diff=diff, opset=request.opset, input_size=list(size),
                        in_channels=channels, size_bytes=path.stat().st_size, profile=profile, int8=int8)


def int8_report(fp32: Any, int8: Any, test: Any, classes: list[str], size: tuple[int, int], channels: int,
                request: ExportRequest, stage: Any) -> dict[str, Any]:
    """The fp32 and INT8 files side by side: test defect mIoU (and per-class IoU) measured with
    ONNX Runtime, batch-1 latency timed in turns (median, p10-p90), the speed-up."""
    from core.profile import onnx_latency_in_turns
    from core.quantize import INT8_ENGINE, evaluate_onnx
    from core.train import EmptySplitError

    if len(test) == 0:
        raise EmptySplitError("the test split has no images: the INT8 file's accuracy cannot be measured")
    stage(0.6, f"timing fp32 and INT8 with ONNX Runtime ({request.runs} runs each, in turns)")
    fp32_latency, int8_latency = onnx_latency_in_turns([fp32, int8], size, channels, runs=request.runs,
                                                       warmup=request.warmup, threads=request.threads)
    stage(0.75, f"scoring fp32 and INT8 with ONNX Runtime on {len(test)} test images")
    scores = {engine: evaluate_onnx(path, test, classes, threads=request.threads, per_image=False).metrics
              for engine, path in (("onnxruntime", fp32), (INT8_ENGINE, int8))}
    fp32_miou, int8_miou = scores["onnxruntime"].defect_miou, scores[INT8_ENGINE].defect_miou
    return {
        "split": "test", "images": len(test),
        "defect_miou": {engine: m.defect_miou for engine, m in scores.items()},
        "defect_miou_drop": None if fp32_miou is None or int8_miou is None else fp32_miou - int8_miou,
        "per_class_iou": {engine: m.per_class_iou for engine, m in scores.items()},
        "latency": {engine: {"median_ms": r.median_ms, "p10_ms": r.p10_ms, "p90_ms": r.p90_ms}
                    for engine, r in (("onnxruntime", fp32_latency), (INT8_ENGINE, int8_latency))},
        "speedup": fp32_latency.median_ms / int8_latency.median_ms, "threads": request.threads, "runs": request.runs,
    }
