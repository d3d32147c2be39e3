"""Torch-Pruning's dependency graph, seen as the list of prunable groups the method works on.

A `PruningGraph` builds Torch-Pruning's `DependencyGraph` once for a model and describes every
prunable group (never the classifier conv): the module names whose output channels it owns,
the convs whose input channels it feeds (with how many channels), where its channel
responses are read (the first BatchNorm after the root conv, else the conv), and the channel
step its kept count must respect (GroupNorm's groups). The graph is rebuilt after each
pruning, since channel counts change; building takes milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from core.errors import DefectPruneError
from core.models.groups import ROOT_MODULE_TYPES, classifier_layers, graph_and_trace, role_of, torch_groups


class PruningError(DefectPruneError):
    pass


# Convolutions of every kind (Conv2d, ConvTranspose2d in Linknet's decoder) own channels.
CONV_TYPES = ROOT_MODULE_TYPES


@dataclass
class PrunableGroup:
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

    @property
    def role(self) -> str:
        return role_of(self.name)


class PruningGraph:
    """The groups of a model as the pruning method sees them. Tracing, network order, scales
    and the classifier exclusion are the group map's (`core.models.groups`), so the dashboard's
    layer charts and the pruning code agree on every group."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor):
        self.model = model
        self.example_inputs = example_inputs
        self.names = {module: name for name, module in model.named_modules()}
        self.modules = dict(model.named_modules())
        self.ignored = classifier_layers(model)
        if not self.ignored:
            raise PruningError(f"{type(model).__name__} has no segmentation_head conv to protect")
        self.dependency_graph, trace = graph_and_trace(model, example_inputs.shape[-2:], example_inputs.shape[1])
        self.groups: list[PrunableGroup] = []
        head = {self.names[m] for m in self.ignored}
        for index, tp_group in enumerate(torch_groups(model, self.dependency_graph, self.ignored, trace.order)):
            group = self._describe(tp_group)
            group.index = index
            group.scale = int(trace.scales.get(group.name, 1))
            group.feeds_classifier = any(conv in head for conv, _ in group.in_convs)
            self.groups.append(group)
        self.by_name = {g.name: g for g in self.groups}

    # ------------------------------------------------------------ description
    def _describe(self, tp_group) -> PrunableGroup:
        root = tp_group[0].dep.target.module
        name = self.names[root]
        out_modules, in_convs, step = [], [], 1
        channel_map: dict[str, tuple[list[int], list[int]]] = {}
        for item in tp_group:
            dep, idxs = item.dep, item.idxs
            module = dep.target.module
            if not isinstance(module, nn.Module) or module not in self.names:
                continue  # tracing ops (concat, add) carry no parameters
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
        return PrunableGroup(
            index=-1, name=name, channels=root.out_channels, out_modules=out_modules,
            in_convs=in_convs, response_module=response, mask_modules=mask_modules,
            segments=[list(seg) for seg in sorted(segments)], channel_step=step,
        )

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
