"""Numeric precision and memory format of training-time forward passes.

Training, fine-tuning, the scoring network and the sensitivity measurement can run their
forward passes under bf16 autocast with the model in channels_last: on a CPU with AVX512-BF16
(or AMX) a conv net's training step is 2.1 to 2.5 times faster than in fp32
(bench/results/training_speed.md), and on CUDA with bf16 support faster still. Parameters,
gradients, optimiser state, BatchNorm statistics, the loss and the metrics stay fp32 (autocast
only lowers the matmul/conv inputs), and everything a user deploys or measures (evaluation,
latency, ONNX export, saved weights) is fp32 in the standard memory format.

``auto`` picks bf16 where the device runs it fast and fp32 elsewhere; what was picked is
recorded with the checkpoint and the run (``resolve_precision`` gives the concrete name).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
import torch.nn as nn

from core.errors import DefectPruneError

PRECISIONS = ("auto", "fp32", "bf16")


class InvalidPrecisionError(DefectPruneError):
    pass


@functools.lru_cache(maxsize=1)
def cpu_runs_bf16_fast() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16), read from
    /proc/cpuinfo's flags. Without them bf16 autocast on a CPU is emulated and slower than fp32."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` where ``device`` runs it fast, else ``fp32``; ``fp32``/``bf16``
    as asked (bf16 on a device without it is refused: a user who asked for it would otherwise
    be measured on something else)."""
    key = str(precision).strip().lower()
    if key not in PRECISIONS:
        raise InvalidPrecisionError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    device = torch.device(device)
    if device.type == "cuda":
        fast = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        fast = cpu_runs_bf16_fast()
    if key == "auto":
        return "bf16" if fast else "fp32"
    if key == "bf16" and device.type == "cuda" and not fast:
        raise InvalidPrecisionError("bf16 was asked for but this CUDA device has no bf16 support; use fp32 or auto")
    return key


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The forward-pass context for a resolved precision: bf16 autocast, or nothing."""
    device = torch.device(device)
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Put a conv model's 4-d parameters in channels_last (in place); the fast layout for
    bf16 and fp32 convolutions on CPUs and tensor cores."""
    return model.to(memory_format=torch.channels_last)


def to_standard_format(model: nn.Module) -> nn.Module:
    """Back to the standard (contiguous) layout: what is saved (safetensors wants contiguous
    tensors), pruned, exported and timed."""
    return model.to(memory_format=torch.contiguous_format)
