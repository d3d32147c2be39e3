"""ONNX export of a checkpoint, checked against PyTorch with ONNX Runtime, and (for the export
job) its profile: params, MACs, size, latency. ``python -m core export-onnx`` exports only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.progress import StageProgress
from core.services.profile import profile_defaults
from core.services.request import FLAG, WHOLE_NUMBER, Check, ParameterError, Request, setting



def _opset_problem(value: int) -> str | None:
    low, high = profile_defaults().MIN_OPSET, profile_defaults().MAX_OPSET
    return None if low <= value <= high else f"{value} must be {low} to {high}"


OPSET = Check(int, "a whole number", _opset_problem)


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


@dataclass(frozen=True)
class ExportResult:
    path: str
    max_abs_diff: float
    opset: int
    input_size: list[int]
    in_channels: int
    size_bytes: int
    profile: dict[str, Any] | None = field(default=None, repr=False)  # the whole profile, unless no_profile

    def to_json(self) -> dict[str, Any]:
        """The command's JSON; with a profile, its headline numbers under ``profile``."""
        payload = {"path": self.path, "max_abs_diff": self.max_abs_diff, "opset": self.opset,
                   "input_size": self.input_size, "in_channels": self.in_channels, "size_bytes": self.size_bytes}
        if self.profile is not None:
            payload["profile"] = {k: self.profile[k] for k in ("params", "macs", "size_bytes", "latency_ms")}
        return payload


def onnx_metadata_for(spec: Any, input_size: tuple[int, int], pruned: bool) -> dict[str, str]:
    """What a program running the ONNX file needs to know of it, as text (lists as JSON): the
    class names in logit order, the input size and channels, and the normalisation its inputs
    take (the one every dataset here gets)."""
    import json

    from core.data.dataset import PIXEL_MEAN, PIXEL_STD

    return {"classes": json.dumps(list(spec.classes)), "input_size": json.dumps(list(input_size)),
            "in_channels": str(spec.in_channels), "layout": "NCHW, float32",
            "mean": str(PIXEL_MEAN), "std": str(PIXEL_STD), "normalisation": "x = (pixel / 255 - mean) / std",
            "arch": f"{spec.arch}-{spec.encoder}", "pruned": json.dumps(pruned)}


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
    path = export_onnx(loaded.model, request.out, size, channels, opset=request.opset,
                       metadata=onnx_metadata_for(loaded.spec, size, pruned=bool(loaded.history)))
    # Batch 2 although the export traced batch 1: proves the batch axis is really dynamic.
    diff = onnx_max_abs_diff(loaded.model, path, example_input(size, channels, batch=2))
    profile = None
    if not request.no_profile:
        stage(0.4, "profiling (params, MACs, latency)")
        profile = profile_model(loaded.model, loaded.spec, checkpoint_dir=loaded.path, runs=request.runs,
                                warmup=request.warmup, threads=request.threads, input_size=size, onnx=True)
    return ExportResult(path=str(path.resolve()), max_abs_diff=diff, opset=request.opset, input_size=list(size),
                        in_channels=channels, size_bytes=path.stat().st_size, profile=profile)
