"""Model zoo over segmentation-models-pytorch. Encoders are always built with
``encoder_weights=None``: nothing is downloaded from a hub, ever."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import segmentation_models_pytorch as smp
import torch.nn as nn

from core.errors import DefectPruneError

if TYPE_CHECKING:
    from core.data.dataset import Normalisation

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
    # the format options it was trained with (a synthetic family's num_images, image_size): the
    # dataset later commands run it on, unless they name another (absent in older checkpoints)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    split_seed: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    # the normalisation the model was trained with, one value per input channel, on pixels
    # scaled to 0..1 (an imported model's); None: core.data.dataset's PIXEL_MEAN / PIXEL_STD,
    # what every model trained here takes (and every checkpoint written before the field)
    mean: list[float] | None = None
    std: list[float] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def normalisation(self) -> Normalisation | None:
        """What its images are normalised with: hand it to `SegmentationDataset` / `normalise`
        (None: the default, bit for bit as before the field existed)."""
        if self.mean is None and self.std is None:
            return None
        from core.data.dataset import Normalisation

        return Normalisation.of(self.mean or [], self.std or [], self.in_channels)

    @property
    def pixel_normalisation(self) -> Normalisation:
        """The normalisation spelled out per channel, the default one included (for ONNX
        metadata and reports)."""
        from core.data.dataset import Normalisation

        return self.normalisation or Normalisation.default(self.in_channels)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        for key in ("mean", "std"):  # absent, not null: a spec without them reads as before
            if data[key] is None:
                del data[key]
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
