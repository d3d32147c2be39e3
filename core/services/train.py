"""Train a model from scratch and save it as a checkpoint whose spec remembers the dataset and
its val metrics: ``python -m core train``, the train job and the Model page."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import DefectPruneError
from core.services.datasets import DataRequest, format_choices
from core.services.request import (
    FINITE_FLOAT, FLAG, NON_NEGATIVE_FINITE, POSITIVE_FLOAT, POSITIVE_INT, SEED, WHOLE_NUMBER, ParameterError, setting,
)
from core.services.tracking import tracked, tracking_setting

if TYPE_CHECKING:
    from core.data.base import DatasetIndex
    from core.data.dataset import SegmentationDataset
    from core.train import ProgressCallback, TrainConfig

TRAINING_HISTORY_FILE = "training_history.json"


def _zoo() -> Any:
    from core.models import zoo

    return zoo


def _train_config() -> Any:
    from core.train import TrainConfig

    return TrainConfig


def _precisions() -> list[str]:
    from core.precision import PRECISIONS

    return list(PRECISIONS)


def _schedules() -> list[str]:
    from core.train import SCHEDULES

    return list(SCHEDULES)


PRECISION_HELP = ("training forward passes: bf16 autocast with channels_last where the device runs it fast (auto), "
                  "or as asked; evaluation, export and saved weights stay fp32")


def precision_setting() -> Any:
    """The ``precision`` field of every request that trains (train, prune, score)."""
    return setting("auto", choices=_precisions, help=PRECISION_HELP)


# ---------------------------------------------------------------- training defaults per format
# The settings a TrainRequest leaves unset (None) come from its dataset format, here and only
# here: the command line, the jobs (the request fills them in when it is made) and the Model
# page's form (`recommended_training`) all read them. Real datasets train long at a modest rate
# (bench/results/baseline.md: NEU-Seg and Magnetic tile still gain at epoch 15 and 29). The
# built-in synthetic families are the demo: a short one-cycle run, measured end to end by
# bench/demo.py (DEMO_MEASURED below is what it measured on the default one).
REAL_DATA_TRAINING: dict[str, Any] = {"epochs": 30, "lr": 1e-3, "schedule": "cosine"}
SYNTHETIC_TRAINING: dict[str, Any] = {"epochs": 24, "lr": 3e-3, "schedule": "onecycle"}


def recommended_training(format_name: str | None) -> dict[str, Any]:
    """The training settings (epochs, lr, schedule) a format trains with unless asked otherwise."""
    synthetic = isinstance(format_name, str) and format_name.startswith("synthetic-")
    return dict(SYNTHETIC_TRAINING if synthetic else REAL_DATA_TRAINING)


def _by_format(name: str) -> str:
    return f"default: {SYNTHETIC_TRAINING[name]} on a synthetic family, {REAL_DATA_TRAINING[name]} on real data"


@dataclass(frozen=True)
class DemoMeasurement:
    """What training with the defaults did on a format, as bench/demo.py measured it: the
    figure the Data page quotes (one place; bench/results/demo.md has the run)."""

    format: str
    train_seconds: float  # the fit's wall time: every epoch's training and validation
    cpu_seconds: float  # CPU time of the whole train command
    val_miou: float
    test_miou: float
    machine: str

    def sentence(self) -> str:
        minutes = self.train_seconds / 60
        return (f"reached {self.val_miou:.1f} validation and {self.test_miou:.1f} test defect mIoU in about "
                f"{minutes:.1f} minutes of training ({self.machine}; bench/results/demo.md)")


def describe_training_defaults(format_name: str, size: tuple[int, int]) -> str:
    """One sentence on what training with the defaults does on a format at ``size``, with the
    measured time and accuracy where bench/demo.py measured that format (the Data page's)."""
    from core.models.zoo import DEFAULT_ARCH, DEFAULT_ENCODER

    recipe = recommended_training(format_name)
    batch = next(f.default for f in fields(TrainRequest) if f.name == "batch_size")
    schedule = {"onecycle": "one-cycle", "cosine": "cosine", "plateau": "plateau"}.get(recipe["schedule"],
                                                                                        recipe["schedule"])
    text = (f"Training with the defaults ({DEFAULT_ARCH}-{DEFAULT_ENCODER} from scratch at {size[0]}x{size[1]} px, "
            f"{recipe['epochs']} epochs of {schedule} at learning rate {recipe['lr']:g}, batch {batch})")
    if format_name == DEMO_MEASURED.format:
        return f"{text} {DEMO_MEASURED.sentence()}."
    if recommended_training(DEMO_MEASURED.format) == recipe:
        return f"{text}: on {DEMO_MEASURED.format} the same settings {DEMO_MEASURED.sentence()}."
    return f"{text}."


# `python bench/demo.py` on 2026-12-03 (bench/results/demo.md), the machine quiet (load 1.6-2.0)
DEMO_MEASURED = DemoMeasurement(format="synthetic-steel", train_seconds=164.0, cpu_seconds=327.0, val_miou=70.8,
                                test_miou=66.9, machine="2-core Intel Xeon CPU, fp32")


@dataclass(frozen=True, kw_only=True)
class TrainRequest(DataRequest):
    KIND = "train"

    format: str = setting(required=True, choices=format_choices)
    split_seed: int = setting(0, check=SEED, help="seed of the train/val/test split for formats without an official one")
    arch: str = setting(default_factory=lambda: _zoo().DEFAULT_ARCH, choices=lambda: list(_zoo().ARCHITECTURES))
    encoder: str = setting(default_factory=lambda: _zoo().DEFAULT_ENCODER, choices=lambda: list(_zoo().ENCODERS))
    in_channels: int | None = setting(None, check=WHOLE_NUMBER, choices=(1, 3),
                                      help="model input channels (default: the dataset's native channels)")
    encoder_weights: str | None = setting(None, metavar="PATH",
                                          help="initialise the encoder from a local weights file: a torchvision or timm "
                                               "ResNet, MobileNetV2 or EfficientNet-B0 state dict (.safetensors, or .pth "
                                               "read with weights_only=True); nothing is downloaded")
    epochs: int | None = setting(None, check=POSITIVE_INT, help=lambda: f"training epochs ({_by_format('epochs')})")
    lr: float | None = setting(None, check=POSITIVE_FLOAT, help=lambda: f"peak learning rate ({_by_format('lr')})")
    weight_decay: float = setting(1e-4, check=NON_NEGATIVE_FINITE)
    schedule: str | None = setting(None, choices=_schedules,
                                   help=lambda: "cosine over --epochs, one-cycle (warm-up to --lr, then down), or "
                                                f"plateau: constant rate cut tenfold after every "
                                                f"{_train_config().plateau_patience} epochs without a better val defect "
                                                "mIoU (for training until converged, with --patience); "
                                                f"{_by_format('schedule')}")
    patience: int = setting(8, check=POSITIVE_INT, help="stop after this many epochs without a better val defect mIoU")
    no_early_stop: bool = setting(False, kind=FLAG, help="train every epoch")
    max_steps_per_epoch: int | None = setting(None, check=POSITIVE_INT)
    no_augment: bool = setting(False, kind=FLAG, help="train without augmentation")
    defect_share: float = setting(default_factory=lambda: _train_config().defect_share, check=FINITE_FLOAT,
                                  help="images with a defect make at least this share of the draws (0: plain shuffling)")
    seed: int = setting(0, check=SEED, help="seed of weights, order and augmentation")
    out: str | None = setting(None, required=True, job=False, help="checkpoint folder to write")
    precision: str = precision_setting()
    mlflow_uri: str | None = tracking_setting()

    def __post_init__(self) -> None:
        # the settings left unset are the format's (recommended_training), so that a request,
        # the job that stores it and the checkpoint's history all say what was trained
        for name, value in recommended_training(self.format).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        super().__post_init__()


@dataclass(frozen=True)
class TrainResult:
    """What a training run did (the command's JSON, the job's result)."""

    checkpoint: str
    epochs_run: int
    best_epoch: int | None
    stopped_early: bool
    stopped_by_user: bool
    seconds: float
    seconds_per_epoch: float | None
    device: str
    precision: str
    memory_format: str
    train_step_seconds: float | None
    train_images: int
    val_images: int
    val: dict[str, Any] | None
    encoder_weights: dict[str, Any] | None = None  # core.models.importer.EncoderWeightsReport's JSON

    @property
    def history_file(self) -> Path:
        return Path(self.checkpoint) / TRAINING_HISTORY_FILE

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@tracked  # logged to MLflow where a tracking URI is set (core.services.tracking)
def run_train(request: TrainRequest, progress: ProgressCallback | None = None) -> TrainResult:
    """Train, save the checkpoint at ``request.out`` with its training history."""
    import torch

    from core.atomic import check_output_folder, write_json_atomic
    from core.models.checkpoint import holds_only_checkpoint, save_checkpoint
    from core.models.zoo import ModelSpec, build_model
    from core.train import distributed, fit, resolve_device, seed_everything

    if not request.out:
        raise ParameterError("training needs the checkpoint folder to write (--out)")
    # refuse a bad --out before any data is read or any step is trained (not after the run)
    out = check_output_folder(request.out, "checkpoint", holds_only_checkpoint,
                              protected=[("the dataset folder", request.root)])
    device = resolve_device(request.device)
    index, size, in_channels, train_ds, val_ds = _training_splits(request)
    config = _fit_config(request, device)
    spec = ModelSpec(
        classes=list(index.classes), arch=request.arch, encoder=request.encoder, in_channels=in_channels,
        input_size=size, dataset_format=index.format,
        dataset_root=str(index.root.resolve()) if request.root is not None else "",
        dataset_options=dict(request.option), split_seed=request.split_seed,
    )
    seed_everything(request.seed)  # the initial weights follow the seed too
    model = build_model(spec)
    encoder_weights = None
    if request.encoder_weights:  # a local file, never a hub; what loaded and what did not is reported
        from core.models.importer import load_encoder_weights

        encoder_weights = load_encoder_weights(model, request.encoder_weights, request.encoder).to_json()
    result = fit(model, train_ds, val_ds, config, progress=progress, class_names=index.classes)
    if result.epochs_run == 0:
        raise DefectPruneError("training was stopped before the first epoch ended; nothing was saved")
    spec.metrics = {"split": "val", **(result.best_val or {}),
                    "training": {"precision": result.precision, "memory_format": result.memory_format,
                                 "epochs_run": result.epochs_run, "best_epoch": result.best_epoch}}

    checkpoint = Path(out)
    if distributed.is_main():  # under torchrun rank 0 writes (every rank ends with its model)
        checkpoint = Path(save_checkpoint(out, model.cpu(), spec))
        write_json_atomic(checkpoint / TRAINING_HISTORY_FILE, {
            "config": dict(vars(config)),
            **distributed.describe(config.batch_size),
            "dataset": {"format": index.format, "root": str(index.root), "split_seed": request.split_seed,
                        "options": request.option, "train_images": len(train_ds), "val_images": len(val_ds),
                        "size": list(size)},
            "torch_threads": request.threads or torch.get_num_threads(),
            "encoder_weights": encoder_weights,
            **{k: v for k, v in result.to_dict().items() if k != "val"},
        }, default=str)
    return TrainResult(
        checkpoint=str(checkpoint), epochs_run=result.epochs_run, best_epoch=result.best_epoch,
        stopped_early=result.stopped_early, stopped_by_user=result.stopped_by_user,
        seconds=round(result.seconds, 3), seconds_per_epoch=result.seconds_per_epoch, device=str(device),
        precision=result.precision, memory_format=result.memory_format,
        train_step_seconds=result.train_step_seconds, train_images=len(train_ds), val_images=len(val_ds),
        val=result.best_val, encoder_weights=encoder_weights,
    )


def _training_splits(
    request: TrainRequest,
) -> tuple[DatasetIndex, tuple[int, int], int, SegmentationDataset, SegmentationDataset]:
    """The request's dataset index, input size, channels and its train and val datasets (a
    named error for an empty split)."""
    from core.data.base import parse_size
    from core.data.dataset import SegmentationDataset
    from core.data.registry import load_index
    from core.train import EmptySplitError, distributed

    with distributed.main_first():  # under torchrun rank 0 generates a synthetic set before the others read it
        index = load_index(request.format, request.root, seed=request.split_seed, strict=request.strict,
                           **request.option)
    size = parse_size(request.size, index.default_size)
    in_channels = request.in_channels or index.native_channels
    train_ds = SegmentationDataset(index, "train", size, in_channels, augment=not request.no_augment,
                                   seed=request.seed, limit=request.limit)
    val_ds = SegmentationDataset(index, "val", size, in_channels, limit=request.limit)
    for name, dataset in (("train", train_ds), ("val", val_ds)):
        if len(dataset) == 0:
            raise EmptySplitError(
                f"the {name} split of {index.format} at {index.root} has no images; training needs "
                "images in both train and val (add images, or use a format with a seeded split)"
            )
    return index, size, in_channels, train_ds, val_ds


def _fit_config(request: TrainRequest, device: Any) -> TrainConfig:
    """The fit's TrainConfig from the request, checked."""
    from core.train import TrainConfig

    config = TrainConfig(
        epochs=request.epochs, batch_size=request.batch_size, lr=request.lr, weight_decay=request.weight_decay,
        schedule=request.schedule, patience=None if request.no_early_stop else request.patience,
        seed=request.seed, num_threads=request.threads, device=str(device),
        max_steps_per_epoch=request.max_steps_per_epoch, num_workers=request.workers,
        defect_share=request.defect_share, precision=request.precision,
    )
    config.validate()
    return config
