"""Checkpoints that can be shared without trust: a folder of JSON and safetensors, no pickle.

A checkpoint folder holds

- ``spec.json``: the `ModelSpec` (architecture, encoder, input channels, class names, input
  size, dataset format and split seed, metrics, and the normalisation of an imported model),
  enough to build the unpruned network and feed it;
- ``pruning_history.json``: Torch-Pruning's pruning history, a list of
  ``[module_name, is_out_channel_pruning, channel_indices]`` (empty for an unpruned model);
- ``weights.safetensors``: the state dict of the (pruned) model, with a SHA-256 of the tensor
  bytes in the file's metadata so flipped or truncated bytes are refused.

Loading builds the model from the spec, replays the history on a freshly traced dependency
graph (so the pruned shapes come from Torch-Pruning, not from the weights file), and only then
loads the weights strictly. Nothing is unpickled, so a checkpoint from elsewhere cannot run
code. Saving writes a temporary sibling folder, syncs it, and renames it into place: an
interrupted save never leaves a partial checkpoint, and an older checkpoint at the same path is
replaced only once the new one is complete (moved aside, then the new one renamed in; a kill
between the two renames leaves the old one aside, and the next load or save puts it back).
A save holds an exclusive lock on ``.NAME.lock`` beside the checkpoint from start to end, so
saves to one path take turns, and a load (or the dashboard) never mistakes a save that is
between its renames for a killed one. The lock file stays (removing a lock file races with the
next process opening it); it is hidden, empty, and never inside a checkpoint folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from core.atomic import fsync_dir, fsync_file, json_default
from core import safe_json
from core.config import max_input_size
from core.errors import DefectPruneError
from core.models.groups import classifier_layers, model_in_channels
from core.models.runtime import eval_mode, example_input
from core.models.zoo import ARCHITECTURES, ENCODERS, ModelSpec, build_model

SPEC_FILE = "spec.json"
HISTORY_FILE = "pruning_history.json"
WEIGHTS_FILE = "weights.safetensors"
CHECKPOINT_FILES = (SPEC_FILE, HISTORY_FILE, WEIGHTS_FILE)
# 2: the spec may name the model's own normalisation (``mean``, ``std``), which a DefectPrune
# reading only version 1 would ignore (it would feed the model wrongly normalised images), so
# only such a spec is written as version 2; every other one stays version 1, readable by both
FORMAT_VERSION = 2
CHECKSUM_KEY = "defectprune_sha256"
# The dependency graph is traced at this size when a history is replayed: the channel graph of
# these networks does not depend on the image size, and a small trace is fast.
REPLAY_SIZE = (64, 64)

History = list[list[Any]]


class CheckpointError(DefectPruneError):
    """A checkpoint cannot be written or read."""


class CheckpointMissingFileError(CheckpointError):
    """The checkpoint folder or one of its files is missing."""


class CheckpointSpecError(CheckpointError):
    """spec.json is malformed or describes a model this version cannot build."""


class CheckpointHistoryError(CheckpointError):
    """pruning_history.json is malformed or does not fit the model built from the spec."""


class CheckpointWeightsError(CheckpointError):
    """weights.safetensors does not match the model (missing keys, wrong shapes)."""


class CheckpointCorruptWeightsError(CheckpointWeightsError):
    """weights.safetensors is not a readable safetensors file or its bytes changed."""


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    spec: ModelSpec
    history: History
    path: Path


# ---------------------------------------------------------------- saving

def save_checkpoint(path: str | Path, model: nn.Module, spec: ModelSpec,
                    history: History | None = None) -> Path:
    """Write ``model`` (pruned by ``history``, Torch-Pruning's ``pruning_history()``) with its
    build ``spec`` as a checkpoint folder at ``path``; returns the folder."""
    path = Path(path)
    entries = normalise_history(history or [], source="the history to save")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder; choose another path")
    if path.is_dir() and any(path.iterdir()) and not holds_only_checkpoint(path):
        raise CheckpointError(
            f"{path} is a non-empty folder that is not a checkpoint (or holds other files beside "
            "one, which replacing it would delete); refusing to replace it (choose another path or "
            "empty the folder)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with _save_lock(path, wait=True):
        _put_back_moved_aside(path)  # a killed save's checkpoint back in place, then its leftovers go
        for leftover in _save_leftovers(path):
            shutil.rmtree(leftover, ignore_errors=True)
        _write_and_swap(path, model, spec, entries)
    return path


def _write_and_swap(path: Path, model: nn.Module, spec: ModelSpec, entries: History) -> None:
    """Write the checkpoint to a temporary sibling, then rename it over ``path`` (the caller
    holds the save lock)."""
    token = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{token}"
    old = path.parent / f".{path.name}.old-{token}"
    tmp.mkdir()
    try:
        spec_data = spec.to_dict()
        spec_data["format_version"] = 2 if spec.normalisation is not None else 1
        _write_json(tmp / SPEC_FILE, spec_data)
        _write_json(tmp / HISTORY_FILE, entries)
        tensors = _contiguous_state(model)
        save_file(tensors, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt", CHECKSUM_KEY: tensors_digest(tensors)})
        fsync_file(tmp / WEIGHTS_FILE)
        fsync_dir(tmp)
        if path.exists():
            os.replace(path, old)  # the new checkpoint is complete: only now move the old one
            try:
                os.replace(tmp, path)
            except BaseException:
                if old.exists():
                    os.replace(old, path)
                raise
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def restore_interrupted_save(path: str | Path) -> bool:
    """Put back the checkpoint a save was replacing when it was killed between its two
    renames (the old folder moved aside to ``.NAME.old-*``, the new one not yet in place).
    Returns whether it did. Cheap when the checkpoint is there (one stat), so the dashboard
    may call it before every look at the weights; loading and saving call it too. A save
    still running holds the save lock: then nothing is touched (its new checkpoint is about
    to arrive). The ``.tmp-*`` and ``.old-*`` leftovers are removed by the next save."""
    path = Path(path)
    if path.exists() or not _save_leftovers(path, "old-"):
        return False
    with _save_lock(path, wait=False) as held:
        return held and _put_back_moved_aside(path)


@contextmanager
def _save_lock(path: Path, wait: bool) -> Iterator[bool]:
    """Hold the exclusive lock on ``.NAME.lock`` beside the checkpoint ``path``; yields
    whether it is held. ``wait=False`` gives up at once when a save holds it (or when the
    lock file cannot be opened, e.g. a read-only folder: nothing could be renamed there
    anyway). The kernel releases it when the process ends, however it ends."""
    try:
        handle = open(path.parent / f".{path.name}.lock", "a")
    except OSError:
        if wait:
            raise
        handle = None
    if handle is None:
        yield False
        return
    with handle:  # closing the file releases the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            held = True
        except BlockingIOError:
            held = False
        yield held


def _put_back_moved_aside(path: Path) -> bool:
    """The newest moved-aside checkpoint back at ``path`` when nothing is there (the caller
    holds the save lock)."""
    if path.exists():
        return False
    moved_aside = [p for p in _save_leftovers(path, "old-") if is_checkpoint(p)]
    if not moved_aside:
        return False
    newest = max(moved_aside, key=lambda p: (p / WEIGHTS_FILE).stat().st_mtime_ns)
    try:
        os.replace(newest, path)
    except OSError:  # something was put there by hand meanwhile: that one stands
        return False
    fsync_dir(path.parent)
    return True


def _save_leftovers(path: Path, *kinds: str) -> list[Path]:
    """The temporary (``tmp-``) and moved-aside (``old-``) folders of saves to ``path`` that
    did not finish."""
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}."  # as save_checkpoint names them: .NAME.tmp-TOKEN, .NAME.old-TOKEN
    return sorted(p for p in path.parent.iterdir()
                  if p.name.startswith(prefix) and p.name[len(prefix):].startswith(kinds or ("tmp-", "old-")))


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- loading

def read_spec(path: str | Path) -> ModelSpec:
    """The checkpoint's spec, validated (cheap: no model is built)."""
    file = _require(Path(path), SPEC_FILE)
    data = _read_json(file, CheckpointSpecError)
    if not isinstance(data, dict):
        raise CheckpointSpecError(f"{file} must hold a JSON object, not {type(data).__name__}")
    problems = []
    classes = data.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        problems.append("'classes' must list at least two class names (background first)")
    elif len(set(classes)) != len(classes) or not all(c.strip() for c in classes):
        problems.append("'classes' must be distinct, non-empty names")
    # every membership test below on a value of the wrong type (a list is unhashable) would crash
    if not isinstance(data.get("arch", "unet"), str) or data.get("arch", "unet") not in ARCHITECTURES:
        problems.append(f"unknown architecture {data.get('arch')!r} (known: {', '.join(ARCHITECTURES)})")
    if not isinstance(data.get("encoder", "resnet18"), str) or data.get("encoder", "resnet18") not in ENCODERS:
        problems.append(f"unknown encoder {data.get('encoder')!r} (known: {', '.join(ENCODERS)})")
    if not isinstance(data.get("in_channels", 3), int) or data.get("in_channels", 3) not in (1, 3):
        problems.append(f"'in_channels' must be 1 or 3, not {data.get('in_channels')!r}")
    size = data.get("input_size", [128, 128])
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        problems.append(f"'input_size' must be [height, width] in pixels, not {size!r}")
    elif max(size) > max_input_size():
        problems.append(f"'input_size' {size[0]}x{size[1]} is larger than the limit of {max_input_size()} px "
                        "per side (DEFECTPRUNE_MAX_INPUT_SIZE)")
    version = data.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        problems.append(f"'format_version' {version!r} is not one this DefectPrune reads (1..{FORMAT_VERSION}); "
                        "a newer DefectPrune wrote it: update, or save the checkpoint again")
    for key, kind in (("dataset_format", str), ("dataset_root", str), ("split_seed", int)):
        if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
            problems.append(f"'{key}' must be {'text' if kind is str else 'a whole number'}, not {data[key]!r}")
    if "metrics" in data and not isinstance(data["metrics"], dict):
        problems.append("'metrics' must be an object")
    if "dataset_options" in data and not isinstance(data["dataset_options"], dict):
        problems.append(f"'dataset_options' must be an object, not {data['dataset_options']!r}")
    problems += _normalisation_problems(data)
    if problems:
        raise CheckpointSpecError(f"{file}: " + "; ".join(problems))
    try:
        return ModelSpec.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointSpecError(f"{file}: cannot read the model spec ({exc})") from None


def _normalisation_problems(data: dict[str, Any]) -> list[str]:
    """``mean`` and ``std``: both or neither, one finite number per input channel, std > 0."""
    present = [key for key in ("mean", "std") if data.get(key) is not None]
    if not present:
        return []
    if len(present) == 1:
        return [f"'{present[0]}' is given without '{'std' if present[0] == 'mean' else 'mean'}'; "
                "a normalisation needs both"]
    channels = data.get("in_channels", 3)
    problems = []
    for key in ("mean", "std"):
        values = data[key]
        if (not isinstance(values, list) or not values
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in values)):
            problems.append(f"'{key}' must be a list of numbers, one per input channel, not {values!r}")
        elif isinstance(channels, int) and len(values) != channels:
            problems.append(f"'{key}' has {len(values)} values for {channels} input channel(s)")
        elif key == "std" and not all(v > 0 for v in values):
            problems.append(f"'std' {values} must be positive in every channel")
    return problems


def read_history(path: str | Path) -> History:
    """The checkpoint's pruning history, validated for form (not yet against a model)."""
    file = _require(Path(path), HISTORY_FILE)
    return normalise_history(_read_json(file, CheckpointHistoryError), source=str(file))


def normalise_history(history: Any, source: str) -> History:
    """``[[module_name, is_out_channel_pruning, [int, ...]], ...]`` with plain Python types."""
    if not isinstance(history, (list, tuple)):
        raise CheckpointHistoryError(f"{source}: the pruning history must be a list, not {type(history).__name__}")
    entries: History = []
    for number, entry in enumerate(history):
        ok = (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)
              and isinstance(entry[1], bool) and isinstance(entry[2], (list, tuple)))
        if ok:
            try:
                idxs = [int(i) for i in entry[2]]
                ok = all(float(i) == float(j) for i, j in zip(idxs, entry[2])) and all(i >= 0 for i in idxs)
            except (TypeError, ValueError):
                ok = False
        if not ok:
            raise CheckpointHistoryError(
                f"{source}: entry {number} is not [module_name, is_out_channel_pruning, "
                f"[channel indices]]: {str(entry)[:120]}"
            )
        entries.append([entry[0], bool(entry[1]), idxs])
    return entries


def replay_history(model: nn.Module, history: History, in_channels: int,
                   source: str = HISTORY_FILE) -> None:
    """Prune ``model`` in place by replaying Torch-Pruning's history on a fresh dependency graph.

    Each entry is checked against the model before it is applied (the module must exist and be
    prunable, the indices must be within its current channels, at least one must remain),
    because Torch-Pruning would otherwise ignore indices out of range silently."""
    if not history:
        return
    with eval_mode(model), torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=(example_input(REPLAY_SIZE, in_channels),), verbose=False)
    modules = dict(model.named_modules())
    for number, (name, out, idxs) in enumerate(history):
        module = modules.get(name)
        where = f"{source}: entry {number} ({name!r})"
        if module is None or module not in graph.module2node:
            raise CheckpointHistoryError(f"{where} names a layer this model does not have; "
                                         "the history belongs to another architecture")
        try:
            total = graph.get_out_channels(module) if out else graph.get_in_channels(module)
        except Exception:  # no pruner for this module type
            total = None
        if total is None:
            raise CheckpointHistoryError(f"{where} names a layer Torch-Pruning cannot prune")
        bad = [i for i in idxs if i >= total]
        if bad:
            raise CheckpointHistoryError(f"{where} removes channel {bad[0]} but the layer has "
                                         f"only {total} at that point; the history does not fit the spec")
        if len(set(idxs)) >= total:
            raise CheckpointHistoryError(f"{where} would remove all {total} channels of the layer")
        try:
            graph.load_pruning_history([[name, out, idxs]])
        except Exception as exc:
            raise CheckpointHistoryError(f"{where} cannot be replayed: {type(exc).__name__}: {exc}"
                                         .splitlines()[0]) from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the model saved at ``path`` (spec, then history, then weights), in eval mode."""
    path = Path(path)
    restore_interrupted_save(path)
    if not path.is_dir():
        raise CheckpointMissingFileError(
            f"checkpoint folder {path} does not exist (a checkpoint is a folder holding "
            f"{', '.join(CHECKPOINT_FILES)})"
        )
    for name in CHECKPOINT_FILES:
        _require(path, name)
    spec = read_spec(path)
    history = read_history(path)
    with torch.random.fork_rng(devices=[]):  # building initialises weights: keep the caller's RNG
        try:
            model = build_model(spec)
        except DefectPruneError as exc:
            raise CheckpointSpecError(f"{path / SPEC_FILE}: {exc}") from None
    replay_history(model, history, spec.in_channels, source=str(path / HISTORY_FILE))
    _check_interface(model, spec, path / HISTORY_FILE)
    state = read_weights(path / WEIGHTS_FILE)
    _check_state(model, state, path / WEIGHTS_FILE)
    not_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not_finite:
        raise CheckpointWeightsError(f"{path / WEIGHTS_FILE}: {len(not_finite)} tensor(s) hold NaN or infinite "
                                     f"values (e.g. {not_finite[0]}); the model diverged: train it again")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointWeightsError(f"{path / WEIGHTS_FILE} does not fit the model: "
                                     f"{str(exc).splitlines()[0]}") from None
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("CUDA was asked for but no GPU is available; use --device cpu")
    model.to(device).eval()
    return LoadedCheckpoint(model=model, spec=spec, history=history, path=path)


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, checked against the checksum in its metadata."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointCorruptWeightsError(
            f"{file} is not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "it is truncated or damaged: save the checkpoint again"
        ) from None
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and tensors_digest(state) != expected:
        raise CheckpointCorruptWeightsError(
            f"{file}: the tensor bytes do not match the checksum written with them; the file "
            "was damaged or edited: save the checkpoint again"
        )
    return state


# files a checkpoint folder may hold besides its own (a save replaces the whole folder, so
# anything else in it, e.g. a prune run's rounds written into it, would be deleted)
CHECKPOINT_COMPANIONS = ("training_history.json",)


def holds_only_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint folder with nothing else in it (hidden lock and
    temporary files aside): the only kind of folder a save may replace."""
    path = Path(path)
    if not (path / SPEC_FILE).is_file():
        return False
    allowed = set(CHECKPOINT_FILES) | set(CHECKPOINT_COMPANIONS)
    return all(p.name in allowed or p.name.startswith(".") for p in path.iterdir())


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding every checkpoint file (contents not checked)."""
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in CHECKPOINT_FILES)


# ---------------------------------------------------------------- helpers

def _check_state(model: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointWeightsError(f"{file}: tensors {' and '.join(parts)} for the model "
                                     "the spec and history describe")
    wrong = [k for k in expected if tuple(state[k].shape) != expected[k]]
    if wrong:
        k = wrong[0]
        raise CheckpointWeightsError(
            f"{file}: {len(wrong)} tensors have the wrong shape (e.g. {k}: {tuple(state[k].shape)} "
            f"where the model after the pruning history has {expected[k]}); weights and "
            "pruning_history.json do not belong together"
        )


def _check_interface(model: nn.Module, spec: ModelSpec, file: Path) -> None:
    """Pruning may thin the inside of a network, never its image channels or its classes."""
    if model_in_channels(model) != spec.in_channels:
        raise CheckpointHistoryError(f"{file} prunes the input channels of the image "
                                     f"({spec.in_channels} in the spec); it does not belong to this spec")
    outputs = [getattr(m, "out_channels", getattr(m, "out_features", None)) for m in classifier_layers(model)]
    if outputs and outputs[0] != spec.num_classes:
        raise CheckpointHistoryError(f"{file} prunes the classifier ({outputs[0]} outputs left for "
                                     f"{spec.num_classes} classes); it does not belong to this spec")


def _contiguous_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared tensors (safetensors refuses tensors sharing memory)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key in seen:
            tensor = tensor.clone()
        seen.add(key)
        tensors[name] = tensor
    return tensors


def _require(folder: Path, name: str) -> Path:
    file = folder / name
    if not folder.is_dir():
        raise CheckpointMissingFileError(f"checkpoint folder {folder} does not exist")
    if not file.is_file():
        raise CheckpointMissingFileError(
            f"{file} is missing; a checkpoint folder holds {', '.join(CHECKPOINT_FILES)}"
        )
    return file


def _read_json(file: Path, error: type[CheckpointError]) -> Any:
    return safe_json.read(file, error=error)


def _write_json(file: Path, data: Any) -> None:
    with open(file, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=json_default)
        handle.flush()
        os.fsync(handle.fileno())
