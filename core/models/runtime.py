"""Small facts and modes of a model at run time, shared by every layer: where it lives, a
dummy input for tracing, and eval mode that gives every module its own flag back.

The one place for these: `next(model.parameters()).device`, hand-written zero inputs and
``was_training = model.training ... model.train(was_training)`` are not written elsewhere.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a model without parameters)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def example_input(input_size: Sequence[int], in_channels: int, batch: int = 1,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """A seeded dummy batch (the values do not matter for tracing, only reproducibility)."""
    generator = torch.Generator().manual_seed(0)
    height, width = int(input_size[0]), int(input_size[1])
    return torch.randn(batch, in_channels, height, width, generator=generator).to(device)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for a forward pass (BatchNorm running statistics must not move), then every
    module's own training flag back, also when the body raises (a frozen BatchNorm inside a
    training model stays frozen)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training
