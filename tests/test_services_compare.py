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
    NOT_FASTER, CompareRequest, CompareRequestError, amount, checkpoint_zip, compare_costs, run_compare,
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


def cost(macs: float, torch_ms: tuple[float, float, float], ort_ms: tuple[float, float, float]) -> dict:
    """A cost row as core.compare.cost_row gives it: latency as (median, p10, p90) per engine."""
    spread = lambda ms: dict(zip(("median_ms", "p10_ms", "p90_ms"), ms))  # noqa: E731
    return {"checkpoint": "x", "macs": macs, "params": macs / 100, "size_bytes": macs / 50,
            "latency_torch_ms": torch_ms[0], "latency_ort_ms": ort_ms[0],
            "latency": {"torch": spread(torch_ms), "onnxruntime": spread(ort_ms)}}


def test_the_cost_table_shows_change_speed_up_and_spread_in_plain_units():
    costs = compare_costs(cost(1.34e9, (32.5, 31.0, 34.0), (6.8, 6.5, 7.0)),
                          cost(2.68e8, (13.0, 12.5, 14.0), (3.4, 3.2, 3.6)))
    table = costs.table
    assert list(table.columns) == ["before", "after", "change", "speed-up"]
    assert list(table.index) == ["MACs", "parameters", "size on disk", "torch latency, median (p10-p90)",
                                 "ONNX Runtime latency, median (p10-p90)"]
    assert table.loc["MACs"].tolist() == ["1.34 G", "268.00 M", "-80.0%", ""]
    assert table.loc["parameters", "before"] == "13.40 M"
    assert table.loc["torch latency, median (p10-p90)"].tolist() == [
        "32.50 ms (31.00-34.00)", "13.00 ms (12.50-14.00)", "-60.0%", "2.50x"]
    assert table.loc["ONNX Runtime latency, median (p10-p90)", "speed-up"] == "2.00x"
    assert costs.not_faster == [] and costs.notes == []
    # the report keeps the raw numbers, spreads as columns
    assert costs.models["model"].tolist() == ["before", "after"]
    assert costs.models["macs"].tolist() == [1.34e9, 2.68e8]
    assert costs.models["latency_onnxruntime_p90_ms"].tolist() == [7.0, 3.6]


def test_an_engine_on_which_the_pruned_model_is_not_faster_is_flagged_with_a_note():
    clearly = compare_costs(cost(1e9, (32.5, 31.0, 34.0), (6.82, 6.7, 6.9)),
                            cost(2e8, (13.9, 13.0, 15.0), (7.58, 7.4, 7.8)))
    ort = clearly.table.loc["ONNX Runtime latency, median (p10-p90)"]
    assert ort["change"] == "+11.1%" and ort["speed-up"] == f"0.90x ⚠ {NOT_FASTER}"
    assert NOT_FASTER not in clearly.table.loc["torch latency, median (p10-p90)", "speed-up"]
    assert clearly.not_faster == ["ONNX Runtime"] and len(clearly.notes) == 1
    assert "not faster on ONNX Runtime: 6.82 -> 7.58 ms" in clearly.notes[0]
    assert "measure again" not in clearly.notes[0]  # the spreads do not overlap: no noise to blame
    noisy = compare_costs(cost(1e9, (10.0, 9.0, 14.0), (5.0, 4.0, 6.0)), cost(2e8, (10.5, 9.5, 13.0), (4.0, 3.0, 5.0)))
    assert noisy.not_faster == ["torch"] and "measure again" in noisy.notes[0]


def test_amounts_read_in_g_m_and_k():
    assert [amount(v) for v in (1.337e9, 2.68e8, 5e5, 1_500, 12)] == ["1.34 G", "268.00 M", "500.00 k", "1.50 k",
                                                                    "12"]


def test_the_checkpoint_zip_holds_the_checkpoint_files(pair):
    before, _after = pair
    with zipfile.ZipFile(io.BytesIO(checkpoint_zip(before))) as archive:
        names = set(archive.namelist())
    assert {"spec.json", "weights.safetensors"} <= names
