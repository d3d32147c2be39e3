"""Tracing a model for its prunable groups: which channels must be removed together, in network
order, at which output stride, and what each layer costs.

Torch-Pruning's `DependencyGraph` finds the groups (a conv, its BatchNorm, every consumer's input
channels and every layer coupled through residual adds or concatenations); `torch_groups` puts
them in network order with the classifier conv left out, and `core.models.graph` describes each
as a `PrunableGroup`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.utils import op_counter

from core.models.runtime import eval_mode, example_input, model_device

ROOT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.ConvTranspose2d)
ROLES = ("encoder", "decoder", "head")
# The deepest output stride of every encoder in the zoo (depth 5). A conv whose output is
# coarser than this runs on a globally pooled map (squeeze-excitation, ASPP image pooling).
MAX_ENCODER_STRIDE = 32


def model_in_channels(model: nn.Module) -> int:
    """Input channels of the first conv, i.e. of the image the model expects."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    raise ValueError("model has no Conv2d layer")


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that are never pruned: the segmentation head's conv(s) (their outputs are
    the classes) and a classification head's linear layers when the model has one."""
    layers: list[nn.Module] = []
    for head_name in ("segmentation_head", "classification_head"):
        head = getattr(model, head_name, None)
        if head is None:
            continue
        layers.extend(m for m in head.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)))
    return layers


def macs_counter_of(module: nn.Module) -> Callable | None:
    """Torch-Pruning's MAC-counting hook for this module's type, also for subclasses (its op
    counter matches exact types only, so EfficientNet's same-padding convs would count 0)."""
    for cls in type(module).__mro__:
        hook = op_counter.MODULES_MAPPING.get(cls)
        if hook is not None:
            return hook
        if cls is nn.Module:
            break
    return None


@dataclass
class ModelTrace:
    """What one dummy forward tells about the convs and the cost of each layer.

    ``order``: conv name -> execution position; ``scales``: conv name -> output stride (input
    height / feature height); ``layer_macs``: module name -> MACs (Torch-Pruning's counting
    rules, batch 1); ``total_macs``: their sum (what `core.profile.count_macs` reports).
    """

    order: dict[str, int]
    scales: dict[str, int]
    layer_macs: dict[str, int]
    total_macs: int


@contextlib.contextmanager
def _recording(model: nn.Module, height: int) -> Iterator[ModelTrace]:
    """Hooks that fill a `ModelTrace` during whatever forward runs inside the block."""
    seen: dict[str, int] = {}  # insertion order = execution order
    macs: dict[str, int] = {}
    trace = ModelTrace(order={}, scales={}, layer_macs=macs, total_macs=0)
    handles = []

    def conv_hook(name: str):
        def record(_module, _inputs, output):
            if name not in seen and isinstance(output, torch.Tensor) and output.dim() == 4:
                seen[name] = max(1, round(height / max(1, int(output.shape[-2]))))
        return record

    def macs_hook(name: str, counter: Callable):
        def record(module, inputs, output):
            saved = module.__dict__.get("__flops__")
            module.__flops__ = 0
            try:
                counter(module, inputs, output)
                macs[name] = macs.get(name, 0) + int(module.__flops__)
            finally:
                if saved is None:
                    del module.__flops__
                else:
                    module.__flops__ = saved
        return record

    counted: set[nn.Module] = set()
    for name, module in model.named_modules():
        if isinstance(module, ROOT_MODULE_TYPES):
            handles.append(module.register_forward_hook(conv_hook(name)))
        counter = macs_counter_of(module)
        # Like the op counter, a counted module's children are not counted again.
        if counter is not None and not any(p in counted for p in _ancestors(model, name)):
            counted.add(module)
            handles.append(module.register_forward_hook(macs_hook(name, counter)))
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()
    last = 1
    for position, (name, scale) in enumerate(seen.items()):
        if scale > MAX_ENCODER_STRIDE:  # global context: the stride its input was pooled from
            scale = last
        trace.order[name] = position
        trace.scales[name] = scale
        last = scale
    trace.total_macs = int(sum(macs.values()))


def trace_model(model: nn.Module, input_size: Sequence[int] = (64, 64),
                in_channels: int | None = None) -> ModelTrace:
    """One dummy forward (eval mode, no autograd) recording conv order, strides and MACs.

    A conv on a globally pooled map (squeeze-excitation, ASPP image pooling) gets the stride of
    the feature map the pooled context came from, i.e. of the conv that ran just before it."""
    channels = model_in_channels(model) if in_channels is None else in_channels
    with _recording(model, int(input_size[0])) as trace, eval_mode(model), torch.no_grad():
        model(example_input(input_size, channels, device=model_device(model)))
    return trace


def dependency_graph(model: nn.Module, input_size: Sequence[int] = (64, 64),
                     in_channels: int | None = None) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, traced in eval mode on a dummy batch
    (the module training flags are restored afterwards)."""
    graph, _trace = graph_and_trace(model, input_size, in_channels)
    return graph


def graph_and_trace(model: nn.Module, input_size: Sequence[int],
                    in_channels: int | None) -> tuple[tp.DependencyGraph, ModelTrace]:
    """The dependency graph and the `ModelTrace` from the graph's own tracing forward."""
    channels = model_in_channels(model) if in_channels is None else in_channels
    example = example_input(input_size, channels, device=model_device(model))
    with _recording(model, int(input_size[0])) as trace, eval_mode(model), torch.enable_grad():
        # A tuple: Torch-Pruning calls model(*example_inputs) first, and unpacking a bare
        # tensor would feed it an unbatched image.
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=(example,), verbose=False)
    return graph, trace


def torch_groups(model: nn.Module, graph: tp.DependencyGraph,
                 ignored_layers: Sequence[nn.Module] | None = None,
                 order: dict[str, int] | None = None) -> list:
    """Torch-Pruning's groups (full channel indices) in network order, the classifier ignored.

    Network order is the forward execution order of the first conv that produces each group's
    channels (``order``: conv name -> position, e.g. `ModelTrace.order`; traced here at 64 px
    when not given). `core.models.graph.PruningGraph` numbers its groups in this order.
    """
    ignored = list(classifier_layers(model) if ignored_layers is None else ignored_layers)
    groups = list(graph.get_all_groups(ignored_layers=ignored, root_module_types=list(ROOT_MODULE_TYPES)))
    if order is None:
        order = trace_model(model).order
    names = {module: name for name, module in model.named_modules()}
    last = len(order) + 1

    def first_run(group) -> int:
        runs = [order.get(names.get(item.dep.target.module, ""), last) for item in group
                if graph.is_out_channel_pruning_fn(item.dep.handler)]
        return min(runs, default=last)

    return sorted(groups, key=first_run)  # stable: ties keep Torch-Pruning's order


def role_of(name: str) -> str:
    """encoder / decoder / head, from the module name's first part."""
    top = name.split(".", 1)[0]
    if top in ("encoder", "decoder"):
        return top
    return "head"


def _ancestors(model: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".") if name else []
    found, module = [], model
    for part in parts[:-1]:
        module = getattr(module, part)
        found.append(module)
    return ([model] if name else []) + found
