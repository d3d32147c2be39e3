"""Where and how reproducibly a job runs: the device, torch's CPU threads and the seeds."""

from __future__ import annotations

import random

import numpy as np
import torch

from core.errors import DefectPruneError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DeviceUnavailableError(DefectPruneError):
    """CUDA was asked for on a machine without a usable CUDA device."""


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without CUDA is an error, not a fallback,
    so a user who asked for the GPU is never silently measured on the CPU."""
    if isinstance(name, torch.device):
        return name
    key = str(name).strip().lower()
    if key == "auto":
        key = "cuda" if torch.cuda.is_available() else "cpu"
    if key == "cpu":
        return torch.device("cpu")
    if key.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "--device cuda was asked for but no CUDA device is available on this machine; "
                "use --device cpu (or auto)"
            )
        if key == "cuda" and torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.device("cuda", torch.cuda.current_device())  # a torchrun rank: its own GPU
        return torch.device(key)
    raise DeviceUnavailableError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")


class TorchThreads:
    """Set torch's CPU thread count for a block and put the previous value back."""

    def __init__(self, count: int | None):
        self.count = count
        self.previous = torch.get_num_threads()

    def __enter__(self) -> "TorchThreads":
        if self.count:
            torch.set_num_threads(self.count)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.count:
            torch.set_num_threads(self.previous)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """A DataLoader worker's numpy and random seeds, from the seed torch gave that worker."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
