"""Weights trained elsewhere, read without running their code: whole models (a
segmentation-models-pytorch ``save_pretrained`` folder, or a bare state dict) and encoder
weights (torchvision or timm ResNet / MobileNetV2 / EfficientNet-B0 state dicts).

Files are read as safetensors, or with ``torch.load(..., weights_only=True)`` only: a ``.pt``
that needs a class unpickled (``torch.save(model)``) is refused with `PickledCodeError`, never
loaded. Nothing is downloaded: models and the reference networks used to map key names are
built with random weights (``encoder_weights=None``, ``weights=None``, ``pretrained=False``).

A whole model must fit exactly (`check_model_state`: missing keys, unexpected keys, a shape
mismatch are each a named error naming the key); encoder weights load what fits and say what
did not (`load_encoder_weights` -> `EncoderWeightsReport`).
"""

from __future__ import annotations

import inspect
import pickle
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from core import safe_json
from core.errors import DefectPruneError
from core.models.zoo import ARCHITECTURES, ENCODERS

STATE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
SMP_CONFIG = "config.json"
SMP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# wrappers a training script often saves a state dict in: {"state_dict": {...}, "epoch": 3}
STATE_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "weights")
# prefixes every key gets from a wrapper module (DataParallel's ``module.``, Lightning's ``model.``)
KEY_PREFIXES = ("module.", "model.", "net.")
# an encoder file's classification head: smp's encoders have none
HEAD_PREFIXES = ("fc.", "classifier.", "_fc.", "head.", "last_linear.")
# smp's class name -> the zoo's architecture
SMP_CLASSES = {cls.__name__: name for name, cls in ARCHITECTURES.items()}
# smp config keys the zoo sets itself (or that carry no weights)
SMP_OWN_KEYS = ("_model_class", "encoder_name", "encoder_weights", "in_channels", "classes")


class ModelImportError(DefectPruneError):
    """Weights from elsewhere cannot be imported."""


class WeightsFileError(ModelImportError):
    """The weights file is missing, of an unknown kind, or unreadable."""


class PickledCodeError(ModelImportError):
    """A ``.pt``/``.pth`` file that needs code unpickled (a whole pickled model), refused."""


class NotAStateDictError(ModelImportError):
    """The file holds something other than a plain state dict (names -> tensors)."""


class MissingKeysError(ModelImportError):
    """The state dict lacks tensors the model has."""


class UnexpectedKeysError(ModelImportError):
    """The state dict holds tensors the model has no place for."""


class ShapeMismatchError(ModelImportError):
    """A tensor's shape differs from the model's."""


class NonFiniteWeightsError(ModelImportError):
    """The state dict holds NaN or infinite values."""


class SmpConfigError(ModelImportError):
    """An smp ``config.json`` that cannot be read or describes a model the zoo cannot build."""


class UnknownSmpArchitectureError(SmpConfigError):
    pass


class UnknownSmpEncoderError(SmpConfigError):
    pass


class UnsupportedSmpSettingError(SmpConfigError):
    """A setting (decoder channels, depth, ...) other than the one the zoo builds."""


class EncoderWeightsError(ModelImportError):
    """Encoder weights that do not fit the encoder."""


# ---------------------------------------------------------------- reading files
def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or (``weights_only=True``) ``.pt``/``.pth``/``.bin``/
    ``.ckpt``: names -> CPU tensors, in the file's order, unwrapped from a training script's
    ``{"state_dict": ...}`` and stripped of a wrapper's key prefix (``module.``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path} is not a file" + (" (a folder: an smp save_pretrained folder holds "
                                                           f"{SMP_CONFIG})" if path.is_dir() else ""))
    suffix = path.suffix.lower()
    if suffix not in STATE_SUFFIXES:
        raise WeightsFileError(f"{path}: a weights file is {', '.join(STATE_SUFFIXES)}, not {suffix or 'no suffix'!r}")
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            loaded: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise WeightsFileError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None
    else:
        loaded = _torch_load(path)
    return strip_key_prefix(plain_state_dict(loaded, path))


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise PickledCodeError(
                f"{path} is a pickle that needs code to be unpickled ({found.group(1)}): a whole model saved with "
                "torch.save(model), which could run anything when loaded, so it is refused. Save its weights instead: "
                "torch.save(model.state_dict(), 'weights.pth'), or model.save_pretrained(folder) for an smp model"
            ) from None
        raise WeightsFileError(f"{path} is not a readable PyTorch weights file ({_first_line(exc)})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise WeightsFileError(f"{path} is not a readable PyTorch weights file ({_first_line(exc)})") from None


def plain_state_dict(loaded: Any, source: str | Path) -> dict[str, torch.Tensor]:
    """``loaded`` as names -> tensors, or `NotAStateDictError` saying what it holds."""
    if isinstance(loaded, dict) and not _is_state(loaded):
        inner = [k for k in STATE_WRAPPERS if isinstance(loaded.get(k), dict) and _is_state(loaded[k])]
        if inner:
            loaded = loaded[inner[0]]
    if not isinstance(loaded, dict):
        raise NotAStateDictError(f"{source} holds a {type(loaded).__name__}, not a state dict (tensor names -> "
                                 "tensors); save model.state_dict()")
    if not loaded:
        raise NotAStateDictError(f"{source} holds an empty dict, not a state dict")
    if not _is_state(loaded):
        held = ", ".join(f"{k} ({type(v).__name__})" for k, v in list(loaded.items())[:6])
        raise NotAStateDictError(f"{source} is not a plain state dict (tensor names -> tensors): it holds {held}"
                                 f"{', ...' if len(loaded) > 6 else ''}; save model.state_dict()")
    return {str(k): v.detach().cpu() for k, v in loaded.items()}


def _is_state(value: dict) -> bool:
    return bool(value) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def strip_key_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without a prefix every key has (``module.``, ``model.``), repeatedly."""
    changed = True
    while changed:
        changed = False
        for prefix in KEY_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1].strip()[:200] if text else type(exc).__name__


# ---------------------------------------------------------------- smp folders
@dataclass(frozen=True)
class SmpModel:
    """What an smp ``save_pretrained`` folder says: the zoo's architecture and encoder, the
    class count, the input channels, its weights file and what was dropped (``notes``)."""

    arch: str
    encoder: str
    classes: int
    in_channels: int
    weights: Path
    notes: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()  # key prefixes of parts dropped (an auxiliary classification head)


def is_smp_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / SMP_CONFIG).is_file()


def read_smp_folder(folder: str | Path) -> SmpModel:
    """The model an smp ``model.save_pretrained(folder)`` describes (``config.json`` +
    ``model.safetensors``), refused when the zoo cannot build exactly it."""
    folder = Path(folder)
    file = folder / SMP_CONFIG
    if not file.is_file():
        raise SmpConfigError(f"{folder} has no {SMP_CONFIG}; an smp model saved with model.save_pretrained(folder) "
                             f"holds {SMP_CONFIG} and {SMP_WEIGHTS[0]}")
    config = safe_json.read(file, error=SmpConfigError)
    if not isinstance(config, dict):
        raise SmpConfigError(f"{file} must hold a JSON object, not {type(config).__name__}")
    class_name = config.get("_model_class")
    if not isinstance(class_name, str) or class_name not in SMP_CLASSES:
        raise UnknownSmpArchitectureError(
            f"{file}: architecture {class_name!r} is not one DefectPrune builds (it builds "
            f"{', '.join(SMP_CLASSES)})")
    encoder = config.get("encoder_name", "resnet34")
    if not isinstance(encoder, str) or encoder not in ENCODERS:
        raise UnknownSmpEncoderError(f"{file}: encoder {encoder!r} is not one DefectPrune builds (it builds "
                                     f"{', '.join(ENCODERS)})")
    classes, in_channels = config.get("classes", 1), config.get("in_channels", 3)
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
        raise UnsupportedSmpSettingError(f"{file}: 'classes' is {classes!r}; DefectPrune's models predict at least "
                                         "two classes (background first) with one logit each")
    if in_channels not in (1, 3) or isinstance(in_channels, bool):
        raise UnsupportedSmpSettingError(f"{file}: 'in_channels' is {in_channels!r}; DefectPrune's models take 1 or 3")
    notes = _check_smp_settings(file, ARCHITECTURES[SMP_CLASSES[class_name]], config)
    ignore = ("classification_head.",) if config.get("aux_params") is not None else ()
    weights = next((folder / name for name in SMP_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise WeightsFileError(f"{folder} has {SMP_CONFIG} but no {' or '.join(SMP_WEIGHTS)}")
    return SmpModel(arch=SMP_CLASSES[class_name], encoder=encoder, classes=classes, in_channels=in_channels,
                    weights=weights, notes=tuple(notes), ignore=ignore)


def _check_smp_settings(file: Path, model_class: type[nn.Module], config: dict[str, Any]) -> list[str]:
    """Every other setting must be the default the zoo builds with; an activation or an
    auxiliary classification head carries no weights of the segmentation and is dropped."""
    defaults = {name: p.default for name, p in inspect.signature(model_class.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    notes = []
    for key, value in sorted(config.items()):
        if key in SMP_OWN_KEYS:
            continue
        if key == "activation":
            if value is not None:
                notes.append(f"activation {value!r} dropped: DefectPrune's models output logits (the arg-max, "
                             "and so every mask, is the same)")
            continue
        if key == "aux_params":
            if value is not None:
                notes.append("the auxiliary classification head (aux_params) dropped")
            continue
        if key not in defaults:
            notes.append(f"setting {key}={value!r} ignored (unknown to the installed segmentation-models-pytorch)")
            continue
        default = defaults[key]
        if _plain(value) != _plain(default):
            raise UnsupportedSmpSettingError(
                f"{file}: {key} is {value!r} where DefectPrune builds {model_class.__name__} with {default!r}; only "
                "models with the default settings (other than encoder, classes and input channels) can be imported")
    return notes


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- whole models
def check_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path,
                      ignore: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``state`` made to fit ``model`` exactly, or the named error for the first problem:
    missing keys, unexpected keys, a shape mismatch, values not finite. BatchNorm's
    ``num_batches_tracked`` may be missing (it changes no output); keys starting with one of
    ``ignore`` are dropped (a head the config said to drop)."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore)} if ignore else dict(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    hint = "; is the architecture and encoder right?"
    if missing:
        also = f" and {len(unexpected)} it has no place for (e.g. {unexpected[0]})" if unexpected else ""
        raise MissingKeysError(f"{source} lacks {len(missing)} tensor(s) of the model ({_some(missing)}){also}{hint}")
    if unexpected:
        raise UnexpectedKeysError(f"{source} holds {len(unexpected)} tensor(s) the model has no place for "
                                  f"({_some(unexpected)}){hint}")
    for key, tensor in expected.items():
        if key in state and tuple(state[key].shape) != tuple(tensor.shape):
            raise ShapeMismatchError(
                f"{source}: {key} has shape {tuple(state[key].shape)} where the model has {tuple(tensor.shape)}"
                + ("; are the classes right?" if key.startswith("segmentation_head") else "; is the encoder right?"))
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteWeightsError(f"{source}: {key} holds NaN or infinite values")
    for key, tensor in expected.items():  # a missing num_batches_tracked keeps the model's own
        state.setdefault(key, tensor)
    return {k: state[k].to(expected[k].dtype) for k in expected}


def first_conv_key(model: nn.Module) -> str:
    """The state-dict key of the first convolution's weight (what says the input channels)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight"
    raise ModelImportError("the model has no convolution")


def _some(keys: list[str], count: int = 3) -> str:
    return ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")


# ---------------------------------------------------------------- encoder weights
@dataclass
class EncoderWeightsReport:
    """What `load_encoder_weights` did: ``loaded`` tensors of the encoder's ``total`` (BatchNorm
    counters aside), by ``mapping`` (``names`` or the reference network whose layout the file
    has); ``not_loaded``: the encoder's tensors left as initialised; ``unused``: the file's
    tensors not loaded (its classification head)."""

    file: str
    loaded: int
    total: int
    mapping: str
    not_loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        left = f"; not loaded: {_some(self.not_loaded)}" if self.not_loaded else ""
        return (f"encoder weights from {self.file}: {self.loaded} of {self.total} tensors loaded "
                f"(by {self.mapping}){left}")


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return build


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return build


# per encoder, the networks whose state dicts users have, built with random weights to learn
# their key order; smp's ResNets and MobileNetV2 use torchvision's names, its EfficientNet the
# efficientnet-pytorch names, timm names all of them its own way
REFERENCES: dict[str, tuple[tuple[str, Callable[[], nn.Module]], ...]] = {
    "resnet18": (("torchvision resnet18", _torchvision("resnet18")),),
    "resnet34": (("torchvision resnet34", _torchvision("resnet34")),),
    "mobilenet_v2": (("torchvision mobilenet_v2", _torchvision("mobilenet_v2")),
                     ("timm mobilenetv2_100", _timm("mobilenetv2_100"))),
    "efficientnet-b0": (("torchvision efficientnet_b0", _torchvision("efficientnet_b0")),
                        ("timm efficientnet_b0", _timm("efficientnet_b0")),
                        ("timm tf_efficientnet_b0", _timm("tf_efficientnet_b0"))),
}


def _counted(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _reference_mapping(encoder_state: dict[str, torch.Tensor], build: Callable[[], nn.Module]) -> dict[str, str]:
    """Reference key -> encoder key: the two networks' tensors paired in registration order
    (BatchNorm counters and the reference's head aside), as long as every pair's shapes agree
    (the first convolution's input channels may differ)."""
    with torch.random.fork_rng(devices=[]):
        reference = _counted(build().state_dict())
    ref_keys = [k for k in reference if not k.startswith(HEAD_PREFIXES)]
    enc_keys = list(encoder_state)
    if len(ref_keys) < len(enc_keys):
        return {}
    mapping = {}
    for number, (ref, enc) in enumerate(zip(ref_keys, enc_keys)):
        a, b = tuple(reference[ref].shape), tuple(encoder_state[enc].shape)
        if a != b and not (number == 0 and len(a) == 4 and a[:1] + a[2:] == b[:1] + b[2:]):
            return {}
        mapping[ref] = enc
    return mapping


def load_encoder_weights(model: nn.Module, path: str | Path, encoder: str) -> EncoderWeightsReport:
    """Initialise ``model.encoder`` (smp's ``encoder``, e.g. resnet18) from a local weights
    file, mapping key names where the libraries differ: by name first (smp's own layout,
    torchvision's ResNet and MobileNetV2, timm's ResNet), else by the layout of the known
    network the file's keys are (torchvision or timm, paired in order and shape). The
    classification head is left out; a 3-channel first convolution feeding a 1-channel model
    is summed over its colours (as smp does with pretrained weights). A file of another
    network (tensors that fit nowhere, a shape that differs) is refused."""
    module = getattr(model, "encoder", None)
    if not isinstance(module, nn.Module):
        raise EncoderWeightsError("the model has no encoder to initialise")
    notes: list[str] = []
    source = read_state_file(path)
    if any(k.startswith("encoder.") for k in source) and any(k.startswith("decoder.") for k in source):
        source = {k[len("encoder."):]: v for k, v in source.items() if k.startswith("encoder.")}
        notes.append("the encoder of a whole segmentation model: its decoder and head left out")
    elif all(k.startswith("encoder.") for k in source):
        source = {k[len("encoder."):]: v for k, v in source.items()}
    target = _counted(module.state_dict())
    file_keys = _counted(source)
    candidates: list[tuple[str, dict[str, str]]] = [("names", {k: k for k in target})]
    if not all(k in target for k in file_keys if not k.startswith(HEAD_PREFIXES)):
        for label, build in REFERENCES.get(encoder, ()):  # another library's names: learn its layout
            mapping = _reference_mapping(target, build)
            if mapping:
                candidates.append((label, mapping))
    # the layout that places the most of the file's tensors (names on a tie)
    label, mapping = max(candidates, key=lambda c: sum(1 for k in c[1] if k in file_keys))
    used = {k: mapping[k] for k in file_keys if k in mapping}
    name = encoder
    if not used:
        raise EncoderWeightsError(
            f"{path}: none of its {len(file_keys)} tensors fits the {name} encoder (its keys look like "
            f"{_some(list(file_keys))}; the encoder's like {_some(list(target))}); is it the weights of a {name}?")
    first = next(iter(target))
    new_state = {}
    for src_key, enc_key in used.items():
        tensor, want = file_keys[src_key], target[enc_key]
        if enc_key == first and tensor.dim() == 4 and tensor.shape[1] == 3 and want.shape[1] == 1:
            tensor = tensor.sum(1, keepdim=True)
            notes.append(f"{enc_key}: the 3-channel weights summed over their colours for the 1-channel input")
        if tuple(tensor.shape) != tuple(want.shape):
            raise ShapeMismatchError(f"{path}: {src_key} has shape {tuple(tensor.shape)} where the {name} encoder's "
                                     f"{enc_key} has {tuple(want.shape)}; is it the weights of a {name}?")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteWeightsError(f"{path}: {src_key} holds NaN or infinite values")
        new_state[enc_key] = tensor.to(want.dtype)
    unused = [k for k in file_keys if k not in used]
    stray = [k for k in unused if not k.startswith(HEAD_PREFIXES)]
    if stray:
        raise UnexpectedKeysError(
            f"{path} holds {len(stray)} tensor(s) the {name} encoder has no place for ({_some(stray)}); it is the "
            f"weights of another network (a deeper or wider one?)")
    module.load_state_dict(new_state, strict=False)
    return EncoderWeightsReport(file=str(path), loaded=len(new_state), total=len(target), mapping=label,
                                not_loaded=[k for k in target if k not in new_state], unused=unused, notes=notes)
