"""Where things live: the workspace and the data roots, both set by environment variables.

- ``DEFECTPRUNE_WORKSPACE``: folder for caches, checkpoints, the run store (default ``./workspace``).
- ``DEFECTPRUNE_DATA_ROOTS``: folders (separated by ``os.pathsep``) that paths typed into the
  dashboard must stay inside (default: ``./data`` and the workspace's ``datasets`` folder).
- Resource caps, each refused with a named error above it: ``DEFECTPRUNE_MAX_WORKERS``
  (data-loader worker processes, default the CPU count), ``DEFECTPRUNE_MAX_IMAGE_PIXELS``
  (pixels of one image, read from its header before decoding, default 50 megapixels) and
  ``DEFECTPRUNE_MAX_INPUT_SIZE`` (model input pixels per side, default 4096).
"""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import DefectPruneError


class PathOutsideDataRootsError(DefectPruneError):
    """A path typed by a user points outside every configured data root."""


class ConfigurationError(DefectPruneError):
    """An environment variable of DefectPrune holds something unusable."""


def _cap(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigurationError(f"{name}={raw!r} must be a whole number of at least 1")
    return value


def max_workers() -> int:
    """The most data-loader worker processes a command may start (each is a whole process)."""
    return _cap("DEFECTPRUNE_MAX_WORKERS", os.cpu_count() or 1)


def max_image_pixels() -> int:
    """The most pixels one image may have (a 400 KB PNG can decode to gigabytes)."""
    return _cap("DEFECTPRUNE_MAX_IMAGE_PIXELS", 50_000_000)


def max_input_size() -> int:
    """The largest model input side in pixels."""
    return _cap("DEFECTPRUNE_MAX_INPUT_SIZE", 4096)


def workspace_dir() -> Path:
    path = Path(os.environ.get("DEFECTPRUNE_WORKSPACE", "workspace")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def synthetic_cache_dir() -> Path:
    """Where the built-in synthetic datasets are generated and cached."""
    return workspace_dir() / "synthetic"


def data_roots() -> list[Path]:
    raw = os.environ.get("DEFECTPRUNE_DATA_ROOTS")
    if raw:
        roots = [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]
    else:
        roots = [Path("data"), workspace_dir() / "datasets"]
    return [r.resolve() for r in roots]


def confine_to_data_roots(path: str | Path, roots: list[Path] | None = None) -> Path:
    """Resolve ``path`` (relative paths are taken against each root in turn) and refuse it
    unless it lies inside one of the data roots. Symbolic links are resolved first, so a link
    cannot lead outside."""
    roots = data_roots() if roots is None else [Path(r).resolve() for r in roots]
    candidate = Path(path).expanduser()
    candidates = [candidate] if candidate.is_absolute() else [root / candidate for root in roots]
    for cand in candidates:
        resolved = cand.resolve()
        for root in roots:
            if resolved == root or root in resolved.parents:
                return resolved
    listed = ", ".join(str(r) for r in roots) or "(none configured)"
    raise PathOutsideDataRootsError(
        f"{path} is outside the configured data roots ({listed}); move the data under one of "
        "them or add its folder to DEFECTPRUNE_DATA_ROOTS"
    )
