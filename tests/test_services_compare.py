"""core.services.compare: the Compare page's work without the page (request, result, cost, zip)."""

from __future__ import annotations

import dataclasses
import io
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

from core.compare import ComparisonError
from core.data.dataset import SegmentationDataset
from core.data.registry import load_index
from core.models.checkpoint import CheckpointMissingFileError, load_checkpoint, save_checkpoint
from core.models.zoo import ModelSpec, build_model
from core.pruning.methods import resolve_method
from core.pruning.step import prune_step, pruning_context
from core.services.compare import (
    COST_COLUMNS, CompareRequest, CompareRequestError, checkpoint_zip, cost_rows, run_compare,
)
from core.train import EmptySplitError, StopRequested, evaluate

CLASSES = ["background", "scratch", "inclusion", "patch"]
IMAGES = 6  # a seeded sample of the split: enough for two batches of predictions


@pytest.fixture(autouse=True)
def own_workspace(tmp_path, monkeypatch):
    """Predictions are cached in the workspace: each test predicts afresh."""
    monkeypatch.setenv("DEFECTPRUNE_WORKSPACE", str(tmp_path / "workspace"))


def saved(folder, classes=CLASSES, size=(64, 64), seed=0) -> str:
    torch.manual_seed(seed)
    spec = ModelSpec(classes=classes, input_size=size, in_channels=1, dataset_format="synthetic-steel")
    return str(save_checkpoint(folder, build_model(spec).eval(), spec))


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[str, str]:
    """An untrained 64 px baseline and a copy pruned by half (no fine-tuning), as the page test's."""
    folder = tmp_path_factory.mktemp("pair")
    before = saved(folder / "before")
    model = load_checkpoint(before).model
    batches = [(torch.randn(2, 1, 64, 64), torch.randint(0, 4, (2, 64, 64)))]
    step = prune_step(pruning_context(model, (64, 64), 1, batches, CLASSES), resolve_method("uniform-l1"), 0.5)
    spec = load_checkpoint(before).spec
    return before, str(save_checkpoint(folder / "after", model, spec, step.history))


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return load_index("synthetic-steel", str(tmp_path_factory.mktemp("synthetic")))


def request_for(before: str, after: str, **fields) -> CompareRequest:
    return CompareRequest(before=before, after=after, **{"max_images": IMAGES, **fields})


def test_the_numbers_are_what_evaluation_gives_for_each_model(pair, index):
    before, after = pair
    result = run_compare(request_for(before, after), index=index)
    compared = result.comparison
    dataset = SegmentationDataset(index, "val", (64, 64), 1, limit=IMAGES)
    assert len(compared.per_image) == len(dataset) == IMAGES
    for role, path in (("before", before), ("after", after)):
        expected = evaluate(load_checkpoint(path).model, dataset, class_names=CLASSES)
        assert getattr(compared, f"metrics_{role}").per_class_iou == pytest.approx(expected.metrics.per_class_iou)
        assert list(compared.per_class[f"iou_{role}"]) == pytest.approx(
            [expected.metrics.per_class_iou[c] for c in CLASSES], nan_ok=True)
        by_image = compared.per_image.set_index("index")[f"defect_miou {role}"].sort_index()
        assert list(by_image) == pytest.approx(list(expected.per_image["defect_miou"]), nan_ok=True)
    truth = np.stack([dataset.raw(i)[1] for i in range(len(dataset))])
    assert np.array_equal(compared.truth, truth) and compared.images.shape[0] == IMAGES
    changes = compared.per_image["change"].dropna().tolist()
    assert changes == sorted(changes)  # worst first
    assert not np.array_equal(compared.before, compared.after)  # half the channels cut changes masks


def test_the_result_gives_the_pages_tables_and_report(pair, index):
    before, after = pair
    result = run_compare(request_for(before, after, split="test"), index=index)
    compared = result.comparison
    listed = result.images_with(None)
    assert list(listed.columns) == ["index", "image", "defect_miou before", "defect_miou after", "change"]
    assert "/" not in "".join(listed["image"])  # file names, not paths
    with_scratch = result.images_with("scratch")
    assert set(with_scratch["index"]) == set(compared.per_image.loc[compared.per_image["present scratch"], "index"])
    changes = result.pixel_changes(0)
    assert list(changes["class"]) == ["all classes", *CLASSES[1:]]
    assert (changes["net"] == changes["gained"] - changes["lost"]).all()
    report = result.report(None)
    assert (report["before"], report["after"], report["split"], report["cost"]) == (before, after, "test", None)
    assert report["defect_miou"] == {"before": compared.metrics_before.defect_miou,
                                     "after": compared.metrics_after.defect_miou}
    assert [row["class"] for row in report["per_class"]] == CLASSES


def test_progress_rises_to_one_and_true_stops_the_comparison(pair, index, tmp_path, monkeypatch):
    before, after = pair
    heard: list[tuple[float, str]] = []
    run_compare(request_for(before, after), lambda f, m: heard.append((f, m)) and False, index=index)
    fractions = [f for f, _ in heard]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and 0 < fractions[0] < 1
    assert any("predicting with the before model" in m for _, m in heard)
    assert any("predicting with the after model" in m for _, m in heard)

    monkeypatch.setenv("DEFECTPRUNE_WORKSPACE", str(tmp_path / "another"))  # nothing cached: it predicts
    asked: list[str] = []

    def stop_while_predicting(fraction: float, message: str) -> bool:
        asked.append(message)
        return "predicting" in message

    with pytest.raises(StopRequested):
        run_compare(request_for(before, after), stop_while_predicting, index=index)
    assert "predicting with the before model" in asked[-1]  # the first batch's answer stopped it
    assert sum("predicting" in m for m in asked) == 1


def test_a_checkpoint_that_is_not_there_is_named(pair, tmp_path, index):
    before, _after = pair
    missing = str(tmp_path / "gone")
    with pytest.raises(CheckpointMissingFileError, match=f"checkpoint folder {missing} does not exist"):
        run_compare(request_for(before, missing), index=index)


def test_models_that_cannot_be_compared_are_refused_before_predicting(tmp_path, index):
    before = saved(tmp_path / "before")
    other = saved(tmp_path / "other", classes=["background", "crack"])
    with pytest.raises(ComparisonError, match="differ in classes"):
        run_compare(request_for(before, other), lambda f, m: pytest.fail(f"predicted: {m}"), index=index)


def test_a_split_with_no_images_is_named(pair, index):
    before, after = pair
    no_test = dataclasses.replace(index, samples=index.samples[index.samples["split"] != "test"])
    with pytest.raises(EmptySplitError, match="the test split of synthetic-steel has no images"):
        run_compare(request_for(before, after, split="test"), index=no_test)


@pytest.mark.parametrize("fields, expected", [
    ({"split": "valid"}, "split 'valid' is not one of train, val, test"),
    ({"max_images": 0}, "max_images must be a whole number of at least 1"),
    ({"after": ""}, "needs two checkpoint folders"),
])
def test_a_request_with_bad_values_is_refused_by_name(fields, expected):
    with pytest.raises(CompareRequestError, match=expected):
        CompareRequest(**{"before": "a", "after": "b", **fields})


def test_cost_rows_in_the_units_the_table_shows():
    row = {"checkpoint": "x", "macs": 2_000_000, "params": 500_000, "size_bytes": 2**21,
           "latency_torch_ms": 1.5, "latency_ort_ms": 0.5}
    table = cost_rows({"before": row, "after": {**row, "macs": 1_000_000}})
    assert list(table["model"]) == ["before", "after"]
    assert set(COST_COLUMNS) <= set(table.columns) and "macs" in table.columns  # the report keeps raw numbers
    assert table[["MACs (M)", "params (M)", "size (MiB)", "torch ms", "ONNX Runtime ms"]].iloc[1].tolist() == [
        1.0, 0.5, 2.0, 1.5, 0.5]
    assert isinstance(table, pd.DataFrame)


def test_the_checkpoint_zip_holds_the_checkpoint_files(pair):
    before, _after = pair
    with zipfile.ZipFile(io.BytesIO(checkpoint_zip(before))) as archive:
        names = set(archive.namelist())
    assert {"spec.json", "weights.safetensors"} <= names
