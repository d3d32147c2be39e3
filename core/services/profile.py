"""The cost of a checkpoint: parameters, MACs, size on disk and batch-1 latency (PyTorch on the
CPU or the device asked, ONNX Runtime on the CPU): ``python -m core profile``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.services.datasets import DEVICES
from core.services.request import FLAG, NON_NEGATIVE_INT, POSITIVE_INT, Request, setting


def profile_defaults() -> Any:
    """The timing defaults (core.profile's), read when a request is made: it imports torch."""
    from core import profile

    return profile


@dataclass(frozen=True, kw_only=True)
class ProfileRequest(Request):
    KIND = "profile"

    checkpoint: str = setting(required=True, help="checkpoint folder")
    size: str | None = setting(None, help="input size N or HxW (default: the checkpoint's)")
    threads: int = setting(default_factory=lambda: profile_defaults().DEFAULT_THREADS, check=POSITIVE_INT,
                           help="CPU threads while timing")
    runs: int = setting(default_factory=lambda: profile_defaults().DEFAULT_RUNS, check=POSITIVE_INT,
                        help="timed runs per engine")
    warmup: int = setting(default_factory=lambda: profile_defaults().DEFAULT_WARMUP, check=NON_NEGATIVE_INT,
                          help="untimed runs first")
    device: str = setting("cpu", choices=DEVICES,
                          help="where PyTorch latency is timed (default cpu, the edge target; ONNX Runtime always "
                               "times on the CPU)")
    no_onnx: bool = setting(False, kind=FLAG, help="skip the ONNX Runtime timing")


@dataclass(frozen=True)
class ProfileResult:
    checkpoint: str
    arch: str
    encoder: str
    in_channels: int
    classes: list[str]
    pruned: bool
    input_size: tuple[int, int]
    profile: dict[str, Any]  # `core.profile.profile_model`'s: params, MACs, FLOPs, size, latency per engine

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "arch": self.arch, "encoder": self.encoder, "pruned": self.pruned,
                **self.profile}


def run_profile(request: ProfileRequest, progress: bool = False) -> ProfileResult:
    """``progress``: show the timing runs' progress bar (the command line's, without --json)."""
    from core.data.base import parse_size
    from core.models.checkpoint import load_checkpoint
    from core.profile import profile_model
    from core.train import resolve_device

    loaded = load_checkpoint(request.checkpoint, device="cpu")
    spec = loaded.spec
    size = parse_size(request.size, tuple(spec.input_size))
    profile = profile_model(loaded.model, spec, checkpoint_dir=loaded.path, runs=request.runs, warmup=request.warmup,
                            threads=request.threads, input_size=size, onnx=not request.no_onnx, progress=progress,
                            device=resolve_device(request.device))
    return ProfileResult(checkpoint=str(loaded.path), arch=spec.arch, encoder=spec.encoder,
                         in_channels=spec.in_channels, classes=list(spec.classes), pruned=bool(loaded.history),
                         input_size=size, profile=profile)
