"""Predicted masks of a model on a dataset split, cached on disk for the mask-QA views.

Predicting a split takes a while on a CPU, and a page redraws often, so the masks are kept
under ``<workspace>/predictions/<key>.npz``. The key is the checkpoint's identity (a hash of
every file in its folder: weights, spec, pruning history) plus the dataset's identity
(format, root, split, image list, input size, channels), so a retrained or re-pruned model,
or another split or size, never reads stale masks. Files are compressed uint8 arrays written
atomically (temporary file, then rename) and read with ``allow_pickle=False``; a damaged
cache file is simply recomputed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from core.atomic import write_atomic
from core.config import workspace_dir
from core.errors import DefectPruneError
from core.models.runtime import eval_mode
from core.train import (
    EmptySplitError, Progress, ProgressCallback, base_dataset, report_progress, dataset_image_paths,
    resolve_device,
)

CACHE_VERSION = 1


class CheckpointFolderError(DefectPruneError):
    pass


@dataclass
class PredictionSet:
    masks: np.ndarray  # (N, H, W) uint8 class ids, in the dataset's order
    image_paths: list[str]
    key: str
    path: Path | None
    from_cache: bool


# ---------------------------------------------------------------- prediction
@torch.no_grad()
def predict_split(
    model: nn.Module,
    dataset: Dataset,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Arg-max class map of every sample, (N, H, W) uint8. A callback returning True raises
    `StopRequested`. Every module's train/eval mode is restored afterwards."""
    if len(dataset) == 0:
        raise EmptySplitError("the split to predict has no images; pick another split or dataset")
    device = resolve_device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model.to(device)
    parts: list[np.ndarray] = []
    with eval_mode(model):
        for step, (images, _masks) in enumerate(loader, 1):
            logits = model(images.to(device))
            if logits.shape[1] > 256:
                raise ValueError("more than 256 classes do not fit uint8 masks")
            parts.append(logits.argmax(dim=1).to(torch.uint8).cpu().numpy())
            report_progress(progress, Progress(
                phase="predict", epoch=0, epochs=0, step=step, steps=len(loader), loss=None,
                metric=None, eta_seconds=None, fraction=step / len(loader),
            ))
    return np.concatenate(parts)


# ---------------------------------------------------------------- identities
@functools.lru_cache(maxsize=64)
def _hash_files(folder: str, signature: tuple[tuple[str, int, int], ...]) -> str:
    # ``signature`` (name, size, mtime) is part of the memo key, so a rewritten file is rehashed
    digest = hashlib.sha256()
    for name, _size, _mtime in signature:
        digest.update(name.encode("utf-8") + b"\0")
        with open(Path(folder) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def checkpoint_identity(checkpoint_dir: str | Path) -> str:
    """SHA-256 over every file of the checkpoint folder (relative names and contents)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise CheckpointFolderError(f"checkpoint folder {folder} does not exist; train or load a model first")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    if not files:
        raise CheckpointFolderError(f"checkpoint folder {folder} is empty; train or load a model first")
    signature = tuple((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _hash_files(str(folder.resolve()), signature)


def dataset_identity(dataset: Dataset) -> dict[str, Any]:
    """What makes two datasets give the same inputs: format, root, split, images, size, channels."""
    base, _ = base_dataset(dataset)
    index = getattr(base, "index", None)
    samples = getattr(base, "samples", None)
    paths = dataset_image_paths(dataset) or []
    splits = sorted(set(samples["split"])) if samples is not None and "split" in samples else []
    return {
        "format": getattr(index, "format", type(base).__name__),
        "root": str(Path(getattr(index, "root", "")).resolve()) if index is not None else "",
        "split": ",".join(splits),
        "size": list(getattr(base, "size", ())),
        "in_channels": getattr(base, "in_channels", None),
        "count": len(dataset),
        "images": hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest(),
        # only when the model has its own (an import): the keys of every cache so far stay
        **({"normalisation": base.normalisation.to_json()} if getattr(base, "normalisation", None) else {}),
    }


def prediction_key(checkpoint_id: str, dataset: Dataset) -> str:
    payload = json.dumps({"v": CACHE_VERSION, "checkpoint": checkpoint_id,
                          "dataset": dataset_identity(dataset)}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def predictions_dir(workspace: str | Path | None = None) -> Path:
    folder = (Path(workspace) if workspace is not None else workspace_dir()) / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ---------------------------------------------------------------- storage
def save_predictions(path: Path, masks: np.ndarray, image_paths: Sequence[str], meta: dict[str, Any]) -> Path:
    """Write atomically: a reader sees the old file or the whole new one, never half of it."""
    def write(handle) -> None:
        np.savez_compressed(
            handle,
            masks=np.ascontiguousarray(masks, dtype=np.uint8),
            images=np.array(list(image_paths), dtype=np.str_),
            meta=np.array(json.dumps(meta)),
        )

    write_atomic(path, write)
    return path


def load_predictions(path: Path) -> tuple[np.ndarray, list[str], dict[str, Any]] | None:
    """The cached arrays, or None when the file is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            masks = data["masks"]
            images = [str(p) for p in data["images"]]
            meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
        return None
    if masks.dtype != np.uint8 or masks.ndim != 3 or len(images) != masks.shape[0]:
        return None
    return masks, images, meta


def cached_predictions(
    checkpoint_dir: str | Path,
    dataset: Dataset,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: ProgressCallback | None = None,
    model: nn.Module | None = None,
    workspace: str | Path | None = None,
) -> PredictionSet:
    """Masks of the checkpoint's model on ``dataset``, from the cache when they are there.
    ``model`` saves loading the checkpoint again when the caller already holds it (it must
    be the checkpoint's model: the cache key comes from the folder)."""
    key = prediction_key(checkpoint_identity(checkpoint_dir), dataset)
    path = predictions_dir(workspace) / f"{key}.npz"
    cached = load_predictions(path)
    if cached is not None and cached[0].shape[0] == len(dataset):
        masks, images, _meta = cached
        return PredictionSet(masks=masks, image_paths=images, key=key, path=path, from_cache=True)
    if model is None:
        from core.models.checkpoint import load_checkpoint

        model = load_checkpoint(checkpoint_dir, device=str(resolve_device(device))).model
    masks = predict_split(model, dataset, device, batch_size, progress)
    images = dataset_image_paths(dataset) or [""] * len(dataset)
    meta = {"checkpoint": str(Path(checkpoint_dir).resolve()), "dataset": dataset_identity(dataset)}
    save_predictions(path, masks, images, meta)
    return PredictionSet(masks=masks, image_paths=images, key=key, path=path, from_cache=False)
