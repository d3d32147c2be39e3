"""The prunable groups of a model, as every layer above sees them, and cutting them for real.

A `PruningGraph` builds Torch-Pruning's `DependencyGraph` once for a model and describes every
prunable group (never the classifier conv) as one `PrunableGroup`: for people (a readable
name, the output stride, the role, the parameters coupled to the channels and the MACs they
account for) and for the pruning method (the module names whose output channels it owns, the
convs whose input channels it feeds, where its channel responses are read, the channel step
its kept count must respect). Tracing, network order and scales are `core.models.groups`'.
The graph is rebuilt after each pruning, since channel counts change; building takes
milliseconds.

A group's ``name`` is the module name of its root conv exactly as Torch-Pruning roots it in
``DG.get_all_groups`` (and therefore as it appears in ``pruner.pruning_history()``), so a group
can be fetched again with ``DG.get_pruning_group(module, pruner.prune_out_channels, idxs)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn as nn
import torch_pruning as tp

from core.errors import DefectPruneError
from core.models.groups import (
    ROOT_MODULE_TYPES, ModelTrace, classifier_layers, graph_and_trace, model_in_channels, role_of, torch_groups,
    trace_model,
)
from core.models.runtime import example_input, model_device


class PruningError(DefectPruneError):
    """A pruning request the model or the settings cannot satisfy."""


# Convolutions of every kind (Conv2d, ConvTranspose2d in Linknet's decoder) own channels.
CONV_TYPES = ROOT_MODULE_TYPES


@dataclass
class PrunableGroup:
    """One prunable group: channels removed together.

    ``params`` counts every parameter that depends on the group's channels (the producing
    convs and norms whole, the consumers' input slices), i.e. what removing all of them would
    remove. ``macs_share`` is the share of the model's MACs spent producing the group's
    channels (each layer counted once, in the group that owns its outputs, so the shares of all
    groups sum to at most 1); ``macs_coupled_share`` adds the consumers' MACs, i.e. the
    first-order share of MACs that shrinks with the group's channel count.
    """

    index: int
    name: str  # module name of the root conv, e.g. "encoder.layer3.1.conv1"
    channels: int
    out_modules: list[str]  # modules whose output channels (or features) belong to the group
    in_convs: list[tuple[str, int]] = field(default_factory=list)  # (conv name, channels fed)
    response_module: str = ""  # where the group's channel responses are read
    # where a channel mask applies: (module name, its channel indices, the group's channel
    # indices they carry). Not always the identity: a group can span a concatenation.
    mask_modules: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    # group channels owned by one module when the group spans a concatenation; each must keep
    # at least one channel, or that module would be cut to nothing
    segments: list[list[int]] = field(default_factory=list)
    channel_step: int = 1  # kept counts must be multiples of this (GroupNorm groups)
    scale: int = 1  # output stride of the root conv's feature map (input height / its height)
    # the classifier conv reads these channels: cutting them starves every class at once, and a
    # frozen-weight scorer underrates that (AllocationLimits.protect_head_input keeps them whole)
    feeds_classifier: bool = False
    params: int = 0
    macs: int = 0
    macs_share: float = 0.0
    macs_coupled_share: float = 0.0
    layers: tuple[str, ...] = ()  # convs whose output channels are the group (execution order)
    consumers: tuple[str, ...] = ()  # convs whose input channels include the group

    @property
    def role(self) -> str:
        return role_of(self.name)


# The group map as a table: what people read (the pruning internals stay out).
GROUP_COLUMNS = ("index", "name", "scale", "role", "channels", "params", "macs", "macs_share",
                 "macs_coupled_share", "layers", "consumers")


class PruningGraph:
    """The groups of a model as the pruning method and the dashboard see them.

    ``dependency_graph`` reuses a Torch-Pruning graph already built for this model (it must be
    current: a graph goes stale once the model is pruned through another graph)."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor,
                 dependency_graph: tp.DependencyGraph | None = None):
        self.model = model
        self.example_inputs = example_inputs
        self.names = {module: name for name, module in model.named_modules()}
        self.modules = dict(model.named_modules())
        self.ignored = classifier_layers(model)
        if not self.ignored:
            raise PruningError(f"{type(model).__name__} has no segmentation_head conv to protect")
        size, channels = example_inputs.shape[-2:], example_inputs.shape[1]
        if dependency_graph is None:
            self.dependency_graph, trace = graph_and_trace(model, size, channels)
        else:
            self.dependency_graph, trace = dependency_graph, trace_model(model, size, channels)
        self.groups: list[PrunableGroup] = []
        head = {self.names[m] for m in self.ignored}
        for index, tp_group in enumerate(torch_groups(model, self.dependency_graph, self.ignored, trace.order)):
            group = self._describe(tp_group, trace)
            group.index = index
            group.scale = int(trace.scales.get(group.name, 1))
            group.feeds_classifier = any(conv in head for conv, _ in group.in_convs)
            self.groups.append(group)
        self.by_name = {g.name: g for g in self.groups}

    @classmethod
    def traced(cls, model: nn.Module, input_size: Sequence[int], in_channels: int | None = None) -> "PruningGraph":
        """The graph of ``model`` traced on a dummy batch of ``input_size`` (height, width)."""
        channels = model_in_channels(model) if in_channels is None else int(in_channels)
        return cls(model, example_input(input_size, channels, device=model_device(model)))

    # ------------------------------------------------------------ description
    def _describe(self, tp_group, trace: ModelTrace) -> PrunableGroup:
        root = tp_group[0].dep.target.module
        name = self.names[root]
        out_modules, in_convs, step = [], [], 1
        channel_map: dict[str, tuple[list[int], list[int]]] = {}
        produced: dict[nn.Module, float] = {}  # module -> share of its outputs in the group
        consumed: dict[nn.Module, float] = {}  # module -> share of its inputs in the group
        loose_params = 0
        for item in tp_group:
            dep, idxs = item.dep, item.idxs
            module = dep.target.module
            if isinstance(module, nn.Parameter):  # an unwrapped parameter: pruned along one dim
                loose_params += module.numel() // max(1, module.shape[0]) * len(idxs)
                continue
            if not isinstance(module, nn.Module):
                continue  # element-wise ops, concatenations: no parameters, no MACs of their own
            if self.dependency_graph.is_out_channel_pruning_fn(dep.handler):
                produced[module] = max(produced.get(module, 0.0), _share(module, len(idxs), out=True))
            elif self.dependency_graph.is_in_channel_pruning_fn(dep.handler):
                consumed[module] = max(consumed.get(module, 0.0), _share(module, len(idxs), out=False))
            if module not in self.names:
                continue
            module_name = self.names[module]
            if self.dependency_graph.is_out_channel_pruning_fn(dep.handler):
                out_modules.append(module_name)
                channel_map[module_name] = (list(idxs), list(item.root_idxs))
                if isinstance(module, nn.GroupNorm):
                    step = math.lcm(step, module.num_groups)
            elif isinstance(module, CONV_TYPES):
                in_convs.append((module_name, len(idxs)))
        response = self._first_norm_after(root) or name
        mask_modules = [(n, *channel_map[n]) for n in self._mask_modules(out_modules)]
        segments = {tuple(sorted(root_idxs)) for idxs, root_idxs in channel_map.values()
                    if len(set(root_idxs)) < root.out_channels}
        group = PrunableGroup(
            index=-1, name=name, channels=root.out_channels, out_modules=out_modules,
            in_convs=in_convs, response_module=response, mask_modules=mask_modules,
            segments=[list(seg) for seg in sorted(segments)], channel_step=step,
        )
        self._count_cost(group, produced, consumed, loose_params, trace)
        return group

    def _count_cost(self, group: PrunableGroup, produced: dict[nn.Module, float], consumed: dict[nn.Module, float],
                    loose_params: int, trace: ModelTrace) -> None:
        """The parameters and MACs that depend on the group's channels (see `PrunableGroup`)."""
        for module in produced:
            consumed.pop(module, None)  # a depthwise conv's inputs are its outputs: count once
        macs_of = {module: trace.layer_macs.get(name, 0) or 0 for module, name in self.names.items()}
        order = trace.order
        params = loose_params
        params += sum(round(sum(p.numel() for p in m.parameters(recurse=False)) * s) for m, s in produced.items())
        params += sum(round(_weight_numel(m) * s) for m, s in consumed.items())
        own_macs = sum(macs_of.get(m, 0) * s for m, s in produced.items())
        coupled_macs = own_macs + sum(macs_of.get(m, 0) * s for m, s in consumed.items())
        total_macs = max(float(trace.total_macs), 1.0)
        convs = sorted((m for m in produced if isinstance(m, CONV_TYPES)), key=lambda m: order.get(self.names[m], 0))
        consumers = sorted((m for m in consumed if isinstance(m, CONV_TYPES)),
                           key=lambda m: order.get(self.names[m], 0))
        group.params = int(params)
        group.macs = int(round(own_macs))
        group.macs_share = float(own_macs / total_macs)
        group.macs_coupled_share = float(coupled_macs / total_macs)
        group.layers = tuple(self.names[m] for m in convs)
        group.consumers = tuple(self.names[m] for m in consumers)

    def _first_norm_after(self, conv: nn.Module) -> str | None:
        node = self.dependency_graph.module2node[conv]
        for out in node.outputs:
            if isinstance(out.module, (nn.BatchNorm2d, nn.GroupNorm)) and out.module in self.names:
                return self.names[out.module]
        return None

    def _mask_modules(self, out_modules: Sequence[str]) -> list[str]:
        """Zeroing a channel after its normalisation is what removing it does downstream; a
        conv whose output goes straight on (no norm) is masked at its own output."""
        masked = []
        for name in out_modules:
            module = self.modules[name]
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                masked.append(name)
            elif isinstance(module, CONV_TYPES) and self._first_norm_after(module) is None:
                masked.append(name)
        return masked

    # ------------------------------------------------------------ pruning
    def tp_group(self, group: PrunableGroup, idxs: Sequence[int]):
        root = self.modules[group.name]
        pruner = self.dependency_graph.get_pruner_of_module(root)
        return self.dependency_graph.get_pruning_group(root, pruner.prune_out_channels, list(idxs))

    def prune(self, removals: Mapping[str, Sequence[int]]) -> list:
        """Remove the given channel indices of each named group, for real. Returns the
        Torch-Pruning history entries of this call (to append to a checkpoint's history).
        The graph is stale afterwards: build a new one to prune again."""
        start = len(self.dependency_graph.pruning_history())
        for name, idxs in removals.items():
            group = self.by_name[name]
            idxs = sorted(set(int(i) for i in idxs))
            if not idxs:
                continue
            if len(idxs) >= group.channels:
                raise PruningError(f"cannot remove all {group.channels} channels of {name}")
            self.tp_group(group, idxs).prune()
        return [list(entry) for entry in self.dependency_graph.pruning_history()[start:]]


def prunable_groups(model: nn.Module, input_size: Sequence[int] = (64, 64), in_channels: int | None = None,
                    graph: tp.DependencyGraph | None = None) -> list[PrunableGroup]:
    """The prunable-group map of ``model`` at ``input_size`` (height, width), in network order.

    ``graph`` reuses a dependency graph already built for this model (see `PruningGraph`)."""
    channels = model_in_channels(model) if in_channels is None else int(in_channels)
    example = example_input(input_size, channels, device=model_device(model))
    return PruningGraph(model, example, dependency_graph=graph).groups


def groups_frame(groups: Sequence[PrunableGroup]) -> pd.DataFrame:
    """One row per group, `GROUP_COLUMNS` (layer lists joined into text so the frame displays
    and exports)."""
    rows = []
    for group in groups:
        row = {name: getattr(group, name) for name in GROUP_COLUMNS}
        row["layers"] = ", ".join(group.layers)
        row["consumers"] = ", ".join(group.consumers)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(GROUP_COLUMNS))


def select_removal(group: PrunableGroup, scores: Sequence[float], count: int) -> list[int]:
    """The ``count`` lowest-scoring channels, except that every segment of the group (a
    concatenated part owned by one module) keeps at least one channel."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    left = [len(seg) for seg in group.segments]
    member = {}
    for si, seg in enumerate(group.segments):
        for c in seg:
            member.setdefault(c, []).append(si)
    removed = []
    for c in order:
        if len(removed) >= count:
            break
        if any(left[si] <= 1 for si in member.get(c, [])):
            continue
        for si in member.get(c, []):
            left[si] -= 1
        removed.append(c)
    return sorted(removed)


def kept_count(channels: int, keep_ratio: float, step: int = 1, min_channels: int = 1,
               max_prune_ratio: float = 0.9) -> int:
    """Channels kept for a keep ratio: at least ``min_channels`` and (1 - max_prune_ratio) of
    the channels, a multiple of ``step``, never more than the group has."""
    floor = max(min_channels, math.ceil(channels * (1.0 - max_prune_ratio)))
    n = max(floor, round(channels * keep_ratio))
    n = max(step, int(round(n / step)) * step)
    return min(n, channels)


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
