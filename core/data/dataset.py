"""A torch Dataset over a `DatasetIndex` split: normalised float image, long class-id mask."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from core.data.base import DatasetIndex
from core.errors import DefectPruneError

# The normalisation of every model trained here, so that a checkpoint needs no dataset
# statistics to run on new images: x' = (x / 255 - MEAN) / STD, the same for every channel.
# A checkpoint whose spec names its own (an imported model) takes that one instead.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25
# torchvision's and timm's ImageNet statistics (RGB): what an ImageNet-pretrained encoder saw
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NormalisationError(DefectPruneError):
    """A mean/std that cannot normalise the model's images (wrong length, zero std, not finite)."""


@dataclass(frozen=True)
class Normalisation:
    """Per-channel mean and std on pixels scaled to 0..1: x' = (x / 255 - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, mean: Sequence[float], std: Sequence[float], in_channels: int) -> Normalisation:
        """Checked for ``in_channels`` channels; one value stands for every channel."""
        values = {}
        for name, given in (("mean", mean), ("std", std)):
            items = [float(v) for v in given]
            if len(items) == 1:
                items = items * in_channels
            if len(items) != in_channels:
                raise NormalisationError(f"the {name} has {len(items)} values for a {in_channels}-channel model; "
                                         f"give one value or one per channel")
            if not all(math.isfinite(v) for v in items):
                raise NormalisationError(f"the {name} {items} holds a value that is not a finite number")
            values[name] = tuple(items)
        if not all(v > 0 for v in values["std"]):
            raise NormalisationError(f"the std {list(values['std'])} must be positive in every channel")
        return cls(values["mean"], values["std"])

    @classmethod
    def default(cls, in_channels: int) -> Normalisation:
        """What every model trained here takes (`PIXEL_MEAN`, `PIXEL_STD`)."""
        return cls((PIXEL_MEAN,) * in_channels, (PIXEL_STD,) * in_channels)

    @classmethod
    def imagenet(cls) -> Normalisation:
        """ImageNet's RGB statistics (`IMAGENET_MEAN`, `IMAGENET_STD`)."""
        return cls(IMAGENET_MEAN, IMAGENET_STD)

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


def normalise(image: np.ndarray, in_channels: int, normalisation: Normalisation | None = None) -> torch.Tensor:
    """uint8 HxW or HxWx3 -> float tensor CxHxW with `in_channels` channels, normalised with
    ``normalisation`` (None: `PIXEL_MEAN`, `PIXEL_STD`, what a checkpoint without its own takes)."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 3 and in_channels == 1:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
    if image.shape[2] == 1 and in_channels == 3:
        image = np.repeat(image, 3, axis=2)
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    if normalisation is None:
        return (x / 255.0 - PIXEL_MEAN) / PIXEL_STD
    if len(normalisation.mean) != x.shape[0]:
        raise NormalisationError(f"a normalisation for {len(normalisation.mean)} channel(s) cannot normalise a "
                                 f"{x.shape[0]}-channel image")
    mean = torch.tensor(normalisation.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(normalisation.std, dtype=torch.float32).view(-1, 1, 1)
    return (x / 255.0 - mean) / std


def resize_pair(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize to (height, width): area/linear for the image, nearest neighbour for the mask."""
    h, w = size
    if image.shape[:2] != (h, w):
        shrink = image.shape[0] > h and image.shape[1] > w
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if mask.shape[:2] != (h, w):
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return image, mask


def augment_pair(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flips, a small shift (up to 6% of a side, reflected border) and brightness (+-12%)."""
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    h, w = mask.shape
    dx, dy = (rng.uniform(-0.06, 0.06, 2) * (w, h)).round()
    if dx or dy:
        shift = np.float32([[1, 0, dx], [0, 1, dy]])
        image = cv2.warpAffine(np.ascontiguousarray(image), shift, (w, h), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT_101)
        mask = cv2.warpAffine(np.ascontiguousarray(mask), shift, (w, h), flags=cv2.INTER_NEAREST,
                              borderMode=cv2.BORDER_REFLECT_101)
    gain = rng.uniform(0.88, 1.12)
    image = np.clip(image.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


class SegmentationDataset(Dataset):
    """Samples of one split, normalised as the model takes them (``normalisation``: its spec's).
    With ``augment`` the augmentation of sample i in epoch e is drawn
    from a generator seeded with (seed, e, i): reproducible, yet different every epoch."""

    def __init__(
        self,
        index: DatasetIndex,
        split: str,
        size: tuple[int, int] | None = None,
        in_channels: int = 3,
        augment: bool = False,
        seed: int = 0,
        limit: int | None = None,
        normalisation: Normalisation | None = None,
    ):
        self.index = index
        self.samples = index.split(split)
        if limit is not None and limit < len(self.samples):
            # a seeded sample from across the split, not its first rows: a split sorted by file
            # name can hold one class first (NEU-Seg's first 320 training images have no scratches)
            rows = np.sort(np.random.default_rng(index.seed).choice(len(self.samples), size=limit, replace=False))
            self.samples = self.samples.iloc[rows].reset_index(drop=True)
        self.size = tuple(size or index.default_size)
        self.in_channels = in_channels
        self.normalisation = normalisation  # the model's (ModelSpec.normalisation); None: PIXEL_MEAN, PIXEL_STD
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image (uint8, native channels) and mask (class ids) at the model's input size."""
        row = self.samples.iloc[i]
        return resize_pair(self.index.image_of(row), self.index.mask_of(row), self.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.raw(i)
        if self.augment:
            image, mask = augment_pair(image, mask, np.random.default_rng((self.seed, self.epoch, i)))
        return normalise(image, self.in_channels, self.normalisation), torch.from_numpy(mask.astype(np.int64))
