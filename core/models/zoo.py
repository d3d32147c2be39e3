"""Model zoo over segmentation-models-pytorch. Encoders are always built with
``encoder_weights=None``: nothing is downloaded from a hub, ever."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import segmentation_models_pytorch as smp
import torch.nn as nn

from core.errors import DefectPruneError

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "unet": smp.Unet,
    "unetplusplus": smp.UnetPlusPlus,
    "fpn": smp.FPN,
    "deeplabv3plus": smp.DeepLabV3Plus,
    "linknet": smp.Linknet,
}
ENCODERS = ["resnet18", "resnet34", "mobilenet_v2", "efficientnet-b0"]
DEFAULT_ARCH = "unet"
DEFAULT_ENCODER = "resnet18"


class UnknownArchitectureError(DefectPruneError):
    pass


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model (before any pruning is replayed on it)."""

    classes: list[str]  # background first
    arch: str = DEFAULT_ARCH
    encoder: str = DEFAULT_ENCODER
    in_channels: int = 3
    input_size: tuple[int, int] = (128, 128)  # height, width
    dataset_format: str = ""
    dataset_root: str = ""
    split_seed: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["input_size"] = tuple(known.get("input_size", (128, 128)))
        return cls(**known)


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model for the spec (random weights, no hub)."""
    if spec.arch not in ARCHITECTURES:
        raise UnknownArchitectureError(
            f"unknown architecture {spec.arch!r}; choose one of {', '.join(ARCHITECTURES)}"
        )
    if spec.encoder not in ENCODERS:
        raise UnknownArchitectureError(
            f"unknown encoder {spec.encoder!r}; choose one of {', '.join(ENCODERS)}"
        )
    if spec.in_channels not in (1, 3):
        raise UnknownArchitectureError(f"in_channels must be 1 or 3, not {spec.in_channels}")
    return ARCHITECTURES[spec.arch](
        encoder_name=spec.encoder, encoder_weights=None,
        in_channels=spec.in_channels, classes=spec.num_classes,
    )
