"""core.services.compare: the Compare page's work without the page (request, result, cost, zip)."""

from __future__ import annotations

import dataclasses
import io
import zipfile

import numpy as np
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
    assert list(table.index) == ["MACs", "parameters", "size on disk", "fp32 torch latency, median (p10-p90)",
                                 "fp32 ONNX Runtime latency, median (p10-p90)"]
    assert table.loc["MACs"].tolist() == ["1.34 G", "268.00 M", "-80.0%", ""]
    assert table.loc["parameters", "before"] == "13.40 M"
    assert table.loc["fp32 torch latency, median (p10-p90)"].tolist() == [
        "32.50 ms (31.00-34.00)", "13.00 ms (12.50-14.00)", "-60.0%", "2.50x"]
    assert table.loc["fp32 ONNX Runtime latency, median (p10-p90)", "speed-up"] == "2.00x"
    assert costs.not_faster == [] and costs.notes == []
    # the report keeps the raw numbers, spreads as columns
    assert costs.models["model"].tolist() == ["before", "after"]
    assert costs.models["macs"].tolist() == [1.34e9, 2.68e8]
    assert costs.models["latency_onnxruntime_p90_ms"].tolist() == [7.0, 3.6]


def test_an_engine_on_which_the_pruned_model_is_not_faster_is_flagged_with_a_note():
    clearly = compare_costs(cost(1e9, (32.5, 31.0, 34.0), (6.82, 6.7, 6.9)),
                            cost(2e8, (13.9, 13.0, 15.0), (7.58, 7.4, 7.8)))
    ort = clearly.table.loc["fp32 ONNX Runtime latency, median (p10-p90)"]
    assert ort["change"] == "+11.1%" and ort["speed-up"] == f"0.90x ⚠ {NOT_FASTER}"
    assert NOT_FASTER not in clearly.table.loc["fp32 torch latency, median (p10-p90)", "speed-up"]
    assert clearly.not_faster == ["fp32 ONNX Runtime"] and len(clearly.notes) == 1
    assert "not faster on fp32 ONNX Runtime: 6.82 -> 7.58 ms" in clearly.notes[0]
    assert "measure again" not in clearly.notes[0]  # the spreads do not overlap: no noise to blame
    noisy = compare_costs(cost(1e9, (10.0, 9.0, 14.0), (5.0, 4.0, 6.0)), cost(2e8, (10.5, 9.5, 13.0), (4.0, 3.0, 5.0)))
    assert noisy.not_faster == ["fp32 torch"] and "measure again" in noisy.notes[0]


def test_amounts_read_in_g_m_and_k():
    assert [amount(v) for v in (1.337e9, 2.68e8, 5e5, 1_500, 12)] == ["1.34 G", "268.00 M", "500.00 k", "1.50 k",
                                                                    "12"]


def test_the_checkpoint_zip_holds_the_checkpoint_files(pair):
    before, _after = pair
    with zipfile.ZipFile(io.BytesIO(checkpoint_zip(before))) as archive:
        names = set(archive.namelist())
    assert {"spec.json", "weights.safetensors"} <= names


# ---------------------------------------------------------------- the INT8 step
def int8_row(fp32_ms: tuple[float, float, float], int8_ms: tuple[float, float, float], fp32_miou: float,
             int8_miou: float, size: float) -> dict:
    """A row of core.quantize.int8_cost_rows as the INT8 step gives it."""
    spread = lambda ms: dict(zip(("median_ms", "p10_ms", "p90_ms"), ms))  # noqa: E731
    return {"checkpoint": "x", "size_bytes_onnx": size, "size_bytes_int8": size / 4, "latency_int8_ms": int8_ms[0],
            "defect_miou_onnx": fp32_miou, "defect_miou_int8": int8_miou,
            "latency": {"onnxruntime": spread(fp32_ms), "onnxruntime_int8": spread(int8_ms)}}


def test_the_int8_step_adds_its_engine_sizes_and_accuracy_and_flags_an_int8_file_that_is_not_faster():
    int8 = {"split": "val", "images": 12,
            "before": int8_row((6.0, 5.8, 6.2), (3.0, 2.9, 3.1), 40.0, 39.5, 2**22),
            "after": int8_row((2.0, 1.9, 2.1), (2.4, 2.3, 2.5), 38.0, 36.25, 2**20)}
    costs = compare_costs(cost(1e9, (30.0, 29.0, 31.0), (6.8, 6.5, 7.0)), cost(2e8, (13.0, 12.5, 14.0), (3.4, 3.2, 3.6)),
                          int8=int8)
    table = costs.table
    assert list(table.index) == [
        "MACs", "parameters", "size on disk", "fp32 ONNX size", "INT8 ONNX size",
        "fp32 torch latency, median (p10-p90)", "fp32 ONNX Runtime latency, median (p10-p90)",
        "INT8 ONNX Runtime latency, median (p10-p90)", "INT8 speed-up over fp32 ONNX Runtime",
        "defect mIoU, fp32 ONNX Runtime (val, 12 images)", "defect mIoU, INT8 ONNX Runtime (val, 12 images)",
        "INT8 defect mIoU change from fp32"]
    assert table.loc["INT8 ONNX size"].tolist()[:3] == ["1.00 MiB", "0.25 MiB", "-75.0%"]
    # fp32 ONNX Runtime is the INT8 step's timing (in turns with the INT8 files), torch the page's own
    assert table.loc["fp32 ONNX Runtime latency, median (p10-p90)", "before"] == "6.00 ms (5.80-6.20)"
    assert table.loc["fp32 torch latency, median (p10-p90)", "before"] == "30.00 ms (29.00-31.00)"
    assert table.loc["INT8 ONNX Runtime latency, median (p10-p90)"].tolist() == [
        "3.00 ms (2.90-3.10)", "2.40 ms (2.30-2.50)", "-20.0%", "1.25x"]
    assert table.loc["INT8 speed-up over fp32 ONNX Runtime"].tolist()[:2] == ["2.00x", f"0.83x ⚠ {NOT_FASTER}"]
    assert costs.int8_not_faster == ["after"] and costs.not_faster == []
    assert len(costs.notes) == 1 and "after model's INT8 file is not faster than its fp32 file" in costs.notes[0]
    assert "2.00 -> 2.40 ms" in costs.notes[0] and "measure again" not in costs.notes[0]
    assert table.loc["defect mIoU, INT8 ONNX Runtime (val, 12 images)"].tolist()[:3] == ["39.50", "36.25", "-3.25 pts"]
    assert table.loc["INT8 defect mIoU change from fp32"].tolist()[:2] == ["-0.50 pts", "-1.75 pts"]
    assert costs.models["defect_miou_int8"].tolist() == [39.5, 36.25]  # the report keeps the raw numbers
    assert costs.models["latency_onnxruntime_int8_median_ms"].tolist() == [3.0, 2.4]


def test_the_int8_steps_numbers_are_what_onnx_runtime_gives_for_the_quantised_files(pair, index, tmp_path):
    """run_int8_cost's defect mIoU of each INT8 file equals evaluate_onnx on that model quantised
    again the same way (same export, same seeded calibration images) and scored on the split the
    comparison predicts; its fp32 file's equals evaluate_onnx on the fp32 export."""
    from core.profile import export_onnx
    from core.quantize import INT8_ENGINE, checkpoint_dataset, evaluate_onnx, quantize_onnx
    from core.services.compare_int8 import Int8CostRequest, run_int8_cost

    before, after = pair
    request = Int8CostRequest.for_comparison(request_for(before, after), calibration_images=3, calibration_seed=5,
                                             runs=2)
    heard: list[tuple[float, str]] = []
    measured = run_int8_cost(request, lambda f, m: heard.append((f, m)) and False, index=index)
    assert (measured["split"], measured["images"], measured["calibration_images"]) == ("val", IMAGES, 3)
    fractions = [f for f, _ in heard]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("calibrating INT8 on 3 training images" in m for _, m in heard)
    assert any("scoring the INT8 file" in m for _, m in heard)
    for role, path in (("before", before), ("after", after)):
        loaded = load_checkpoint(path)
        scored = SegmentationDataset(index, "val", (64, 64), 1, limit=IMAGES)
        calibration = checkpoint_dataset(index, "train", (64, 64), loaded.spec)
        fp32 = export_onnx(loaded.model, tmp_path / f"{role}.onnx", (64, 64), 1)
        int8 = quantize_onnx(fp32, tmp_path / f"{role}.int8.onnx", calibration, images=3, seed=5).path
        row = measured[role]
        assert row["defect_miou_int8"] == pytest.approx(evaluate_onnx(int8, scored, CLASSES).metrics.defect_miou)
        assert row["defect_miou_onnx"] == pytest.approx(evaluate_onnx(fp32, scored, CLASSES).metrics.defect_miou)
        assert row["size_bytes_int8"] == int8.stat().st_size < 0.5 * row["size_bytes_onnx"]
        spread = row["latency"][INT8_ENGINE]
        assert 0 < spread["p10_ms"] <= spread["median_ms"] <= spread["p90_ms"]


def test_the_int8_step_stops_when_asked_and_refuses_models_that_cannot_be_compared(pair, index, tmp_path):
    from core.services.compare_int8 import Int8CostRequest, run_int8_cost

    before, after = pair
    request = Int8CostRequest.for_comparison(request_for(before, after), calibration_images=2, runs=1)
    with pytest.raises(StopRequested):
        run_int8_cost(request, lambda f, m: "calibrating" in m, index=index)
    other = saved(tmp_path / "other", classes=["background", "crack"])
    with pytest.raises(ComparisonError, match="differ in classes"):
        run_int8_cost(Int8CostRequest.for_comparison(request_for(before, other)), index=index)
