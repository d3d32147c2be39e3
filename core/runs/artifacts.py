"""Job outputs written atomically (through `core.atomic`): a job killed or a disk filling up
mid-write leaves the previous file (or none), never half of one, so the store never points
at a partial artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import json_default, write_atomic


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda handle: handle.write(data))


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    """JSON with numpy/torch scalars and paths turned into plain values."""
    return atomic_write_bytes(path, json.dumps(payload, indent=2, default=json_default).encode("utf-8"))


def atomic_write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Arrays in one ``.npz`` (read back with ``np.load(path, allow_pickle=False)``)."""
    return write_atomic(path, lambda handle: np.savez_compressed(handle, **arrays))
