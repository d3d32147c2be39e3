"""Model zoo and prunable-group map: every architecture and encoder builds and runs at 64 px,
and the group map (Torch-Pruning's groups) carries scales, roles, channels, params and MACs."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

from core.models.graph import GROUP_COLUMNS, groups_frame, prunable_groups
from core.models.groups import classifier_layers, dependency_graph, torch_groups, trace_model
from core.models.zoo import ARCHITECTURES, ENCODERS, ModelSpec, UnknownArchitectureError, build_model
from core.profile import count_macs

SIZE = (64, 64)
SCALES = {1, 2, 4, 8, 16, 32}
COMBOS = [(arch, "resnet18") for arch in ARCHITECTURES] + [("unet", e) for e in ENCODERS if e != "resnet18"]


def spec_for(arch: str, encoder: str, in_channels: int = 3, classes: int = 3) -> ModelSpec:
    names = ["background"] + [f"defect{i}" for i in range(1, classes)]
    return ModelSpec(classes=names, arch=arch, encoder=encoder, in_channels=in_channels, input_size=SIZE)


@pytest.mark.parametrize("arch,encoder", COMBOS)
def test_every_architecture_and_encoder_builds_runs_and_maps(arch: str, encoder: str) -> None:
    in_channels = 1 if (len(arch) + len(encoder)) % 2 else 3  # both channel counts get exercised
    torch.manual_seed(0)
    model = build_model(spec_for(arch, encoder, in_channels))
    with torch.no_grad():
        out = model.eval()(torch.randn(2, in_channels, *SIZE))
    assert out.shape == (2, 3, *SIZE)
    assert torch.isfinite(out).all()

    groups = prunable_groups(model, SIZE, in_channels)
    assert len(groups) >= 10
    assert [g.index for g in groups] == list(range(len(groups)))
    names = [g.name for g in groups]
    assert len(set(names)) == len(names)
    assert {g.scale for g in groups} <= SCALES
    assert {"encoder", "decoder"} <= {g.role for g in groups}
    for g in groups:
        assert g.role == ("encoder" if g.name.startswith("encoder.") else
                          "decoder" if g.name.startswith("decoder.") else "head")
        assert g.channels > 0 and g.params > 0
        assert 0.0 <= g.macs_share <= g.macs_coupled_share <= 1.0
        assert g.name in g.layers  # the root conv produces the group's channels
    # The classifier is in no group, neither as a root nor as a producer.
    head = model.segmentation_head[0]
    head_name = "segmentation_head.0"
    assert classifier_layers(model)[0] is head
    assert all(head_name not in g.layers for g in groups)
    # The deepest encoder stage is coarser than the stem.
    encoder_scales = [g.scale for g in groups if g.role == "encoder"]
    assert min(encoder_scales) <= 4 and max(encoder_scales) >= 16
    # Each producing layer is counted in one group only, so the MACs shares sum to at most 1,
    # and with everything but the classifier and parameter-free ops covered, close to it.
    total = sum(g.macs_share for g in groups)
    assert 0.9 < total <= 1.0 + 1e-9


def test_group_map_of_unet_resnet18_in_detail() -> None:
    torch.manual_seed(0)
    model = build_model(spec_for("unet", "resnet18", 3, classes=2))
    groups = prunable_groups(model, SIZE, 3)
    by_name = {g.name: g for g in groups}
    # Network order: the stem first, the last decoder block last.
    assert groups[0].name == "encoder.conv1"
    assert groups[-1].name == "decoder.blocks.4.conv2.0"
    encoder_positions = [g.index for g in groups if g.role == "encoder"]
    assert max(encoder_positions) < min(g.index for g in groups if g.role == "decoder")
    # Scales measured from the feature maps: stem /2, layerN /2^(N+1), decoder climbs back to 1.
    assert by_name["encoder.conv1"].scale == 2
    assert by_name["encoder.layer1.0.conv1"].scale == 4
    assert by_name["encoder.layer3.1.conv1"].scale == 16
    assert by_name["encoder.layer4.1.conv1"].scale == 32
    assert by_name["decoder.blocks.0.conv1.0"].scale == 16
    assert by_name["decoder.blocks.4.conv2.0"].scale == 1
    # A plain conv group: the conv, its BN, the next conv's inputs.
    g = by_name["encoder.layer1.0.conv1"]
    conv1, bn1, conv2 = model.encoder.layer1[0].conv1, model.encoder.layer1[0].bn1, model.encoder.layer1[0].conv2
    assert g.channels == 64
    assert g.params == conv1.weight.numel() + bn1.weight.numel() + bn1.bias.numel() + conv2.weight.numel()
    assert g.layers == ("encoder.layer1.0.conv1",) and g.consumers == ("encoder.layer1.0.conv2",)
    conv1_macs = 64 * 64 * 9 * 16 * 16  # out x in x kernel x (64 px / 4)^2 positions
    assert g.macs > conv1_macs  # plus its BatchNorm
    # Residual coupling: layer2's conv2s and the downsample share one group.
    residual = [g for g in groups if "encoder.layer2.0.downsample.0" in g.layers][0]
    assert {"encoder.layer2.0.conv2", "encoder.layer2.1.conv2"} <= set(residual.layers)
    # The last decoder conv feeds the classifier: the classifier is a consumer, never a producer.
    assert by_name["decoder.blocks.4.conv2.0"].consumers == ("segmentation_head.0",)
    # Shares are against the same total the profiler reports.
    trace = trace_model(model, SIZE, 3)
    assert trace.total_macs == count_macs(model, SIZE, 3)
    assert g.macs_share == pytest.approx(g.macs / trace.total_macs)


def test_groups_match_torch_pruning_and_frame() -> None:
    torch.manual_seed(0)
    model = build_model(spec_for("fpn", "resnet18"))
    graph = dependency_graph(model, SIZE, 3)
    raw = torch_groups(model, graph)
    infos = prunable_groups(model, SIZE, 3, graph=graph)
    assert [graph._module2name[g[0].dep.target.module] for g in raw] == [g.name for g in infos]
    frame = groups_frame(infos)
    assert list(frame.columns) == list(GROUP_COLUMNS)
    assert len(frame) == len(infos)
    assert frame["channels"].tolist() == [g.channels for g in infos]
    assert isinstance(frame.loc[0, "layers"], str)


def test_group_map_leaves_model_untouched_and_is_cheap() -> None:
    torch.manual_seed(0)
    model = build_model(spec_for("unet", "resnet18", 3, classes=2))
    model.train()
    model.encoder.bn1.eval()  # a frozen BatchNorm inside a training model stays frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prunable_groups(model, (128, 128), 3)  # warm-up (first forward allocates)
    start = time.perf_counter()
    groups = prunable_groups(model, (128, 128), 3)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"group map took {elapsed:.2f} s"
    assert len(groups) == 22
    assert model.training and not model.encoder.bn1.training and model.decoder.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats did not move


def test_global_context_convs_get_the_stride_they_pool_from() -> None:
    torch.manual_seed(0)
    model = build_model(spec_for("deeplabv3plus", "resnet18"))
    groups = {g.name: g for g in prunable_groups(model, SIZE, 3)}
    pooling = [name for name in groups if name.startswith("decoder.aspp.0.convs.4")]
    assert pooling and all(groups[name].scale == 16 for name in pooling)


def test_unknown_architecture_is_a_named_error() -> None:
    with pytest.raises(UnknownArchitectureError, match="unknown architecture"):
        build_model(spec_for("segformer", "resnet18"))
    with pytest.raises(UnknownArchitectureError, match="unknown encoder"):
        build_model(spec_for("unet", "vgg11"))


def test_classifier_layers_are_the_head_convs() -> None:
    model = build_model(spec_for("linknet", "resnet18"))
    layers = classifier_layers(model)
    assert len(layers) == 1 and isinstance(layers[0], nn.Conv2d)
    assert layers[0].out_channels == 3
