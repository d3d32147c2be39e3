"""Cost of a model: parameters, MACs, size on disk, CPU latency (PyTorch and ONNX Runtime),
and the ONNX export itself.

MACs are multiply-accumulates counted by Torch-Pruning's op counter at batch 1 (FLOPs = 2 x
MACs wherever FLOPs are shown). Latency is the median of timed single-image runs on the CPU
with a fixed thread count, because a mean is pulled around by the other jobs on a shared
machine and the thread count changes the number more than anything else.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.utils import op_counter
from tqdm import tqdm

from core.atomic import atomic_path
from core.errors import DefectPruneError
from core.models.groups import macs_counter_of
from core.models.runtime import eval_mode, example_input, model_device
from core.train import TorchThreads

DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3
DEFAULT_THREADS = 1
DEFAULT_OPSET = 17
MIN_OPSET = 17  # the oldest opset the product promises (and the default)
MAX_OPSET = 20  # the newest the TorchScript exporter writes (torch 2.14)


class ProfileError(DefectPruneError):
    """Profiling could not run (bad settings)."""


class OnnxExportError(DefectPruneError):
    """The model could not be exported to ONNX or the export does not run."""


@dataclass(frozen=True)
class LatencyResult:
    """Timings of single-image forward passes, in milliseconds."""

    engine: str  # "torch" or "onnxruntime"
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    runs: int
    warmup: int
    threads: int
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- parameters and MACs

def count_params(model: nn.Module) -> int:
    """Number of parameter elements (buffers such as BatchNorm statistics excluded)."""
    return int(sum(p.numel() for p in model.parameters()))


@contextlib.contextmanager
def subclass_counters(model: nn.Module) -> Iterator[None]:
    """Register subclasses of counted layer types with the op counter for one count."""
    custom = {}
    for module in model.modules():
        cls = type(module)
        if cls not in op_counter.MODULES_MAPPING:
            hook = macs_counter_of(module)
            if hook is not None:
                custom[cls] = hook
    op_counter.CUSTOM_MODULES_MAPPING = dict(custom)
    try:
        yield
    finally:
        op_counter.CUSTOM_MODULES_MAPPING = {}


def count_macs(model: nn.Module, input_size: Sequence[int], in_channels: int) -> int:
    """MACs of one forward pass of a single image of ``input_size`` (height, width)."""
    example = example_input(input_size, int(in_channels), device=model_device(model))
    with eval_mode(model), subclass_counters(model), contextlib.redirect_stdout(sys.stderr):
        macs, _params = tp.utils.count_ops_and_params(model, example)
    return int(macs)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the state dict (the payload of a weights file)."""
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values()))


def checkpoint_size_bytes(path: str | Path) -> int:
    """Size on disk of a checkpoint folder (every file in it) or of a single file."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return int(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()))


# ---------------------------------------------------------------- latency

def _summarise(engine: str, times_ms: list[float], warmup: int, threads: int,
               device: str = "cpu") -> LatencyResult:
    values = np.asarray(times_ms, dtype=float)
    return LatencyResult(
        engine=engine,
        median_ms=float(np.median(values)),
        p10_ms=float(np.percentile(values, 10)),
        p90_ms=float(np.percentile(values, 90)),
        mean_ms=float(values.mean()),
        std_ms=float(statistics.pstdev(times_ms)) if len(times_ms) > 1 else 0.0,
        runs=len(times_ms),
        warmup=warmup,
        threads=threads,
        device=device,
    )


def _check_timing(runs: int, warmup: int, threads: int) -> None:
    if runs < 1:
        raise ProfileError(f"runs must be at least 1, not {runs}")
    if warmup < 0:
        raise ProfileError(f"warmup must be 0 or more, not {warmup}")
    if threads < 1:
        raise ProfileError(f"threads must be at least 1, not {threads}")


def measure_latency(model: nn.Module, input_size: Sequence[int], in_channels: int,
                    runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP,
                    threads: int = DEFAULT_THREADS, progress: bool = False,
                    device: str | torch.device = "cpu") -> LatencyResult:
    """PyTorch latency of one image (batch 1) on ``device`` (the CPU unless asked otherwise:
    the edge target), model in eval mode without autograd.

    A model that lives elsewhere is timed as a copy on ``device``, so a model fine-tuned on a
    GPU still reports CPU latency; CUDA timings wait for the kernels to finish."""
    _check_timing(runs, warmup, threads)
    device = torch.device(device)
    if model_device(model) != device:
        model = copy.deepcopy(model).to(device)
    example = example_input(input_size, int(in_channels), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: list[float] = []
    with eval_mode(model), TorchThreads(threads), torch.inference_mode():
        for _ in range(warmup):
            model(example)
        sync()
        for _ in tqdm(range(runs), desc="torch latency", disable=None if progress else True, leave=False):
            start = time.perf_counter()
            model(example)
            sync()
            times.append((time.perf_counter() - start) * 1000.0)
    return _summarise("torch", times, warmup, threads, str(device))


# ---------------------------------------------------------------- ONNX

def export_onnx(model: nn.Module, path: str | Path, input_size: Sequence[int], in_channels: int,
                opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None) -> Path:
    """Export to one ONNX file with a dynamic batch axis (input ``image``, output ``logits``),
    ``metadata`` (text keys and values) in the file's ``metadata_props``.

    Uses PyTorch's TorchScript exporter (``dynamo=False``): with torch 2.14 it writes a single
    self-contained file at the requested opset, while the torch.export-based exporter insists
    on opset 18 and splits weights into a side file. The file is written beside the target and
    renamed into place, so a failed export never leaves a half-written model at ``path``."""
    path = Path(path)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxExportError(f"opset {opset} is not supported; choose {MIN_OPSET} to {MAX_OPSET}")
    if path.is_dir():
        raise OnnxExportError(f"{path} is a folder; give a file name such as {path / 'model.onnx'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example_input(input_size, int(in_channels), device=model_device(model))
    try:
        with atomic_path(path) as tmp, eval_mode(model), torch.no_grad(), warnings.catch_warnings(), \
                contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), str(tmp), dynamo=False, opset_version=opset,
                input_names=["image"], output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                do_constant_folding=True,
            )
            if metadata:
                _write_metadata(tmp, metadata)
    except DefectPruneError:
        raise
    except Exception as exc:  # the exporter raises many types; the user needs one message
        raise OnnxExportError(f"ONNX export to {path} failed: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    return path


def _write_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.save(proto, str(path))


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (without loading its weights)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in proto.metadata_props}


def onnx_session(onnx_path: str | Path, threads: int = DEFAULT_THREADS, spinning: bool = True):
    """An ONNX Runtime CPU session with a fixed intra-op thread count. Without ``spinning`` its
    pool's threads sleep between runs instead of spinning: sessions timed in turns must not
    spin, or each one's idle threads take the cores from the next one's run (with 2 threads on
    2 cores that doubled their latency)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxExportError(f"ONNX Runtime cannot load {onnx_path}: {exc}".splitlines()[0]) from exc


def onnx_max_abs_diff(model: nn.Module, onnx_path: str | Path, input: torch.Tensor) -> float:
    """Largest absolute difference between PyTorch's and ONNX Runtime's logits on ``input``."""
    session = onnx_session(onnx_path, threads=max(1, torch.get_num_threads()))
    with eval_mode(model), torch.no_grad():
        expected = model(input.to(model_device(model))).float().cpu().numpy()
    got = session.run(None, {session.get_inputs()[0].name: input.detach().cpu().numpy()})[0]
    if got.shape != expected.shape:
        raise OnnxExportError(f"{onnx_path} returns shape {got.shape}, PyTorch {expected.shape}")
    return float(np.abs(got - expected).max())


def measure_onnx_latency(onnx_path: str | Path, input_size: Sequence[int], in_channels: int,
                         runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP,
                         threads: int = DEFAULT_THREADS, progress: bool = False) -> LatencyResult:
    """ONNX Runtime CPU latency of one image (batch 1)."""
    _check_timing(runs, warmup, threads)
    session = onnx_session(onnx_path, threads=threads)
    feed = {session.get_inputs()[0].name: example_input(input_size, int(in_channels)).numpy()}
    for _ in range(warmup):
        session.run(None, feed)
    times: list[float] = []
    for _ in tqdm(range(runs), desc="onnxruntime latency", disable=None if progress else True, leave=False):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return _summarise("onnxruntime", times, warmup, threads)


def latency_in_turns(models: Sequence[nn.Module], input_size: Sequence[int], in_channels: int,
                     runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP, threads: int = DEFAULT_THREADS,
                     onnx: bool = True) -> list[dict[str, LatencyResult]]:
    """Batch-1 CPU latency of several models on one input, per engine (``torch``, and
    ``onnxruntime`` unless ``onnx=False``), timed in turns (`time_in_turns`): run i of every
    model, then run i + 1. Other work on a shared machine then slows all of them alike; timings
    of two models taken minutes apart (one of them cached from an earlier, quieter moment) made
    a pruned model look slower than its baseline."""
    _check_timing(runs, warmup, threads)
    size = tuple(int(v) for v in input_size)
    cpu = [m if model_device(m) == torch.device("cpu") else copy.deepcopy(m).cpu() for m in models]
    example = example_input(size, int(in_channels))
    with contextlib.ExitStack() as stack:
        engines = {"torch": [functools.partial(m, example) for m in cpu]}
        if onnx:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="defectprune-onnx-")))
            sessions = [onnx_session(export_onnx(m, folder / f"model{i}.onnx", size, in_channels), threads,
                                     spinning=False) for i, m in enumerate(cpu)]
            engines["onnxruntime"] = [functools.partial(s.run, None, {s.get_inputs()[0].name: example.numpy()})
                                      for s in sessions]
        for m in cpu:
            stack.enter_context(eval_mode(m))
        stack.enter_context(TorchThreads(threads))
        stack.enter_context(torch.inference_mode())
        results: list[dict[str, LatencyResult]] = [{} for _ in cpu]
        for engine, calls in engines.items():
            for i, timed in enumerate(time_in_turns(calls, runs, warmup)):
                results[i][engine] = _summarise(engine, timed, warmup, threads)
    return results


def time_in_turns(calls: Sequence[Callable[[], Any]], runs: int = DEFAULT_RUNS,
                  warmup: int = DEFAULT_WARMUP, warm: int = 1) -> list[list[float]]:
    """Milliseconds of each of ``calls`` over ``runs`` turns (run i of every call, then run
    i + 1), after ``warmup`` untimed turns: the timing loop of `latency_in_turns`, for any
    callables (an ONNX Runtime session's run, a torch forward).

    Each timed run follows ``warm`` untimed runs of the same call, so it finds its own weights
    and buffers in the caches, as on a device that runs only that model: timed straight after
    the others, a small pruned model paid for the unpruned one evicting its weights (an INT8
    file at 256 px: 18.5 ms against 13.3 ms alone)."""
    if runs < 1:
        raise ProfileError(f"runs must be at least 1, not {runs}")
    if warmup < 0 or warm < 0:
        raise ProfileError(f"warmup and warm must be 0 or more, not {warmup} and {warm}")
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(runs):
        for i, call in enumerate(calls):
            for _ in range(warm):
                call()
            start = time.perf_counter()
            call()
            times[i].append((time.perf_counter() - start) * 1000.0)
    return times


def onnx_latency_in_turns(onnx_paths: Sequence[str | Path], input_size: Sequence[int], in_channels: int,
                          runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP,
                          threads: int = DEFAULT_THREADS) -> list[LatencyResult]:
    """Batch-1 ONNX Runtime CPU latency of several ONNX files (an fp32 export and its INT8
    copy, a baseline and its pruned model) on one input, timed in turns as `latency_in_turns`
    times models, so that their ratio holds on a busy machine."""
    _check_timing(runs, warmup, threads)
    example = example_input(tuple(int(v) for v in input_size), int(in_channels)).numpy()
    sessions = [onnx_session(path, threads, spinning=False) for path in onnx_paths]
    calls = [functools.partial(s.run, None, {s.get_inputs()[0].name: example}) for s in sessions]
    return [_summarise("onnxruntime", timed, warmup, threads) for timed in time_in_turns(calls, runs, warmup)]


# ---------------------------------------------------------------- everything at once

def profile_model(model: nn.Module, spec: Any, checkpoint_dir: str | Path | None = None,
                  runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP,
                  threads: int = DEFAULT_THREADS, input_size: Sequence[int] | None = None,
                  onnx: bool = True, progress: bool = False,
                  device: str | torch.device = "cpu") -> dict[str, Any]:
    """Parameters, MACs (and FLOPs = 2 x MACs), size and batch-1 latency of ``model`` (PyTorch on
    ``device``, the CPU by default; ONNX Runtime on the CPU).

    ``spec`` is the model's `ModelSpec` (input size and channels). ``size_bytes`` is the
    checkpoint folder's size on disk when ``checkpoint_dir`` is given, else the state dict's
    tensor bytes (``size_source`` says which). ONNX Runtime latency exports the model to a
    temporary file first (skipped with ``onnx=False``)."""
    _check_timing(runs, warmup, threads)
    size = tuple(int(v) for v in (input_size or spec.input_size))
    channels = int(spec.in_channels)
    macs = count_macs(model, size, channels)
    if checkpoint_dir is not None:
        size_bytes, size_source = checkpoint_size_bytes(checkpoint_dir), "checkpoint"
    else:
        size_bytes, size_source = state_dict_bytes(model), "state_dict"
    torch_result = measure_latency(model, size, channels, runs, warmup, threads, progress, device)
    latency = {"torch": torch_result.to_dict()}
    if onnx:
        with tempfile.TemporaryDirectory(prefix="defectprune-onnx-") as folder:
            onnx_path = export_onnx(model, Path(folder) / "model.onnx", size, channels)
            latency["onnxruntime"] = measure_onnx_latency(
                onnx_path, size, channels, runs, warmup, threads, progress).to_dict()
    return {
        "params": count_params(model),
        "macs": macs,
        "flops": 2 * macs,
        "size_bytes": int(size_bytes),
        "size_source": size_source,
        "input_size": list(size),
        "in_channels": channels,
        "threads": threads,
        "runs": runs,
        "latency_ms": {engine: result["median_ms"] for engine, result in latency.items()},
        "latency": latency,
    }
