"""The training loop, on a tiny NEU-Seg-layout dataset written by the test itself."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

from core.data.dataset import SegmentationDataset
from core.data.registry import load_index
from core.train import (
    DeviceUnavailableError, InvalidTrainConfigError, Progress, SegmentationLoss, StopRequested,
    TrainConfig, class_weights_from_counts, evaluate, fit, resolve_device,
)

CLASSES = ["background", "inclusion", "patches", "scratches"]


def write_tiny_neu_seg(root: Path, per_class: dict[str, int] | None = None, size: int = 64, seed: int = 0) -> Path:
    """NEU-Seg layout with one defect per image: a dark blob (inclusion), a bright blob
    (patches) or a bright line (scratches) on a noisy grey background, easy to learn."""
    per_class = per_class or {"train": 3, "val": 1, "test": 1}
    rng = np.random.default_rng(seed)
    number = 0
    for split, count in per_class.items():
        (root / "img_dir" / split).mkdir(parents=True, exist_ok=True)
        (root / "ann_dir" / split).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            for cls in (1, 2, 3):
                image = rng.normal(128, 8, (size, size)).clip(0, 255).astype(np.uint8)
                mask = np.zeros((size, size), np.uint8)
                cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
                if cls == 3:
                    cv2.line(mask, (int(rng.integers(0, size // 4)), int(cy)),
                             (int(rng.integers(3 * size // 4, size)), int(cx)), 3, 3)
                else:
                    radius = int(rng.integers(size // 10, size // 5))
                    cv2.circle(mask, (int(cx), int(cy)), radius, cls, -1)
                image[mask == 1] = 40
                image[mask == 2] = 215
                image[mask == 3] = 190
                name = f"{number:06d}"
                cv2.imwrite(str(root / "img_dir" / split / f"{name}.jpg"), cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
                cv2.imwrite(str(root / "ann_dir" / split / f"{name}.png"), mask)
                number += 1
    return root


class TinySegNet(nn.Module):
    """A few convolutions: fast enough to run many epochs in a test."""

    def __init__(self, in_channels: int = 1, classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class OracleModel(nn.Module):
    """Reads the class map hidden in the image: logits = scale * one-hot(true class). The
    test sets ``scale`` to make the model perfect (+1) or always wrong (-1)."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.classes = classes
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = x[:, 0].round().long().clamp(0, self.classes - 1)
        onehot = nn.functional.one_hot(labels, self.classes).permute(0, 3, 1, 2).float()
        return self.scale * (2 * onehot - 1)


class MaskAsImage(torch.utils.data.Dataset):
    """The mask itself as the image, for the oracle."""

    def __init__(self, inner: SegmentationDataset):
        self.inner = inner
        self.index = inner.index
        self.samples = inner.samples

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        _, mask = self.inner[i]
        return mask[None].float(), mask


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory: pytest.TempPathFactory):
    root = write_tiny_neu_seg(tmp_path_factory.mktemp("neu"))
    return load_index("neu-seg", root)


def datasets(index, augment: bool = False):
    train = SegmentationDataset(index, "train", (64, 64), in_channels=1, augment=augment, seed=0)
    val = SegmentationDataset(index, "val", (64, 64), in_channels=1)
    return train, val


def tiny_config(**overrides) -> TrainConfig:
    base = dict(epochs=3, batch_size=3, lr=1e-2, patience=None, seed=0, device="cpu", num_threads=1)
    base.update(overrides)
    return TrainConfig(**base)


def test_loss_goes_down_on_unet(tiny_index):
    from core.models.zoo import ModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec(classes=CLASSES, in_channels=1, input_size=(64, 64)))
    train, val = datasets(tiny_index)
    result = fit(model, train, val, tiny_config(epochs=6, lr=3e-3))
    losses = [h["train_loss"] for h in result.history]
    assert result.epochs_run == 6
    assert losses[-1] < 0.7 * losses[0], losses
    assert {"epoch", "train_loss", "seconds", "val_defect_miou", "val_per_class_iou"} <= set(result.history[0])
    assert set(result.history[0]["val_per_class_iou"]) == set(CLASSES)
    assert result.best_metrics is not None
    assert result.best_metrics.defect_miou == max(h["val_defect_miou"] for h in result.history)


def test_seeded_runs_repeat_and_seeds_differ(tiny_index):
    train, val = datasets(tiny_index, augment=True)

    def run(seed: int) -> list[float]:
        torch.manual_seed(123)  # same initial weights; the fit seed drives order and augmentation
        return [h["train_loss"] for h in fit(TinySegNet(), train, val, tiny_config(seed=seed)).history]

    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert first != other


def test_progress_is_reported_and_can_stop_the_loop(tiny_index):
    train, val = datasets(tiny_index)
    model = TinySegNet()
    reports: list[Progress] = []
    snapshot: dict[str, torch.Tensor] = {}

    def callback(report: Progress) -> bool:
        reports.append(report)
        if report.phase == "epoch" and report.epoch == 1:
            snapshot.update({k: v.clone() for k, v in model.state_dict().items()})
        return report.phase == "train" and report.epoch == 2 and report.step == 2

    result = fit(model, train, val, tiny_config(epochs=5), progress=callback)
    assert result.stopped_by_user and not result.stopped_early
    assert result.epochs_run == 1 and result.best_epoch == 1
    train_reports = [r for r in reports if r.phase == "train"]
    epoch_reports = [r for r in reports if r.phase == "epoch"]
    assert len(epoch_reports) == 1 and epoch_reports[0].metric == result.history[0]["val_defect_miou"]
    assert [r.step for r in reports if r.phase == "validate"] == [1]  # 3 val images, batch 3
    assert [(r.epoch, r.step) for r in train_reports] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]
    assert all(r.steps == 3 and r.epochs == 5 for r in train_reports)
    assert train_reports[0].metric is None and train_reports[-1].metric is not None
    fractions = [r.fraction for r in train_reports]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(5 / 15)
    assert all(r.eta_seconds is not None and r.eta_seconds >= 0 for r in train_reports)
    # the weights are those of the best (only) validated epoch, not the two steps after it
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, snapshot[key])


def test_stop_requested_raised_inside_validation_stops(tiny_index):
    train, val = datasets(tiny_index)

    def callback(report: Progress) -> None:
        if report.phase == "validate" and report.epoch == 2:
            raise StopRequested()

    result = fit(TinySegNet(), train, val, tiny_config(epochs=4), progress=callback)
    assert result.stopped_by_user and result.epochs_run == 1


def test_early_stopping_restores_best_weights(tiny_index):
    index = tiny_index
    train, val = datasets(index)
    train, val = MaskAsImage(train), MaskAsImage(val)
    model = OracleModel()

    def callback(report: Progress) -> None:
        # last training step of each epoch, just before validation: perfect in epoch 2 only
        if report.phase == "train" and report.step == report.steps:
            with torch.no_grad():
                model.scale.fill_(1.0 if report.epoch == 2 else -1.0)

    result = fit(model, train, val, tiny_config(epochs=10, patience=2, lr=0.0, weight_decay=0.0),
                 progress=callback)
    assert result.stopped_early and not result.stopped_by_user
    assert result.epochs_run == 4  # best at 2, then 2 epochs without gain
    assert result.best_epoch == 2
    assert result.best_metrics.defect_miou == pytest.approx(100.0)
    assert [h["val_defect_miou"] for h in result.history] == pytest.approx([0.0, 100.0, 0.0, 0.0])
    assert model.scale.item() == 1.0


def test_evaluate_perfect_predictor_gives_100(tiny_index):
    _, val = datasets(tiny_index)
    result = evaluate(OracleModel(), MaskAsImage(val), "cpu", batch_size=2)
    assert result.metrics.defect_miou == pytest.approx(100.0)
    assert result.metrics.background_iou == pytest.approx(100.0)
    assert result.metrics.dice == pytest.approx(100.0)
    assert result.metrics.pixel_accuracy == pytest.approx(100.0)
    assert result.images == 3 and len(result.per_image) == 3
    assert result.per_image["image"].str.endswith(".jpg").all()
    assert (result.per_image["defect_miou"] == 100.0).all()


def test_evaluate_callback_can_stop(tiny_index):
    _, val = datasets(tiny_index)
    with pytest.raises(StopRequested):
        evaluate(TinySegNet(), val, "cpu", batch_size=1, progress=lambda r: r.step == 2)


def test_evaluate_and_predict_give_every_module_its_own_mode_back(tiny_index):
    from core.predictions import predict_split

    _, val = datasets(tiny_index)
    model = TinySegNet().train()
    model.body[1].eval()  # a frozen BatchNorm inside a training model stays frozen
    flags = [m.training for m in model.modules()]
    evaluate(model, val, "cpu", batch_size=2)
    assert [m.training for m in model.modules()] == flags
    predict_split(model, val, "cpu", batch_size=2)
    assert [m.training for m in model.modules()] == flags


def test_class_weights_and_loss():
    weights = class_weights_from_counts([900, 45, 10, 0], max_weight=10.0)
    # 900 / n: background 1, a 20 and b 90 clipped to 10, absent -> 10
    np.testing.assert_allclose(weights, [1.0, 10.0, 10.0, 10.0])
    np.testing.assert_allclose(class_weights_from_counts([500, 100, 250]), [1.0, 5.0, 2.0])
    # a rare defect never outweighs background by more than the clip (magnetic tile: < 1% defect)
    rare = class_weights_from_counts([99_000, 400, 300, 200, 100], max_weight=10.0)
    assert rare.max() / rare.min() == pytest.approx(10.0)
    loss = SegmentationLoss([1.0, 1.0, 1.0])
    target = torch.tensor([[[0, 1], [2, 0]]])
    perfect = 20 * (2 * nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() - 1)
    assert loss(perfect, target).item() < 1e-3
    assert loss(-perfect, target).item() > 1.0


def test_defect_images_make_at_least_the_asked_share_of_the_draws():
    from core.train import defect_sampling_weights

    # 3 defect images of 10 (magnetic tile is 3 in 10): drawn as often as the 7 clean ones
    per_image = np.zeros((10, 3), np.int64)
    per_image[:, 0] = 100
    per_image[[1, 4, 7], 2] = 5
    weights = defect_sampling_weights(per_image, 0.5)
    has_defect = per_image[:, 1:].sum(1) > 0
    assert weights[has_defect].sum() / weights.sum() == pytest.approx(0.5)
    draws = torch.multinomial(torch.as_tensor(weights), 20000, replacement=True,
                              generator=torch.Generator().manual_seed(0))
    assert has_defect[draws.numpy()].mean() == pytest.approx(0.5, abs=0.02)
    # nothing to change: already half or more defect images, none at all, or not asked
    assert defect_sampling_weights(per_image, 0.2) is None
    assert defect_sampling_weights(per_image[[0, 2, 3]], 0.5) is None
    assert defect_sampling_weights(per_image, None) is None


def test_bad_config_and_device():
    with pytest.raises(InvalidTrainConfigError, match="epochs"):
        TrainConfig(epochs=0).validate()
    with pytest.raises(InvalidTrainConfigError, match="defect share"):
        TrainConfig(defect_share=1.0).validate()
    with pytest.raises(InvalidTrainConfigError, match="schedule"):
        TrainConfig(schedule="step").validate()
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="no CUDA"):
            resolve_device("cuda")


def test_onecycle_schedule_runs_and_threads_are_restored(tiny_index):
    train, val = datasets(tiny_index)
    before = torch.get_num_threads()
    result = fit(TinySegNet(), train, None, tiny_config(epochs=2, schedule="onecycle",
                                                          num_threads=1 if before != 1 else 2))
    assert torch.get_num_threads() == before
    assert result.epochs_run == 2 and result.best_epoch == 2 and result.best_metrics is None


class DefectFree(torch.utils.data.Dataset):
    """The same images with every defect erased: a validation split without defects."""

    def __init__(self, inner: torch.utils.data.Dataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        image, mask = self.inner[i]
        return torch.zeros_like(image), torch.zeros_like(mask)


def test_defect_free_validation_counts_no_false_defect_as_best(tiny_index):
    train, val = datasets(tiny_index)
    model = OracleModel()

    def callback(report: Progress) -> None:
        # epoch 1 paints false defects everywhere; epoch 2 predicts background only, the
        # right answer on a split without defects, where defect mIoU is undefined (None)
        if report.phase == "train" and report.step == report.steps:
            with torch.no_grad():
                model.scale.fill_(-1.0 if report.epoch == 1 else 1.0)

    result = fit(model, MaskAsImage(train), DefectFree(val), tiny_config(epochs=4, patience=1, lr=0.0,
                 weight_decay=0.0), progress=callback, class_names=CLASSES)
    assert [h["val_defect_miou"] for h in result.history] == [0.0, None, None]
    assert result.best_epoch == 2 and result.stopped_early


def test_progress_bar_logs_one_line_per_epoch_without_a_terminal(tiny_index, capsys):
    from core.train import ProgressBar

    train, val = datasets(tiny_index)
    with ProgressBar("train tiny", disable=True) as bar:
        result = fit(TinySegNet(), train, val, tiny_config(epochs=2), progress=bar)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("train tiny: epoch 2/2 loss ")
    assert lines[1].endswith(f"val defect mIoU {result.history[1]['val_defect_miou']:.2f}")


class PlainConvNet(nn.Module):
    """Convolutions without BatchNorm: a student and its copy give the same logits in train
    and eval mode, so a distillation-only loss has nothing to teach."""

    def __init__(self, in_channels: int = 1, classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_precisions_train_and_hand_back_an_fp32_standard_layout_model(tiny_index, precision):
    train, val = datasets(tiny_index)
    torch.manual_seed(0)
    model = TinySegNet()
    result = fit(model, train, val, tiny_config(epochs=6, precision=precision))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.precision == precision and result.memory_format == "channels_last"
    assert result.to_dict()["precision"] == precision
    assert result.train_step_seconds > 0 and result.teacher_step_seconds is None
    for tensor in model.state_dict().values():
        assert tensor.dtype in (torch.float32, torch.int64)
        assert tensor.is_contiguous()  # channels_last was undone: safetensors and ONNX want this


def test_bf16_forward_passes_really_run_in_bf16(tiny_index):
    train, _ = datasets(tiny_index)
    seen: list[torch.dtype] = []
    model = TinySegNet()
    model.body[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    fit(model, train, None, tiny_config(epochs=1, precision="bf16"))
    fit(model, train, None, tiny_config(epochs=1, precision="fp32"))
    steps = len(seen) // 2
    assert set(seen[:steps]) == {torch.bfloat16} and set(seen[steps:]) == {torch.float32}


def test_auto_precision_follows_the_device():
    from core.precision import cpu_runs_bf16_fast, resolve_precision

    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_runs_bf16_fast() else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(InvalidTrainConfigError, match="precision"):
        TrainConfig(precision="fp16").validate()


def test_distillation_weight_zero_is_the_plain_loss_exactly(tiny_index):
    train, val = datasets(tiny_index)
    states = []
    for teacher in (None, TinySegNet()):
        torch.manual_seed(0)
        model = TinySegNet()
        result = fit(model, train, val, tiny_config(epochs=2, distill_weight=0.0), teacher=teacher)
        assert result.distill_weight == 0.0 and result.teacher_step_seconds is None
        states.append(model.state_dict())
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name


def test_distillation_from_an_identical_teacher_has_zero_loss_and_gradient(tiny_index):
    from core.train import distillation_loss

    logits = torch.randn(2, 4, 8, 8)
    assert distillation_loss(logits, logits.clone(), 2.0).item() == 0.0
    assert distillation_loss(logits, torch.randn(2, 4, 8, 8), 2.0).item() > 0.0
    # distillation alone (weight 1) from a copy of the student: the first step's loss (before
    # the optimiser moves anything) is zero, where the supervised loss is not
    train, _ = datasets(tiny_index)
    first_losses = []

    def first_step(report: Progress) -> None:
        if report.phase == "train" and report.epoch == 1 and report.step == 1:
            first_losses.append(report.loss)

    for weight in (1.0, 0.0):
        torch.manual_seed(0)
        student, teacher = PlainConvNet(), PlainConvNet()
        teacher.load_state_dict(student.state_dict())
        teacher.train()
        result = fit(student, train, None, tiny_config(epochs=1, distill_weight=weight), teacher=teacher,
                     progress=first_step)
        assert teacher.training  # its mode is put back
    assert first_losses[0] == pytest.approx(0.0, abs=1e-6) and first_losses[1] > 0.5
    assert result.teacher_step_seconds is None
    torch.manual_seed(0)
    result = fit(PlainConvNet(), train, None, tiny_config(epochs=1, distill_weight=0.5), teacher=PlainConvNet())
    assert result.distill_weight == 0.5 and result.teacher_step_seconds > 0


def test_a_stopped_distilled_fit_gives_the_teacher_its_modes_and_layout_back(tiny_index):
    train, _ = datasets(tiny_index)
    teacher = TinySegNet().train()
    teacher.body[1].eval()  # a frozen BatchNorm inside a training model stays frozen
    flags = [m.training for m in teacher.modules()]
    seen_in_fit = []

    def stop_at_first_step(report: Progress) -> bool:
        seen_in_fit.append(not any(m.training for m in teacher.modules()))
        return True

    result = fit(TinySegNet(), train, None, tiny_config(epochs=2, distill_weight=0.5), teacher=teacher,
                 progress=stop_at_first_step)
    assert result.stopped_by_user and seen_in_fit == [True]  # in eval mode while it teaches
    assert [m.training for m in teacher.modules()] == flags
    assert all(t.is_contiguous() for t in teacher.state_dict().values())


def test_distillation_and_schedule_settings_are_validated():
    with pytest.raises(InvalidTrainConfigError, match="distillation weight"):
        TrainConfig(distill_weight=1.5).validate()
    with pytest.raises(InvalidTrainConfigError, match="temperature"):
        TrainConfig(distill_temperature=0.0).validate()
    with pytest.raises(InvalidTrainConfigError, match="warm-up"):
        TrainConfig(warmup_fraction=1.0).validate()
    with pytest.raises(InvalidTrainConfigError, match="needs a teacher"):
        fit(TinySegNet(), [(torch.zeros(1, 8, 8), torch.zeros(8, 8, dtype=torch.long))], None,
            tiny_config(distill_weight=0.5), class_names=CLASSES)


def test_warm_up_climbs_then_the_cosine_falls():
    from core.train.schedule import make_scheduler

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1.0)
    scheduler = make_scheduler(optimizer, TrainConfig(lr=1.0, warmup_fraction=0.2), total_steps=50)
    rates = []
    for _ in range(50):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] < 0.2 and all(a < b for a, b in zip(rates[:10], rates[1:11]))  # 10 warm-up steps
    assert rates[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])) and rates[-1] < 0.05


def test_plateau_schedule_cuts_the_rate_before_the_early_stop(tiny_index):
    train, val = datasets(tiny_index)
    # min_delta no epoch can gain: every epoch after the first is a plateau epoch
    result = fit(TinySegNet(), train, val, tiny_config(
        epochs=20, schedule="plateau", patience=5, plateau_patience=2, plateau_factor=0.1, min_delta=1e6))
    rates = [round(r["lr"], 8) for r in result.history]
    assert rates == [1e-2, 1e-2, 1e-2, 1e-3, 1e-3, 1e-4]
    assert result.epochs_run == 6 and result.stopped_early and result.best_epoch == 1
    with pytest.raises(InvalidTrainConfigError, match="plateau factor"):
        tiny_config(schedule="plateau", plateau_factor=1.0).validate()
