"""Training, fine-tuning and evaluation, each reporting `Progress` to a callback that can
stop the loop.

- ``config``: `TrainConfig`, the settings of one fit, validated in one place;
- ``loop``: `fit` / `fine_tune` and their `TrainResult`;
- ``loss``: the class-balanced segmentation loss and the distillation term;
- ``schedule``: the learning-rate schedules;
- ``evaluation``: `evaluate`, a model's metrics on a whole split;
- ``datasets``: what training reads off a dataset (class names, pixel counts, draw weights);
- ``progress``: `Progress`, `StopRequested` and the command line's `ProgressBar`;
- ``device``: the device, torch's CPU threads and the seeds (precision is core.precision's).
"""

from core.train.config import SCHEDULES, InvalidTrainConfigError, TrainConfig
from core.train.datasets import (
    EmptySplitError, base_dataset, class_pixel_counts, dataset_class_names, dataset_image_paths,
    defect_sampling_weights, image_pixel_counts,
)
from core.train.device import DeviceUnavailableError, TorchThreads, resolve_device, seed_everything
from core.train.evaluation import evaluate
from core.train.loop import TrainingDivergedError, TrainResult, fine_tune, fit
from core.train.loss import SegmentationLoss, class_weights_from_counts, distillation_loss
from core.train.progress import Progress, ProgressBar, ProgressCallback, StopRequested, report_progress

__all__ = [
    "SCHEDULES", "DeviceUnavailableError", "EmptySplitError", "InvalidTrainConfigError", "Progress", "ProgressBar",
    "ProgressCallback", "SegmentationLoss", "StopRequested", "TorchThreads", "TrainConfig", "TrainResult",
    "TrainingDivergedError", "base_dataset", "class_pixel_counts", "class_weights_from_counts",
    "dataset_class_names", "dataset_image_paths", "defect_sampling_weights", "distillation_loss", "evaluate",
    "fine_tune", "fit", "image_pixel_counts", "report_progress", "resolve_device", "seed_everything",
]
