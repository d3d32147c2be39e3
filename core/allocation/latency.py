"""Latency as a cost model: a per-layer lookup table measured on the machine the model will run
on, with the interface of the closed-form MACs model (`CostModel`), so that every allocator
can budget milliseconds instead of MACs.

Each convolution is timed alone (batch 1, the engine and thread count asked for: PyTorch or
ONNX Runtime) at its spatial size over a grid of kept input x output channel counts, from 1
channel to all of them; between grid points the time is interpolated bilinearly, which is
piecewise-linear in each count and differentiable almost everywhere in the kept-channel
fractions (what the scoring network's pressure needs). Everything that is not a convolution
(normalisation, activations, pooling, upsampling, concatenation) is the whole model's
measured latency less the table's convolutions at full size, scaled with the convolutions'
output volume (those layers' work is one pass over the activations), so the prediction at
nothing cut is the measured latency (where the convolutions timed alone add up to more than the
whole model, they are scaled down to it instead). With PyTorch each conv is also timed inside
the whole model (`time_convs_in_model`): the remainder is then the model less those times, and
a conv's table time is corrected by its in-model / alone ratio, a ratio above 1 in proportion
to the weights the conv keeps (timed alone, the unpruned model's big low-resolution convs
looked 30-75% cheaper than they are inside it, the remainder took the difference, and small
pruned models were predicted 19-22% too slow). Times are made monotone in both counts (a noisy
point never makes more channels look faster).

Both engines' CPU convolutions work in channel blocks (`channel_block`: 8 with AVX2, 16 with
AVX-512). A plain conv's grid points between the ends are block multiples, and a kept count is
read at the next block multiple. ONNX Runtime is the exception for a conv whose input count is
neither under one block nor a multiple of `ORT_INPUT_ALIGNMENT` (4): that conv runs an
unblocked fallback, timed once per geometry (at one input below full) and charged as a factor on
its exact counts. Between two block multiples the prediction is steps. For ONNX Runtime only, a
count at a multiple of 4 can be cheaper than the count just below it, which is what the engine
does (measured in `channel_block`).

Tables are cached per machine under ``DEFECTPRUNE_WORKSPACE/latency_tables/``: one JSON file
per CPU model, engine and thread count, its entries keyed by layer geometry (kernel, stride,
padding, dilation, groups, input size) and the channel range measured; a later round of a
prune run (fewer channels, same geometry) reuses the first round's entries, and only the
whole-model timing is new. Written atomically, read with `core.safe_json`; measuring is bounded
(``grid`` points per axis at most `MAX_GRID`, ``repeats`` at most `MAX_REPEATS`), reports
progress and stops when the progress callback answers true (what was measured is kept).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from core.allocation.cost import CostModel
from core.atomic import write_json_atomic
from core.errors import DefectPruneError
from core.models.graph import CONV_TYPES, PruningGraph
from core.models.runtime import eval_mode, example_input
from core.progress import StageProgress

ENGINES = ("torch", "onnxruntime")
DEFAULT_GRID = 4  # kept-count points per axis: 16 timings per layer geometry
MAX_GRID = 8
DEFAULT_REPEATS = 5  # timed runs per point (their median), after one warm-up run
MAX_REPEATS = 50
MAX_THREADS = 256
TABLE_VERSION = 3  # 2: ONNX Runtime grids at channel-block multiples, the block and the unaligned timing stored;
# 3: PyTorch models' convs timed inside the model too
IN_MODEL_RATIO = (0.5, 4.0)  # the range an in-model / alone ratio is held to (see LatencyCostModel)
FOLDER = "latency_tables"


class LatencyTableError(DefectPruneError):
    """A latency table cannot be measured, read or used (bad settings, a stopped measurement,
    an unreadable file)."""


class LatencyStopped(LatencyTableError):
    """The measuring was stopped through its progress callback (what it measured is kept)."""


@dataclass(frozen=True)
class LatencySettings:
    """Where and how a latency table is measured: the engine the model will run on, its thread
    count, the grid's points per axis and the timed runs per point; ``folder`` overrides
    the workspace's ``latency_tables``."""

    engine: str = "torch"
    threads: int = 1
    grid: int = DEFAULT_GRID
    repeats: int = DEFAULT_REPEATS
    warmup: int = 1
    folder: str | None = None

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise LatencyTableError(f"latency engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if not 1 <= self.threads <= MAX_THREADS:
            raise LatencyTableError(f"latency threads must be from 1 to {MAX_THREADS}, not {self.threads}")
        if not 2 <= self.grid <= MAX_GRID:
            raise LatencyTableError(f"the latency grid must have 2 to {MAX_GRID} points per axis, not {self.grid}")
        if not 1 <= self.repeats <= MAX_REPEATS:
            raise LatencyTableError(f"latency repeats must be from 1 to {MAX_REPEATS}, not {self.repeats}")
        if not 0 <= self.warmup <= MAX_REPEATS:
            raise LatencyTableError(f"latency warm-up runs must be from 0 to {MAX_REPEATS}, not {self.warmup}")

    def path(self) -> Path:
        """The table file of this machine, engine and thread count."""
        from core.config import workspace_dir

        folder = Path(self.folder) if self.folder else workspace_dir() / FOLDER
        cpu = re.sub(r"[^A-Za-z0-9]+", "-", cpu_model()).strip("-").lower()[:60] or "cpu"
        digest = hashlib.sha256(cpu_model().encode()).hexdigest()[:8]
        return folder / f"{cpu}-{digest}-{self.engine}-{self.threads}t.json"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), what a table is measured for."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# ------------------------------------------------------------------ layer geometry
@dataclass(frozen=True)
class ConvGeometry:
    """One convolution as the table sees it: everything its time depends on but the channel
    counts (``key``), and its full counts."""

    name: str
    transposed: bool
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    output_padding: tuple[int, int]
    groups: int
    depthwise: bool
    bias: bool
    height: int  # input spatial size
    width: int
    in_channels: int
    out_channels: int
    out_volume: int  # output elements at full size (out channels x output pixels)

    @property
    def key(self) -> str:
        kind = "convT" if self.transposed else "conv"
        grouping = "dw" if self.depthwise else f"g{self.groups}"
        pair = lambda p: "x".join(str(int(v)) for v in p)  # noqa: E731
        return (f"{kind} k{pair(self.kernel)} s{pair(self.stride)} p{pair(self.padding)} d{pair(self.dilation)} "
                f"op{pair(self.output_padding)} {grouping} b{int(self.bias)} @{self.height}x{self.width}")


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


def conv_geometries(model: nn.Module, input_size: Sequence[int], in_channels: int) -> list[ConvGeometry]:
    """Every convolution of ``model`` (in ``named_modules`` order) with the spatial size it sees
    on a batch-1 input of ``input_size``."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            shapes.setdefault(name, (tuple(args[0].shape), tuple(out.shape)))
        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in model.named_modules()
             if isinstance(module, CONV_TYPES)]
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with eval_mode(model), torch.inference_mode():
            model(example_input(input_size, int(in_channels), device=device))
    finally:
        for hook in hooks:
            hook.remove()
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, CONV_TYPES) or name not in shapes:
            continue
        (_, cin, h, w), (_, cout, ho, wo) = shapes[name]
        groups = int(module.groups)
        out.append(ConvGeometry(
            name=name, transposed=isinstance(module, nn.ConvTranspose2d), kernel=_pair(module.kernel_size),
            stride=_pair(module.stride), padding=_pair(module.padding), dilation=_pair(module.dilation),
            output_padding=_pair(getattr(module, "output_padding", 0)), groups=groups,
            depthwise=groups > 1 and groups == cin == cout, bias=module.bias is not None, height=int(h), width=int(w),
            in_channels=int(cin), out_channels=int(cout), out_volume=int(cout * ho * wo)))
    return out


def grid_counts(full: int, points: int, block: int = 1) -> list[int]:
    """Kept counts a table measures along one axis: from 1 channel to ``full``, evenly; with
    ``block`` > 1 the points between the ends are rounded to multiples of it (what ONNX Runtime's
    blocked convolutions run fast: an unaligned count would measure its slower fallback)."""
    values = np.linspace(1, full, max(2, points))
    if block > 1:
        inner = {min(full, max(block, int(round(v / block)) * block)) for v in values[1:-1]}
        return sorted({1, int(full)} | inner)
    return sorted({max(1, int(round(v))) for v in values})


ORT_INPUT_ALIGNMENT = 4  # input counts ONNX Runtime's blocked convs take (`channel_block`)


def channel_block(engine: str) -> int:
    """The channel block of the engine's blocked convolutions on this CPU: 16 channels with
    AVX-512, 8 with AVX2, none (1) without. Both engines' CPU convs work in such blocks.
    ONNX Runtime (MLAS NCHWc) runs a plain conv blocked when its input count is a multiple of
    `ORT_INPUT_ALIGNMENT` (or under one block), padding inputs and outputs up to the next block
    multiple. With any other input count it falls back to the unblocked kernel, slower still
    (read off ONNX Runtime 1.32's optimised graphs on an AVX-512 Xeon: with 3x3 convs, inputs
    20, 24, 28, 36, 44 and 76 ran blocked, 17, 18, 22, 26, 30, 34 and 77 did not, whatever the
    output count; a pruned model's 24-, 40- and 88-channel inputs ran blocked, padded to 32, 48
    and 96). PyTorch (oneDNN) pads both counts, so
    either one costs what the next multiple costs. Measured on an AVX2 EPYC (3x3 convs at
    16-64 px, 1 thread, shared machine). ORT: 63 -> 63 channels 2.31 ms against 64 -> 64 2.02 ms,
    55 -> 55 1.87 against 56 -> 56 1.57, 31 -> 31 2.49 against 32 -> 32 2.17, and 64 -> 63
    2.03 against 64 -> 64 2.02. torch: 47 -> 47 1.42 against 48 -> 48 1.41, 55 -> 55 1.76
    against 56 -> 56 1.86, 44 -> 44 1.42 (as 48), 40 -> 40 1.10."""
    del engine  # the same block for both engines on one CPU
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    return 16 if "avx512f" in flags else 8 if "avx2" in flags else 1


def model_signature(model: nn.Module, geometries: Sequence[ConvGeometry], input_size: Sequence[int]) -> str:
    """What identifies a model's whole-model timing: its layers' types and conv geometries."""
    text = json.dumps({"size": [int(v) for v in input_size],
                       "convs": [(g.key, g.in_channels, g.out_channels) for g in geometries],
                       "layers": [type(m).__name__ for m in model.modules() if not list(m.children())]})
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# ------------------------------------------------------------------ timing one layer
def _conv_module(g: ConvGeometry, cin: int, cout: int) -> nn.Module:
    groups = cin if g.depthwise else g.groups
    common = dict(kernel_size=g.kernel, stride=g.stride, padding=g.padding, dilation=g.dilation, groups=groups,
                  bias=g.bias)
    if g.transposed:
        return nn.ConvTranspose2d(cin, cout, output_padding=g.output_padding, **common).eval()
    return nn.Conv2d(cin, cout, **common).eval()


# Timed alone, a layer finds its weights in the CPU's caches on every repeat; inside a model the
# other layers have pushed them out (a 512 x 512 3x3 conv was 1.7x slower in the model than
# alone). Each point is timed on several copies of the layer in turn (enough copies to pass
# this many bytes of weights, at most MAX_COPIES), so each run meets weights that are not
# cached; writing a buffer past the caches before each run did the same at 13 ms a run.
COLD_BYTES = 32 * 2**20
MAX_COPIES = 4


def _copies(g: ConvGeometry, cin: int, cout: int) -> int:
    groups = cin if g.depthwise else g.groups
    weight_bytes = 4 * cout * max(cin // max(groups, 1), 1) * g.kernel[0] * g.kernel[1]
    return int(min(MAX_COPIES, max(1, math.ceil(COLD_BYTES / max(weight_bytes, 1)))))


def _median_ms(calls, repeats: int, warmup: int) -> float:
    """Median ms over ``repeats`` runs, each of the next of ``calls`` (copies in turn), after
    ``warmup`` runs of every copy."""
    for _ in range(warmup):
        for call in calls:
            call()
    times = []
    for n in range(repeats):
        call = calls[n % len(calls)]
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


def _onnx_conv(g: ConvGeometry, cin: int, cout: int, path: Path, seed: int = 0) -> Path:
    """A one-node ONNX model of the convolution at these counts (random weights)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    groups = cin if g.depthwise else g.groups
    rng = np.random.default_rng(seed)
    if g.transposed:
        weight = rng.standard_normal((cin, cout // groups, *g.kernel)).astype(np.float32)
    else:
        weight = rng.standard_normal((cout, cin // groups, *g.kernel)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w")]
    inputs = ["x", "w"]
    if g.bias:
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), "b"))
        inputs.append("b")
    pads = [g.padding[0], g.padding[1], g.padding[0], g.padding[1]]
    attrs = dict(kernel_shape=list(g.kernel), strides=list(g.stride), pads=pads, dilations=list(g.dilation),
                 group=groups)
    if g.transposed:
        attrs["output_padding"] = list(g.output_padding)
    node = helper.make_node("ConvTranspose" if g.transposed else "Conv", inputs, ["y"], **attrs)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             [1, cin, g.height, g.width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(path))
    return path


def time_conv(g: ConvGeometry, cin: int, cout: int, settings: LatencySettings, folder: Path | None = None) -> float:
    """Median ms of one batch-1 pass of the convolution at ``cin`` -> ``cout`` channels."""
    x = torch.randn(1, cin, g.height, g.width)
    copies = min(_copies(g, cin, cout), settings.repeats)
    if settings.engine == "torch":
        from core.train import TorchThreads

        modules = [_conv_module(g, cin, cout) for _ in range(copies)]
        with TorchThreads(settings.threads), torch.inference_mode():
            return _median_ms([lambda m=m: m(x) for m in modules], settings.repeats, settings.warmup)
    from core.profile import onnx_session

    with tempfile.TemporaryDirectory(prefix="defectprune-latency-", dir=folder) as tmp:
        sessions = [onnx_session(_onnx_conv(g, cin, cout, Path(tmp) / f"conv{i}.onnx", seed=i), settings.threads)
                    for i in range(copies)]
        feed = {"x": x.numpy()}
        return _median_ms([lambda s=s: s.run(None, feed) for s in sessions], settings.repeats, settings.warmup)


def time_model(model: nn.Module, input_size: Sequence[int], in_channels: int, settings: LatencySettings) -> float:
    """Median ms of one batch-1 pass of the whole model with the table's engine, over three
    times the table's repeats (at least 5): every prediction's non-conv remainder rests on
    this one number, so it gets more runs than a grid point."""
    from core.profile import export_onnx, measure_latency, measure_onnx_latency

    runs = max(3 * settings.repeats, 5)
    if settings.engine == "torch":
        return measure_latency(model, input_size, in_channels, runs=runs, warmup=max(settings.warmup, 1),
                               threads=settings.threads).median_ms
    with tempfile.TemporaryDirectory(prefix="defectprune-latency-") as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", input_size, in_channels)
        return measure_onnx_latency(path, input_size, in_channels, runs=runs,
                                    warmup=max(settings.warmup, 1), threads=settings.threads).median_ms


def time_convs_in_model(model: nn.Module, input_size: Sequence[int], in_channels: int,
                        settings: LatencySettings) -> dict[str, float]:
    """PyTorch: each conv's median ms inside batch-1 passes of the whole model (forward hooks
    around every conv, less the hooks' own time, measured on an empty module in the same
    passes). Inside the model a layer meets caches the other layers have filled, and PyTorch
    picks its kernel from the input's size: on the AVX-512 Xeon the unpruned Unet-resnet18's
    convs took 25.9 ms inside the model against 19.6 ms timed alone."""
    import statistics

    from core.train import TorchThreads

    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, CONV_TYPES)]
    probe = nn.Identity()
    times: dict[str, list[float]] = {name: [] for name, _ in convs}
    times[""] = []
    started: dict[str, float] = {}

    def hooks(name: str, module: nn.Module) -> list:
        return [module.register_forward_pre_hook(lambda _m, _a: started.__setitem__(name, time.perf_counter())),
                module.register_forward_hook(
                    lambda _m, _a, _o: times[name].append((time.perf_counter() - started[name]) * 1000.0))]

    handles = [h for name, m in [*convs, ("", probe)] for h in hooks(name, m)]
    x = example_input(tuple(input_size), in_channels)
    warmup, runs = max(settings.warmup, 1), max(3 * settings.repeats, 5)
    try:
        with eval_mode(model), TorchThreads(settings.threads), torch.inference_mode():
            for _ in range(warmup + runs):
                model(x)
                probe(x)
    finally:
        for h in handles:
            h.remove()
    overhead = statistics.median(times.pop("")[warmup:])
    return {name: max(statistics.median(t[warmup:]) - overhead, 0.0) for name, t in times.items()}


# ------------------------------------------------------------------ the table file
class LatencyTable:
    """One machine's measurements for one engine and thread count: per layer geometry, entries
    of kept input counts x output counts -> ms; per model signature, the whole model's ms."""

    def __init__(self, settings: LatencySettings, entries: dict[str, list[dict[str, Any]]] | None = None,
                 models: dict[str, dict[str, float]] | None = None, block: int | None = None):
        self.settings = settings
        self.entries = entries or {}
        self.models = models or {}
        self.block = channel_block(settings.engine) if block is None else int(block)  # the grids' channel block
        self.measured = 0  # timings this object made (0: everything came from the file)

    @classmethod
    def load(cls, settings: LatencySettings) -> LatencyTable:
        """The cached table (empty when there is none yet)."""
        from core import safe_json

        settings.validate()
        path = settings.path()
        if not path.is_file():
            return cls(settings)
        payload = safe_json.read(path, error=LatencyTableError)
        if not isinstance(payload, dict) or payload.get("version") != TABLE_VERSION:
            return cls(settings)  # another version's layout: measured again, then replaced
        try:
            entries = {str(k): [_checked_entry(e, path) for e in v] for k, v in (payload.get("entries") or {}).items()}
            models = {str(k): {"ms": float(v["ms"]), **({"convs": {str(n): float(t) for n, t in v["convs"].items()}}
                                                        if v.get("convs") is not None else {})}
                      for k, v in (payload.get("models") or {}).items()}
            block = int(payload.get("block", 1))
            if block < 1:
                raise ValueError(path)
        except (TypeError, KeyError, ValueError, AttributeError):
            raise LatencyTableError(f"{path} is not a latency table; delete it to measure again") from None
        if block != channel_block(settings.engine):
            return cls(settings)  # measured with another channel block: measured again, then replaced
        return cls(settings, entries, models, block)

    def save(self) -> Path:
        s = self.settings
        return write_json_atomic(s.path(), {
            "version": TABLE_VERSION, "cpu": cpu_model(), "engine": s.engine, "threads": s.threads,
            "block": self.block, "entries": self.entries, "models": self.models})

    def lookup(self, g: ConvGeometry) -> dict[str, Any] | None:
        """The smallest measured entry of ``g``'s geometry that covers its channel counts."""
        found = [e for e in self.entries.get(g.key, [])
                 if e["in"][-1] >= _in_axis(g) and e["out"][-1] >= g.out_channels]
        return min(found, key=lambda e: e["in"][-1] * e["out"][-1], default=None)


def _checked_entry(entry: Any, path: Path) -> dict[str, Any]:
    counts_in, counts_out = [int(v) for v in entry["in"]], [int(v) for v in entry["out"]]
    ms = [[float(v) for v in row] for row in entry["ms"]]
    if (not counts_in or not counts_out or len(ms) != len(counts_in) or any(len(r) != len(counts_out) for r in ms)
            or any(not math.isfinite(v) or v < 0 for r in ms for v in r)):
        raise ValueError(path)
    checked: dict[str, Any] = {"in": counts_in, "out": counts_out, "ms": ms}
    if entry.get("unaligned") is not None:
        count, value = int(entry["unaligned"]["in"]), float(entry["unaligned"]["ms"])
        if count < 1 or not math.isfinite(value) or value < 0:
            raise ValueError(path)
        checked["unaligned"] = {"in": count, "ms": value}
    return checked


def _blocked(g: ConvGeometry) -> bool:
    """Whether the table treats ``g`` as a blocked convolution: plain convs only (ONNX Runtime's
    grouped ones need block-multiple groups and its transposed ones are never blocked; the
    same rule for PyTorch, which was measured on plain convs only)."""
    return not g.transposed and g.groups == 1


def _unaligned_in(g: ConvGeometry, block: int, engine: str = "onnxruntime") -> int | None:
    """The input count at which a table also times ``g``'s unblocked fallback (one below all of
    its inputs, at all of its outputs), or None where no kept count falls back: PyTorch (whose
    unaligned counts are padded, never fall back), no block, a conv that is never blocked, or
    under two blocks of inputs (fewer than a block run blocked too)."""
    if engine != "onnxruntime" or block <= 1 or not _blocked(g) or g.in_channels % block or g.in_channels <= block:
        return None
    return g.in_channels - 1


def _in_axis(g: ConvGeometry) -> int:
    """The count a table measures along its input axis: depthwise and other grouped convs are
    timed along their outputs only (depthwise: inputs are the outputs; grouped: scaled as MACs)."""
    return 1 if (g.depthwise or g.groups > 1) else g.in_channels


def _grid_for(g: ConvGeometry, points: int, block: int = 1) -> tuple[list[int], list[int]]:
    if g.depthwise:
        return [1], grid_counts(g.out_channels, points)
    if g.groups > 1:  # grouped, not depthwise: full size only, scaled with in x out shares
        return [1], [g.out_channels]
    block = block if _blocked(g) else 1
    return grid_counts(g.in_channels, points, block), grid_counts(g.out_channels, points, block)


def build_table(model: nn.Module, input_size: Sequence[int], in_channels: int, settings: LatencySettings,
                progress: StageProgress | None = None,
                geometries: Sequence[ConvGeometry] | None = None) -> tuple[LatencyTable, list[ConvGeometry], float]:
    """The table for ``model`` at ``input_size``: what the cache lacks is measured (each missing
    layer geometry over the grid, then the whole model), saved, and returned with the model's
    convolutions and its whole-model ms. ``progress(fraction, message)`` answering true stops
    the measuring (`LatencyStopped`; what was measured is saved)."""
    settings.validate()
    size = (int(input_size[0]), int(input_size[1]))
    table = LatencyTable.load(settings)
    geometries = list(geometries) if geometries is not None else conv_geometries(model, size, in_channels)
    missing: dict[tuple[str, int, int], ConvGeometry] = {}
    for g in geometries:
        if table.lookup(g) is None:
            missing.setdefault((g.key, _in_axis(g), g.out_channels), g)
    signature = model_signature(model, geometries, size)
    todo = [(g, _grid_for(g, settings.grid, table.block)) for g in missing.values()]
    total = (sum(len(i) * len(o) + (_unaligned_in(g, table.block, settings.engine) is not None) for g, (i, o) in todo)
             + (signature not in table.models))
    done = 0

    def report(message: str) -> None:
        if progress is not None and total and progress(done / total, message):
            if table.measured:
                table.save()
            raise LatencyStopped(f"measuring the latency table was stopped after {done} of {total} timings "
                                 "(those are kept; measure again to finish)")

    folder = settings.path().parent
    folder.mkdir(parents=True, exist_ok=True)
    for n, (g, (counts_in, counts_out)) in enumerate(todo, start=1):
        ms = []
        for cin in counts_in:
            row = []
            for cout in counts_out:
                report(f"timing layer geometry {n}/{len(todo)} ({g.key}) at {cin} -> {cout} channels")
                real_in = g.in_channels if g.groups > 1 and not g.depthwise else cin
                row.append(time_conv(g, cout if g.depthwise else real_in, cout, settings, folder))
                done += 1
                table.measured += 1
            ms.append(row)
        entry: dict[str, Any] = {"in": counts_in, "out": counts_out, "ms": ms}
        unaligned = _unaligned_in(g, table.block, settings.engine)
        if unaligned is not None:  # the fallback an unaligned input count runs, timed once per geometry
            report(f"timing layer geometry {n}/{len(todo)} ({g.key}) at {unaligned} -> {g.out_channels} channels")
            entry["unaligned"] = {"in": unaligned, "ms": time_conv(g, unaligned, g.out_channels, settings, folder)}
            done += 1
            table.measured += 1
        table.entries.setdefault(g.key, []).append(entry)
    if signature not in table.models:
        report("timing the whole model")
        table.models[signature] = {"ms": time_model(model, size, in_channels, settings)}
        if settings.engine == "torch":  # ONNX Runtime's fused graph has no per-layer hook
            table.models[signature]["convs"] = time_convs_in_model(model, size, in_channels, settings)
        done += 1
        table.measured += 1
    if table.measured:
        table.save()
        if progress is not None:
            progress(1.0, f"latency table: {table.measured} timings measured")
    return table, geometries, table.models[signature]["ms"]


def cached_table(model: nn.Module, input_size: Sequence[int], in_channels: int,
                 settings: LatencySettings) -> tuple[LatencyTable, list[ConvGeometry], float] | None:
    """The table for ``model`` when the cache already holds all of it (nothing is measured),
    else None: what a page asks before offering to measure."""
    size = (int(input_size[0]), int(input_size[1]))
    table = LatencyTable.load(settings)
    geometries = conv_geometries(model, size, in_channels)
    signature = model_signature(model, geometries, size)
    if signature not in table.models or any(table.lookup(g) is None for g in geometries):
        return None
    return table, geometries, table.models[signature]["ms"]


# ------------------------------------------------------------------ the cost model
class LatencyCostModel(CostModel):
    """The MACs model's interface (`CostModel`) with milliseconds as the budget: ``budget(keep)``
    is the table's bilinear interpolation at each conv's kept input and output counts plus
    the non-conv remainder scaled by the convs' output volume; ``predict`` adds
    ``latency_ms`` and ``latency_reduction`` to the MACs and parameters."""

    kind = "latency_ms"

    def __init__(self, graph: PruningGraph, table: LatencyTable, geometries: Sequence[ConvGeometry],
                 model_ms: float):
        super().__init__(graph)
        by_name = {g.name: g for g in geometries}
        convs = [name for name, module in graph.model.named_modules() if isinstance(module, CONV_TYPES)]
        if [n for n in convs if n in by_name] != convs:
            raise LatencyTableError("the latency table was measured on another model; measure it for this one")
        self.settings = table.settings
        self.model_ms = float(model_ms)
        width = max(2, max(max(len(e["in"]), len(e["out"])) for e in (self._entry(table, by_name[n]) for n in convs)))
        gin, gout, ms, in_full, out_full, volume, mac_scaled = [], [], [], [], [], [], []
        blocked, penalty, depthwise = [], [], []
        self.block = block = table.block
        for name in convs:
            g = by_name[name]
            entry = self._entry(table, g)
            a, b, t = _padded(entry, width)
            gin.append(a)
            gout.append(b)
            ms.append(t)
            grouped = g.groups > 1 and not g.depthwise
            mac_scaled.append(grouped)
            depthwise.append(g.depthwise)
            in_full.append(0.0 if (g.depthwise or grouped) else float(g.in_channels))
            out_full.append(float(g.out_channels))
            volume.append(float(g.out_volume))
            # blocked rows: counts read at the next block multiple, for ORT an unaligned input count
            # paying the fallback's measured ratio instead (only where the full input count is
            # aligned or under a block: with an unaligned full count the grid's last point is
            # itself unaligned)
            blocked.append(block > 1 and _blocked(g) and (g.in_channels % block == 0 or g.in_channels < block))
            ratio = 1.0
            if entry.get("unaligned") and blocked[-1]:
                aligned_ms = _bilinear_np(a, b, t, float(entry["unaligned"]["in"]), float(g.out_channels))
                ratio = entry["unaligned"]["ms"] / aligned_ms if aligned_ms > 0 else 1.0
            # at least 1 (a 1x1 conv's fallback, a plain GEMM, can be a little faster: held level,
            # so that more channels between two block multiples never look faster), at most 2
            penalty.append(min(max(ratio - 1.0, 0.0), 1.0))
        self._gin = torch.tensor(np.array(gin), dtype=torch.float64)
        self._gout = torch.tensor(np.array(gout), dtype=torch.float64)
        self._ms = torch.tensor(np.array(ms), dtype=torch.float64)
        self._in_full = torch.tensor(in_full, dtype=torch.float64)
        self._out_full = torch.tensor(out_full, dtype=torch.float64)
        self._volume = torch.tensor(volume, dtype=torch.float64)
        self._mac_scaled = torch.tensor(mac_scaled)
        self._blocked = torch.tensor(blocked, dtype=torch.bool)
        # per conv: how much slower ONNX Runtime's unblocked fallback is than the blocked kernel
        # at the same counts (one timing per geometry; measured 1.10-1.20 for 3x3 convs)
        self._penalty = torch.tensor(penalty, dtype=torch.float64)
        self._depthwise = torch.tensor(depthwise)
        self.conv_scale = 1.0  # at full size every conv runs blocked or has no block: all are scaled
        # PyTorch: each conv's time inside the whole model against its time alone, at full size
        # (how a cut conv carries it: `_convs`)
        self._in_model = None
        ones = torch.ones(len(self.group_names), dtype=torch.float64)
        in_model = (table.models.get(model_signature(graph.model, geometries, _graph_input(graph)[0])) or {}).get("convs")
        if in_model and all(n in in_model for n in convs):
            alone = self._convs(ones).detach()
            measured = torch.tensor([in_model[n] for n in convs], dtype=torch.float64)
            ratio = torch.where(alone > 0, measured / alone.clamp_min(1e-9), torch.ones_like(alone))
            self._in_model = ratio.clamp(*IN_MODEL_RATIO) - 1.0
        full_ms = float(self._convs(ones).sum())
        self.conv_ms0 = full_ms
        # everything but the convs: the measured whole model less the table's convs; where the
        # convs alone add up to more than the model (timed alone they can be slower), they are
        # scaled down to it instead, so the prediction stays monotone and exact at full size
        self.rest_ms = max(self.model_ms - full_ms, 0.0)
        self.conv_scale = 1.0 if full_ms <= self.model_ms or full_ms <= 0 else self.model_ms / full_ms
        self.latency0 = float(self.latency(torch.ones(len(self.group_names), dtype=torch.float64)))

    @staticmethod
    def _entry(table: LatencyTable, g: ConvGeometry) -> dict[str, Any]:
        entry = table.lookup(g)
        if entry is None:
            raise LatencyTableError(f"the latency table has no timings for layer {g.name} ({g.key}); measure it")
        return entry

    def _fractions(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = keep.to(torch.float64)
        extended = torch.cat([keep, keep.new_ones(1)])
        return self._fixed + self._composition @ keep, extended[self._out_idx]

    def _convs(self, keep: torch.Tensor) -> torch.Tensor:
        """Each conv's predicted ms at the keep ratios. With a channel block B > 1, blocked
        convs are read at block-rounded counts. PyTorch reads both counts rounded up to a
        multiple of B. ONNX Runtime reads a conv whose input count is a multiple
        of `ORT_INPUT_ALIGNMENT` the same way, and one whose input count is under B at that count
        and its output count rounded up. It reads one with any other input count (the unblocked
        fallback) at its exact counts, times 1 + its geometry's measured fallback penalty.
        Every other conv is scaled by ``conv_scale``, the fallback is not: a blocked ONNX
        Runtime conv timed alone also reorders its input into the blocked layout and its output
        back, which a model does only where the layout changes, while the fallback runs in the
        plain layout alone and in the model alike (on the AVX-512 Xeon the unpruned model's convs
        timed alone added up to 20.2 ms against 16.3 ms for the model, and scaling the fallback
        too underpredicted models with unaligned counts by 16-22%, 4-14% without). With PyTorch
        convs timed inside the model (`time_convs_in_model`), each conv is also multiplied by
        1 + (its in-model / alone ratio - 1) x the share of its weights kept where the ratio is
        above 1, by the ratio itself where it is below. Rounding passes the gradient straight
        through: the value of the rounded count, the slope of the exact one."""
        in_frac, out_frac = self._fractions(keep)
        x_in = torch.where(self._mac_scaled, torch.ones_like(in_frac), in_frac * self._in_full)
        x_out = out_frac * self._out_full
        fallback = torch.zeros_like(self._blocked)
        if self.block > 1 and bool(self._blocked.any()):
            b = float(self.block)
            count = x_in.detach()
            padded = self._blocked
            if self.settings.engine == "onnxruntime":  # inputs under a block are read as they are
                a = float(ORT_INPUT_ALIGNMENT)
                # kept counts are whole numbers, composed in float32: 528 reads as 528.0000157
                fallback = self._blocked & (count > b + 1e-3) & ((count - torch.round(count / a) * a).abs() > 1e-3)
                padded = self._blocked & ~fallback & (count > b + 1e-3)
            x_in = torch.where(padded, _round_up(x_in, b, self._in_full), x_in)
            x_out = torch.where(self._blocked & ~fallback, _round_up(x_out, b, self._out_full), x_out)
        conv = _bilinear(self._gin, self._gout, self._ms, x_in, x_out)
        conv = torch.where(self._mac_scaled, conv * in_frac * out_frac, conv)
        if self._in_model is not None:
            # slower inside the model: what makes it slower, weights the other layers pushed out
            # of the caches, shrinks with the weights kept; faster inside: the same factor at any
            # count (a factor that shrank with the counts could make more channels look cheaper)
            kept_weights = torch.where(self._depthwise, out_frac, in_frac * out_frac)
            share = torch.where(self._in_model > 0, kept_weights, torch.ones_like(kept_weights))
            conv = conv * (1.0 + self._in_model * share)
        return torch.where(fallback, conv * (1.0 + self._penalty), conv * self.conv_scale)

    def latency(self, keep: torch.Tensor) -> torch.Tensor:
        """Predicted ms for keep ratios (one per group, differentiable; monotone in each ratio
        except, for ONNX Runtime, at multiples of `ORT_INPUT_ALIGNMENT`, which run faster than
        the counts just below them, as they do on the engine)."""
        _, out_frac = self._fractions(keep)
        share = (self._volume * out_frac).sum() / self._volume.sum().clamp_min(1.0)
        return (self._convs(keep).sum() + self.rest_ms * share).clamp_min(1e-6)

    @property
    def budget0(self) -> float:
        return self.latency0

    def budget(self, keep: torch.Tensor) -> torch.Tensor:
        return self.latency(keep)

    def predict(self, kept: Mapping[str, int] | None = None) -> dict[str, float]:
        result = super().predict(kept)
        ms = float(self.latency(self.keep_vector(kept)))
        return {**result, "latency_ms": ms, "latency_reduction": 1.0 - ms / self.latency0}

    def smallest_ms(self, limits) -> float:
        """Predicted ms of the smallest model the per-group limits allow (every free group at
        its fewest channels): no latency target below it can be met."""
        kept = {g.name: limits.kept(g, 0.0) for g in self.graph.groups}
        return self.budget_of(kept)


def _round_up(x: torch.Tensor, block: float, full: torch.Tensor) -> torch.Tensor:
    """``x`` rounded up to a multiple of ``block`` (at most ``full``), the gradient passed
    straight through."""
    rounded = torch.minimum(torch.ceil(x.detach() / block - 1e-7) * block, full)
    return x + (rounded - x.detach()).clamp_min(0.0)


def _padded(entry: Mapping[str, Any], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An entry's axes padded to ``width`` points (beyond the last measured count, times held
    flat: never reached, counts are clamped to the measured range), its times made monotone
    (each point at least every point with fewer channels on both axes: a single noisy timing
    never makes more channels look faster)."""
    a = list(map(float, entry["in"]))
    b = list(map(float, entry["out"]))
    t = np.maximum.accumulate(np.maximum.accumulate(np.asarray(entry["ms"], dtype=np.float64), axis=0), axis=1)
    while len(a) < width:
        a.append(a[-1] + 1.0)
        t = np.vstack([t, t[-1:]])
    while len(b) < width:
        b.append(b[-1] + 1.0)
        t = np.hstack([t, t[:, -1:]])
    return np.asarray(a), np.asarray(b), t


def _bilinear(gin: torch.Tensor, gout: torch.Tensor, ms: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row n: the bilinear interpolation of ``ms[n]`` (axes ``gin[n]``, ``gout[n]``) at
    (``x[n]``, ``y[n]``), each clamped to its axis; differentiable in x and y."""
    x = torch.minimum(torch.maximum(x, gin[:, 0]), gin[:, -1])
    y = torch.minimum(torch.maximum(y, gout[:, 0]), gout[:, -1])
    width = gin.shape[1]
    i = (torch.searchsorted(gin, x.detach().unsqueeze(1).contiguous(), right=True).squeeze(1) - 1).clamp(0, width - 2)
    j = (torch.searchsorted(gout, y.detach().unsqueeze(1).contiguous(), right=True).squeeze(1) - 1).clamp(0, width - 2)
    rows = torch.arange(gin.shape[0])
    x0, x1 = gin[rows, i], gin[rows, i + 1]
    y0, y1 = gout[rows, j], gout[rows, j + 1]
    tx = (x - x0) / (x1 - x0)
    ty = (y - y0) / (y1 - y0)
    return ((1 - tx) * (1 - ty) * ms[rows, i, j] + tx * (1 - ty) * ms[rows, i + 1, j]
            + (1 - tx) * ty * ms[rows, i, j + 1] + tx * ty * ms[rows, i + 1, j + 1])


def _bilinear_np(gin: np.ndarray, gout: np.ndarray, ms: np.ndarray, x: float, y: float) -> float:
    value = _bilinear(torch.as_tensor(gin[None]), torch.as_tensor(gout[None]), torch.as_tensor(ms[None]),
                      torch.tensor([x], dtype=torch.float64), torch.tensor([y], dtype=torch.float64))
    return float(value[0])


def latency_cost_model(graph: PruningGraph, settings: LatencySettings,
                       progress: StageProgress | None = None) -> LatencyCostModel:
    """The latency cost model of ``graph``'s model at its traced input size, measuring what the
    machine's cached table lacks (`build_table`)."""
    size, channels = _graph_input(graph)
    table, geometries, model_ms = build_table(graph.model, size, channels, settings, progress)
    return LatencyCostModel(graph, table, geometries, model_ms)


def cached_latency_cost_model(graph: PruningGraph, settings: LatencySettings) -> LatencyCostModel | None:
    """The latency cost model from the cache alone (None when anything would need measuring)."""
    size, channels = _graph_input(graph)
    found = cached_table(graph.model, size, channels, settings)
    return None if found is None else LatencyCostModel(graph, *found)


def _graph_input(graph: PruningGraph) -> tuple[tuple[int, int], int]:
    example = graph.example_inputs
    return (int(example.shape[-2]), int(example.shape[-1])), int(example.shape[1])
