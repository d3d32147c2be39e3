"""The prunable-group map: which channels must be removed together, and where they live.

Torch-Pruning's `DependencyGraph` finds the groups (a conv, its BatchNorm, every consumer's input
channels and every layer coupled through residual adds or concatenations); this module only
describes them for people and for the allocators: a readable name, the output stride ("scale"),
the role in the network, the channel count, the parameters coupled to the channels and the MACs
they account for. The classifier conv of the segmentation head is never part of the map.

A group's ``name`` is the module name of its root conv exactly as Torch-Pruning roots it in
``DG.get_all_groups`` (and therefore as it appears in ``pruner.pruning_history()``), so a group
can be fetched again with ``DG.get_pruning_group(module, pruner.prune_out_channels, idxs)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterator, Sequence

import pandas as pd
import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.utils import op_counter

from core.models.runtime import eval_mode, example_input, model_device  # noqa: F401 (moved there)

ROOT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.ConvTranspose2d)
ROLES = ("encoder", "decoder", "head")
# The deepest output stride of every encoder in the zoo (depth 5). A conv whose output is
# coarser than this runs on a globally pooled map (squeeze-excitation, ASPP image pooling).
MAX_ENCODER_STRIDE = 32


@dataclass(frozen=True)
class GroupInfo:
    """One prunable group, as shown in the dashboard and used by the allocators.

    ``params`` counts every parameter that depends on the group's channels (the producing
    convs and norms whole, the consumers' input slices), i.e. what removing all of them would
    remove. ``macs_share`` is the share of the model's MACs spent producing the group's
    channels (each layer counted once, in the group that owns its outputs, so the shares of all
    groups sum to at most 1); ``macs_coupled_share`` adds the consumers' MACs, i.e. the
    first-order share of MACs that shrinks with the group's channel count.
    """

    index: int
    name: str
    scale: int
    role: str
    channels: int
    params: int
    macs: int
    macs_share: float
    macs_coupled_share: float
    layers: tuple[str, ...]  # convs whose output channels are the group (execution order)
    consumers: tuple[str, ...]  # convs whose input channels include the group


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
    when not given). `prunable_groups` numbers ``index`` in this order.
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


def prunable_groups(model: nn.Module, input_size: Sequence[int] = (64, 64),
                    in_channels: int | None = None,
                    graph: tp.DependencyGraph | None = None) -> list[GroupInfo]:
    """The prunable-group map of ``model`` at ``input_size`` (height, width), in network order.

    ``graph`` reuses a dependency graph already built for this model (it must be current: a
    graph goes stale once the model is pruned through another graph).
    """
    channels = model_in_channels(model) if in_channels is None else in_channels
    if graph is None:
        graph, trace = graph_and_trace(model, input_size, channels)
    else:
        trace = trace_model(model, input_size, channels)
    order, scales = trace.order, trace.scales
    groups = torch_groups(model, graph, order=order)
    names = {module: name for name, module in model.named_modules()}
    layer_macs = {module: trace.layer_macs.get(name, 0) for name, module in model.named_modules()}
    total_macs = max(float(trace.total_macs), 1.0)

    infos: list[GroupInfo] = []
    for index, group in enumerate(groups):
        root = group[0].dep.target.module
        root_name = names[root]
        produced: dict[nn.Module, float] = {}  # module -> share of its outputs in the group
        consumed: dict[nn.Module, float] = {}  # module -> share of its inputs in the group
        loose_params = 0
        for item in group:
            module, handler, count = item.dep.target.module, item.dep.handler, len(item.idxs)
            if isinstance(module, nn.Parameter):  # an unwrapped parameter: pruned along one dim
                loose_params += module.numel() // max(1, module.shape[0]) * count
                continue
            if not isinstance(module, nn.Module):
                continue  # element-wise ops, concatenations: no parameters, no MACs of their own
            if graph.is_out_channel_pruning_fn(handler):
                produced[module] = max(produced.get(module, 0.0), _share(module, count, out=True))
            elif graph.is_in_channel_pruning_fn(handler):
                consumed[module] = max(consumed.get(module, 0.0), _share(module, count, out=False))
        for module in produced:
            consumed.pop(module, None)  # a depthwise conv's inputs are its outputs: count once
        params = loose_params
        params += sum(round(sum(p.numel() for p in m.parameters(recurse=False)) * s) for m, s in produced.items())
        params += sum(round(_weight_numel(m) * s) for m, s in consumed.items())
        own_macs = sum((layer_macs.get(m) or 0) * s for m, s in produced.items())
        coupled_macs = own_macs + sum((layer_macs.get(m) or 0) * s for m, s in consumed.items())
        convs = sorted((m for m in produced if isinstance(m, ROOT_MODULE_TYPES)), key=lambda m: order.get(names[m], 0))
        consumers = sorted((m for m in consumed if isinstance(m, ROOT_MODULE_TYPES)), key=lambda m: order.get(names[m], 0))
        infos.append(GroupInfo(
            index=index,
            name=root_name,
            scale=int(scales.get(root_name, 1)),
            role=role_of(root_name),
            channels=len(group[0].idxs),
            params=int(params),
            macs=int(round(own_macs)),
            macs_share=float(own_macs / total_macs),
            macs_coupled_share=float(coupled_macs / total_macs),
            layers=tuple(names[m] for m in convs),
            consumers=tuple(names[m] for m in consumers),
        ))
    return infos


def groups_frame(groups: Sequence[GroupInfo]) -> pd.DataFrame:
    """One row per group (layer lists joined into text so the frame displays and exports)."""
    columns = [f.name for f in fields(GroupInfo)]
    rows = []
    for info in groups:
        row = asdict(info)
        row["layers"] = ", ".join(info.layers)
        row["consumers"] = ", ".join(info.consumers)
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def _ancestors(model: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".") if name else []
    found, module = [], model
    for part in parts[:-1]:
        module = getattr(module, part)
        found.append(module)
    return ([model] if name else []) + found


def _share(module: nn.Module, count: int, out: bool) -> float:
    """Share of ``module``'s output (or input) channels that ``count`` channels are."""
    if isinstance(module, nn.modules.conv._ConvNd):
        total = module.out_channels if out else module.in_channels
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        total = module.num_features
    elif isinstance(module, nn.Linear):
        total = module.out_features if out else module.in_features
    else:
        return 1.0
    return min(1.0, count / max(1, total))


def _weight_numel(module: nn.Module) -> int:
    weight = getattr(module, "weight", None)
    return int(weight.numel()) if isinstance(weight, torch.Tensor) else 0
