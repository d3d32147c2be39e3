"""`python -m core train` and `evaluate` end to end, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from test_train import CLASSES, write_tiny_neu_seg

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"defect_miou", "per_class_iou", "background_iou", "dice", "pixel_accuracy"}


def core(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    for needle in needles:
        assert needle in lines[0]


def assert_percentages(metrics: dict) -> None:
    for key in ("defect_miou", "background_iou", "dice", "pixel_accuracy"):
        assert 0.0 <= metrics[key] <= 100.0, (key, metrics[key])
    assert set(metrics["per_class_iou"]) == set(CLASSES)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = write_tiny_neu_seg(tmp_path_factory.mktemp("neu"))
    out = tmp_path_factory.mktemp("ckpt") / "unet"
    proc = core("train", "--format", "neu-seg", "--root", str(root), "--arch", "unet",
                "--encoder", "resnet18", "--size", "64", "--epochs", "2", "--batch-size", "3",
                "--seed", "0", "--threads", "1", "--device", "cpu", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    return root, out, json.loads(proc.stdout)


def test_train_writes_checkpoint_and_reports_val(trained):
    root, out, payload = trained
    assert Path(payload["checkpoint"]).resolve() == out.resolve()
    assert payload["epochs_run"] == 2
    assert payload["train_images"] == 9 and payload["val_images"] == 3
    assert METRIC_KEYS <= set(payload["val"])
    assert_percentages(payload["val"])
    history = json.loads((out / "training_history.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [1, 2]

    from core.models.checkpoint import load_checkpoint

    spec = load_checkpoint(out).spec
    assert spec.dataset_format == "neu-seg"
    assert Path(spec.dataset_root) == root.resolve()
    assert spec.split_seed == 0 and tuple(spec.input_size) == (64, 64) and spec.in_channels == 1
    assert spec.metrics["defect_miou"] == pytest.approx(payload["val"]["defect_miou"])
    from core.precision import resolve_precision

    assert payload["precision"] == resolve_precision("auto", "cpu")  # the default, resolved on this machine
    assert spec.metrics["training"] == {"precision": payload["precision"], "memory_format": "channels_last",
                                        "epochs_run": 2, "best_epoch": payload["best_epoch"]}


def test_evaluate_uses_spec_defaults_and_matches_training(trained, tmp_path):
    _root, out, payload = trained
    csv = tmp_path / "per_image.csv"
    proc = core("evaluate", "--checkpoint", str(out), "--split", "val", "--threads", "1",
                "--device", "cpu", "--per-image", str(csv), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert METRIC_KEYS | {"images"} <= set(result)
    assert result["format"] == "neu-seg" and result["size"] == [64, 64] and result["images"] == 3
    assert_percentages(result)
    # the saved weights are the best validated ones: evaluating them on val gives the same numbers
    assert result["defect_miou"] == pytest.approx(payload["val"]["defect_miou"], abs=1e-6)
    assert result["pixel_accuracy"] == pytest.approx(payload["val"]["pixel_accuracy"], abs=1e-6)
    table = pd.read_csv(csv)
    assert len(table) == 3 and {"image", "defect_miou", "iou scratches", "present scratches"} <= set(table)


def test_evaluate_test_split_and_size(trained, capsys):
    root, out, _ = trained
    # the documented form, dataset named on the command line
    proc = in_process(capsys, "evaluate", "--checkpoint", str(out), "--format", "neu-seg", "--root", str(root),
                      "--split", "test", "--size", "96x64", "--threads", "1", "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["split"] == "test" and result["size"] == [96, 64] and result["images"] == 3
    limited = in_process(capsys, "evaluate", "--checkpoint", str(out), "--limit", "2", "--device", "cpu", "--json")
    assert limited.returncode == 0, limited.stderr
    assert json.loads(limited.stdout)["images"] == 2


def test_corrupt_image_is_one_line_error(tmp_path):
    root = write_tiny_neu_seg(tmp_path / "neu", {"train": 1, "val": 1})
    (root / "img_dir" / "train" / "000001.jpg").write_bytes(b"not a jpeg")
    proc = core("train", "--format", "neu-seg", "--root", str(root), "--size", "64", "--epochs", "1",
                "--out", str(tmp_path / "ckpt"), "--device", "cpu", "--json")
    assert_one_line_error(proc, "000001.jpg")
    assert not (tmp_path / "ckpt").exists()


def in_process(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """`core.cli.main` in this process (no interpreter start-up): same exit code and stderr."""
    from core.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def test_missing_val_split_is_one_line_error(tmp_path, capsys):
    root = write_tiny_neu_seg(tmp_path / "neu", {"train": 1})
    proc = in_process(capsys, "train", "--format", "neu-seg", "--root", str(root), "--size", "64",
                      "--epochs", "1", "--out", str(tmp_path / "ckpt"), "--device", "cpu")
    assert_one_line_error(proc, "val split")


def test_bad_arguments_are_one_line_errors(trained, tmp_path, capsys):
    root, out, _ = trained
    assert_one_line_error(in_process(capsys, "evaluate", "--checkpoint", str(out), "--size", "70",
                                     "--device", "cpu"), "multiples of 32")
    assert_one_line_error(in_process(capsys, "train", "--format", "neu-seg", "--root", str(tmp_path / "nowhere"),
                                     "--out", str(tmp_path / "x"), "--device", "cpu"), "does not exist")
    assert_one_line_error(in_process(capsys, "evaluate", "--checkpoint", str(tmp_path / "no-checkpoint"),
                                     "--device", "cpu"), "does not exist")
    not_a_checkpoint = tmp_path / "busy"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "notes.txt").write_text("mine")
    assert_one_line_error(in_process(capsys, "train", "--format", "neu-seg", "--root", str(root), "--size", "64",
                                     "--out", str(not_a_checkpoint), "--device", "cpu"), "not a checkpoint")
    if not torch.cuda.is_available():
        assert_one_line_error(in_process(capsys, "evaluate", "--checkpoint", str(out), "--device", "cuda"), "CUDA")
    bad_epochs = in_process(capsys, "train", "--format", "neu-seg", "--root", str(root), "--epochs", "0",
                            "--out", str(tmp_path / "y"))
    assert_one_line_error(bad_epochs, "--epochs", "must be at least 1")
    assert bad_epochs.returncode == 2
    assert_one_line_error(in_process(capsys, "export-onnx", "--checkpoint", str(out), "--out",
                                     str(tmp_path / "m.onnx"), "--opset", "9"), "--opset", "17 to 20")
    assert_one_line_error(in_process(capsys, "profile", "--checkpoint", str(out), "--threads", "0"), "--threads")
    # a place that cannot be written (a file stands where the folder should be): one line
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    assert_one_line_error(in_process(capsys, "export-onnx", "--checkpoint", str(out), "--out",
                                     str(blocker / "m.onnx")), "a-file")
    assert blocker.read_text() == "mine"


def test_prediction_cache(trained, tmp_path):
    from core.data.dataset import SegmentationDataset
    from core.data.registry import load_index
    from core.metrics import ConfusionMatrix, SegmentationMetrics
    from core.models.checkpoint import load_checkpoint
    from core.predictions import cached_predictions, load_predictions
    from core.train import evaluate

    root, out, _ = trained
    index = load_index("neu-seg", root)
    dataset = SegmentationDataset(index, "test", (64, 64), in_channels=1)
    first = cached_predictions(out, dataset, device="cpu", workspace=tmp_path)
    assert not first.from_cache
    assert first.masks.shape == (3, 64, 64) and first.masks.dtype == np.uint8
    assert first.path.parent == tmp_path / "predictions" and first.path.suffix == ".npz"
    assert first.image_paths == list(dataset.samples["image"])
    with np.load(first.path, allow_pickle=False) as data:
        np.testing.assert_array_equal(data["masks"], first.masks)
    again = cached_predictions(out, dataset, device="cpu", workspace=tmp_path)
    assert again.from_cache and again.key == first.key
    np.testing.assert_array_equal(again.masks, first.masks)

    # the cached masks are the model's: scoring them gives evaluate's numbers
    model = load_checkpoint(out).model
    targets = np.stack([dataset[i][1].numpy() for i in range(len(dataset))])
    from_masks = SegmentationMetrics.from_confusion(ConfusionMatrix(4).update(first.masks, targets), CLASSES)
    assert from_masks.defect_miou == pytest.approx(evaluate(model, dataset, "cpu").metrics.defect_miou)

    # another input size or split is another key; a damaged file is recomputed
    other = cached_predictions(out, SegmentationDataset(index, "test", (96, 64), in_channels=1),
                               model=model, workspace=tmp_path)
    assert other.key != first.key and other.masks.shape == (3, 96, 64)
    assert cached_predictions(out, SegmentationDataset(index, "val", (64, 64), in_channels=1),
                              model=model, workspace=tmp_path).key != first.key
    first.path.write_bytes(b"damaged")
    assert load_predictions(first.path) is None
    repaired = cached_predictions(out, dataset, model=model, workspace=tmp_path)
    assert not repaired.from_cache
    np.testing.assert_array_equal(repaired.masks, first.masks)
    assert not list((tmp_path / "predictions").glob("*.tmp"))


def test_limit_draws_from_the_whole_split(tmp_path):
    from core.data.dataset import SegmentationDataset
    from core.data.registry import load_index

    index = load_index("synthetic-metal", tmp_path, num_images=60, image_size=64)
    full = SegmentationDataset(index, "train")
    picked = SegmentationDataset(index, "train", limit=10)
    rows = [full.samples.index[full.samples["image"] == p][0] for p in picked.samples["image"]]
    assert len(picked) == 10 and rows == sorted(set(rows)) and max(rows) >= len(full) // 2
    assert list(SegmentationDataset(index, "train", limit=10).samples["image"]) == list(picked.samples["image"])
    other = load_index("synthetic-metal", tmp_path, seed=1, num_images=60, image_size=64)
    assert set(SegmentationDataset(other, "train", limit=10).samples["image"]) != set(picked.samples["image"])
    assert len(SegmentationDataset(index, "train", limit=1000)) == len(full)


def test_later_commands_run_a_checkpoint_on_the_format_options_it_was_trained_with(tmp_path, capsys):
    """A model trained on a small synthetic set (--option) is evaluated on that set, not on the
    family's default one, unless the command names other options."""
    from core.models.checkpoint import read_spec

    options = ["--option", "num_images=24", "--option", "image_size=32"]
    out = tmp_path / "ck"
    trained = in_process(capsys, "train", "--format", "synthetic-steel", "--root", str(tmp_path / "synth"), *options,
                         "--size", "32", "--epochs", "1", "--batch-size", "4", "--no-early-stop", "--out", str(out))
    assert trained.returncode == 0, trained.stderr
    assert read_spec(out).dataset_options == {"num_images": 24, "image_size": 32}
    evaluated = in_process(capsys, "evaluate", "--checkpoint", str(out), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    val = json.loads(evaluated.stdout)["images"]
    assert [p.name for p in (tmp_path / "synth").iterdir()] == ["steel-32px-n24-s0"]  # no default set generated
    other = in_process(capsys, "evaluate", "--checkpoint", str(out), "--option", "num_images=48",
                       "--option", "image_size=32", "--json")
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout)["images"] > val  # the options named win
