"""Import a model trained elsewhere as an ordinary checkpoint, evaluated at once on the chosen
dataset: ``python -m core import-model``, the import job and the Model page.

The source is a segmentation-models-pytorch ``model.save_pretrained(folder)`` folder (its
``config.json`` names the architecture, encoder, class count and input channels) or a bare
state dict (``.safetensors``, or ``.pt``/``.pth`` read with ``weights_only=True`` only) with
``--arch --encoder`` given. The class names are ``--classes`` or the dataset's; the input size
``--size`` or the dataset's; the normalisation the model was trained with ``--mean --std``
(default ImageNet's for a 3-channel model, DefectPrune's own for a 1-channel one), kept in
the checkpoint's spec so every dataset it is run on is normalised as it was trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import DefectPruneError
from core.services.datasets import DataRequest
from core.services.request import FINITE_FLOAT, LIST, POSITIVE_FLOAT, SEED, WHOLE_NUMBER, ParameterError, setting

if TYPE_CHECKING:
    from core.services.evaluate import EvaluateResult
    from core.train import ProgressCallback


# the input size of an import with neither --size nor a dataset
DEFAULT_SIZE = (128, 128)


class ImportClassesError(DefectPruneError):
    """The imported model's classes do not match the names given or the dataset's."""


def _zoo() -> Any:
    from core.models import zoo

    return zoo


def _splits() -> list[str]:
    from core.data.base import SPLITS

    return list(SPLITS)


SOURCE_HELP = ("the model to import: an smp model.save_pretrained(folder) folder (config.json + model.safetensors), "
               "or a state dict (.safetensors, or .pt/.pth saved with torch.save(model.state_dict(), ...); a pickled "
               "whole model is refused)")


@dataclass(frozen=True, kw_only=True)
class ImportRequest(DataRequest):
    KIND = "import"

    source: str = setting(required=True, metavar="PATH", help=SOURCE_HELP)
    arch: str | None = setting(None, choices=lambda: list(_zoo().ARCHITECTURES),
                               help="architecture of a state dict (an smp folder names its own)")
    encoder: str | None = setting(None, choices=lambda: list(_zoo().ENCODERS),
                                  help="encoder of a state dict (an smp folder names its own)")
    classes: tuple[str, ...] = setting(kind=LIST, metavar="NAME",
                                       help="class names in logit order, background first (default: the dataset's)")
    in_channels: int | None = setting(None, check=WHOLE_NUMBER, choices=(1, 3),
                                      help="image channels (default: what the weights' first convolution takes)")
    mean: tuple[float, ...] = setting(kind=LIST, check=FINITE_FLOAT,
                                      help="per-channel mean the model was trained with, on pixels scaled to 0..1 "
                                           "(one value or one per channel; default ImageNet's for 3 channels, "
                                           "0.5 for 1)")
    std: tuple[float, ...] = setting(kind=LIST, check=POSITIVE_FLOAT,
                                     help="per-channel std, as --mean (default ImageNet's for 3 channels, 0.25 for 1)")
    split: str = setting("val", choices=_splits, help="the split the import is evaluated on at once")
    split_seed: int = setting(0, check=SEED, help="seed of the train/val/test split for formats without an "
                                                  "official one")
    out: str | None = setting(None, required=True, job=False, help="checkpoint folder to write")


@dataclass(frozen=True)
class ImportResult:
    """What an import wrote (the command's JSON, the job's result). ``evaluation`` is the
    evaluate command's report on ``split`` (None without a dataset)."""

    checkpoint: str
    source: str
    source_kind: str  # "smp folder" or "state dict"
    arch: str
    encoder: str
    classes: list[str]
    in_channels: int
    input_size: list[int]
    normalisation: dict[str, list[float]]
    tensors: int
    notes: list[str]
    evaluation: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImportSource:
    """What the source says about the network it holds, and its weights."""

    path: Path
    kind: str  # "smp folder" or "state dict"
    arch: str
    encoder: str
    in_channels: int | None  # None: a state dict's (what its first convolution takes, unless given)
    class_count: int | None  # an smp config's; None: a state dict's (the names decide)
    ignore: tuple[str, ...]  # key prefixes of parts the model does not hold (an smp folder's auxiliary head)
    state: dict[str, Any]
    notes: list[str]


def read_import_source(request: ImportRequest) -> ImportSource:
    """The smp folder or state-dict file at ``request.source``, read and checked against the
    architecture, encoder and channels the request gives (a folder names its own)."""
    from core.models.importer import WeightsFileError, is_smp_folder, read_smp_folder, read_state_file

    source = Path(request.source).expanduser()
    if is_smp_folder(source):
        smp = read_smp_folder(source)
        for flag, given, found in (("--arch", request.arch, smp.arch), ("--encoder", request.encoder, smp.encoder),
                                   ("--in-channels", request.in_channels, smp.in_channels)):
            if given is not None and given != found:
                raise ParameterError(f"{flag} {given} was given, but {source}/config.json says {found}; leave "
                                     f"{flag} out for an smp folder")
        return ImportSource(path=source, kind="smp folder", arch=smp.arch, encoder=smp.encoder,
                            in_channels=smp.in_channels, class_count=smp.classes, ignore=smp.ignore,
                            state=read_state_file(smp.weights), notes=list(smp.notes))
    if source.is_dir():
        raise WeightsFileError(f"{source} is a folder without config.json; give an smp save_pretrained folder or a "
                               "state-dict file (.safetensors, .pt, .pth)")
    if not request.arch or not request.encoder:
        raise ParameterError("a state dict does not say what network it is: give --arch and --encoder (an smp "
                             "save_pretrained folder says its own)")
    return ImportSource(path=source, kind="state dict", arch=request.arch, encoder=request.encoder, in_channels=None,
                        class_count=None, ignore=(), state=read_state_file(source), notes=[])


def run_import(request: ImportRequest, progress: ProgressCallback | None = None) -> ImportResult:
    """Read the source, check it fits the model exactly, save the checkpoint at
    ``request.out``, and evaluate it on the dataset's ``split`` when a dataset is given."""
    from core.atomic import check_output_folder
    from core.data.base import parse_size
    from core.data.registry import load_index
    from core.models.checkpoint import holds_only_checkpoint, save_checkpoint
    from core.train import EmptySplitError

    if not request.out:
        raise ParameterError("an import needs the checkpoint folder to write (--out)")
    out = check_output_folder(request.out, "checkpoint", holds_only_checkpoint,
                              protected=[("the dataset folder", request.root),
                                         ("the source", str(Path(request.source).expanduser()))])
    imported = read_import_source(request)
    index = None
    if request.format:
        index = load_index(request.format, request.root, seed=request.split_seed, strict=request.strict,
                           **request.option)
    classes = _classes(request, index, imported.class_count, imported.path)
    if index is not None and not index.split_counts().get(request.split):
        raise EmptySplitError(f"the {request.split} split of {index.format} at {index.root} has no images to "
                              "evaluate the import on; choose another --split")
    size = parse_size(request.size, index.default_size if index is not None else DEFAULT_SIZE)
    model, spec, normalisation, fitted = _imported_model(request, imported, classes, size, index)
    facts = {"source": str(imported.path), "kind": imported.kind, "tensors": len(fitted), "notes": imported.notes}
    spec.metrics = {"import": facts}
    checkpoint = Path(save_checkpoint(out, model, spec))
    evaluation = None
    if index is not None:
        evaluation = _evaluate_import(request, checkpoint, index, progress)
        spec.metrics = {"split": request.split, **evaluation.evaluation.metrics.to_dict(), "import": facts}
        checkpoint = Path(save_checkpoint(checkpoint, model, spec))  # the spec now says how the import scores
    return ImportResult(
        checkpoint=str(checkpoint), source=str(imported.path), source_kind=imported.kind, arch=imported.arch,
        encoder=imported.encoder, classes=list(classes), in_channels=spec.in_channels, input_size=list(size),
        normalisation=normalisation.to_json(), tensors=len(fitted), notes=imported.notes,
        evaluation=evaluation.to_json() if evaluation is not None else None)


def _imported_model(request: ImportRequest, imported: ImportSource, classes: list[str], size: tuple[int, int],
                    index: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The zoo model the source's weights fit exactly, loaded and in eval mode, its spec (with
    the normalisation), the normalisation and the fitted weights."""
    import torch

    from core.models.importer import check_model_state, first_conv_key
    from core.models.zoo import ModelSpec, build_model

    in_channels = imported.in_channels or request.in_channels or 3
    spec = ModelSpec(classes=classes, arch=imported.arch, encoder=imported.encoder, in_channels=in_channels,
                     input_size=size, dataset_format=index.format if index is not None else "",
                     dataset_root=str(index.root.resolve()) if index is not None and request.root is not None else "",
                     dataset_options=dict(request.option) if index is not None else {},
                     split_seed=request.split_seed)
    with torch.random.fork_rng(devices=[]):  # the weights are replaced: keep the caller's RNG as it was
        model = build_model(spec)
        if imported.in_channels is None and request.in_channels is None:  # what the first convolution takes
            first = imported.state.get(first_conv_key(model))
            if first is not None and first.dim() == 4 and first.shape[1] == 1:
                spec = replace(spec, in_channels=int(first.shape[1]))
                model = build_model(spec)
    normalisation = _normalisation(request, spec.in_channels)
    spec = replace(spec, mean=list(normalisation.mean), std=list(normalisation.std))
    _check_class_count(model, imported.state, classes, imported.path)
    fitted = check_model_state(model, imported.state, imported.path, ignore=imported.ignore)
    model.load_state_dict(fitted, strict=True)
    model.eval()
    return model, spec, normalisation, fitted


def _evaluate_import(request: ImportRequest, checkpoint: Path, index: Any,
                     progress: ProgressCallback | None) -> EvaluateResult:
    """The evaluate command's result for the saved import on the request's dataset and split."""
    from core.services.evaluate import EvaluateRequest, run_evaluate

    return run_evaluate(EvaluateRequest(
        checkpoint=str(checkpoint), format=index.format, root=request.root, split=request.split,
        split_seed=request.split_seed, limit=request.limit, batch_size=request.batch_size,
        threads=request.threads, workers=request.workers, option=request.option, strict=request.strict,
        device=request.device), progress=progress)


def _classes(request: ImportRequest, index: Any, class_count: int | None, source: Path) -> list[str]:
    """The class names: ``--classes`` or the dataset's, the same as the dataset's when both
    are given, as many as an smp config's class count."""
    given = list(request.classes)
    if given and index is not None and given != list(index.classes):
        raise ImportClassesError(f"the model's classes {', '.join(given)} are not the dataset's: {index.format} at "
                                 f"{index.root} has {', '.join(index.classes)}; use a dataset with the model's "
                                 "classes (in its logit order)")
    names = given or (list(index.classes) if index is not None else [])
    if not names:
        raise ParameterError("give the class names (--classes, background first) or a dataset (--format, --root) "
                             "whose classes the model predicts")
    if len(names) < 2 or len(set(names)) != len(names) or not all(n.strip() for n in names):
        raise ParameterError(f"--classes {' '.join(names)}: at least two distinct names, background first")
    if class_count is not None and class_count != len(names):
        where = "--classes" if given else f"{index.format} at {index.root}"
        raise ImportClassesError(f"{source}/config.json predicts {class_count} classes but {where} names "
                                 f"{len(names)}: {', '.join(names)}")
    return names


def _check_class_count(model: Any, state: dict[str, Any], classes: list[str], source: Path) -> None:
    """A state dict whose segmentation head predicts another number of classes than named."""
    from core.models.groups import classifier_layers

    head = classifier_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    if not head:
        return
    key = f"{names[id(head[0])]}.weight"
    if key in state and state[key].dim() >= 1 and state[key].shape[0] != len(classes):
        raise ImportClassesError(f"{source}: the segmentation head ({key}) predicts {state[key].shape[0]} classes "
                                 f"but {len(classes)} are named: {', '.join(classes)}")


def _normalisation(request: ImportRequest, in_channels: int) -> Any:
    from core.data.dataset import Normalisation

    if bool(request.mean) != bool(request.std):
        raise ParameterError("give both --mean and --std (the normalisation the model was trained with), or neither "
                             "(ImageNet's for 3 channels)")
    if request.mean:
        return Normalisation.of(request.mean, request.std, in_channels)
    return Normalisation.imagenet() if in_channels == 3 else Normalisation.default(in_channels)
