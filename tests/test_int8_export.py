"""INT8 export (issue 17, ship to the edge): the file ONNX Runtime's static quantiser makes runs
in ONNX Runtime, holds QuantizeLinear/DequantizeLinear nodes with per-channel weight scales and
the fp32 export's metadata, is smaller than fp32; its accuracy is scored with ONNX Runtime by the
same confusion-matrix metric as torch evaluation (checked on the fp32 file, whose logits are the
torch model's); bad calibration settings are named ParameterErrors. Tiny models (64 px, random
weights: the accuracy goal is a benchmark figure, bench/deploy.py, not an assertion here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch_pruning as tp

from core.cli import main as cli_main
from core.data.registry import load_index
from core.models.checkpoint import save_checkpoint
from core.models.groups import classifier_layers
from core.models.runtime import example_input
from core.models.zoo import ModelSpec, build_model
from core.profile import export_onnx, onnx_metadata, onnx_session
from core.quantize import INT8_ENGINE, checkpoint_dataset, evaluate_onnx, int8_cost_rows, quantize_onnx
from core.services.export import ExportRequest, onnx_metadata_for, run_export
from core.services.request import ParameterError
from core.train import evaluate

SIZE = (64, 64)
CLASSES = ["background", "scratch", "inclusion", "patch"]  # synthetic-steel's
OPTIONS = {"num_images": 30, "image_size": 64}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("int8-data")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A random Unet-resnet18 at 64 px whose spec names a tiny synthetic dataset (the options
    are not in a spec: each request gives them, as a job takes them from the store)."""
    spec = ModelSpec(classes=CLASSES, in_channels=1, input_size=SIZE, dataset_format="synthetic-steel",
                     dataset_root=str(data_root))
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("int8-ck") / "tiny", build_model(spec), spec)


def request(checkpoint: Path, out: Path, **settings) -> ExportRequest:
    return ExportRequest(checkpoint=str(checkpoint), out=str(out), int8=True, option=dict(OPTIONS), **settings)


@pytest.fixture(scope="module")
def profiled(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """The export job's run: INT8 file, profile, accuracy and latency of fp32 and INT8."""
    out = tmp_path_factory.mktemp("int8-job") / "model.onnx"
    return run_export(request(checkpoint, out, calibration_images=6, calibration_seed=3, runs=3, warmup=1,
                              threads=1, no_profile=False))


def test_the_int8_file_runs_holds_qdq_nodes_per_channel_scales_and_the_metadata(profiled, checkpoint: Path,
                                                                                  tmp_path: Path) -> None:
    path = Path(profiled.path)
    proto = onnx.load(str(path))
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 10 and ops.count("DequantizeLinear") >= 10
    # per-channel weights: some DequantizeLinear reads a scale vector (one per output channel)
    initializers = {t.name: t for t in proto.graph.initializer}
    scale_lengths = [int(np.prod(initializers[n.input[1]].dims)) for n in proto.graph.node
                     if n.op_type == "DequantizeLinear" and n.input[1] in initializers]
    assert max(scale_lengths) >= 16
    # integer weights: most of the file's weight bytes are int8
    int8_bytes = sum(len(t.raw_data) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8)
    assert int8_bytes > 0.7 * path.stat().st_size

    session = onnx_session(path)
    batch = example_input(SIZE, 1, batch=3).numpy()
    logits = session.run(None, {session.get_inputs()[0].name: batch})[0]
    assert logits.shape == (3, len(CLASSES), *SIZE) and np.isfinite(logits).all()

    # the fp32 export's metadata, plus how it was quantised
    fp32 = export_onnx(build_model(ModelSpec(classes=CLASSES, in_channels=1, input_size=SIZE)), tmp_path / "f.onnx",
                       SIZE, 1)
    meta = onnx_metadata(path)
    from core.models.checkpoint import load_checkpoint

    spec = load_checkpoint(checkpoint).spec
    quantization = json.loads(meta.pop("quantization"))
    assert meta == onnx_metadata_for(spec, SIZE, pruned=False)
    assert quantization["format"] == "QDQ" and quantization["preprocessed"] is True
    assert (quantization["calibration_images"], quantization["calibration_seed"]) == (6, 3)
    assert quantization["calibration_split"] == "train" and quantization["calibration_dataset"] == "synthetic-steel"
    # a quarter of fp32, give or take the graph
    assert profiled.size_bytes == path.stat().st_size < 0.35 * fp32.stat().st_size
    assert profiled.int8["fp32_size_bytes"] > 3 * profiled.size_bytes


def test_the_export_job_reports_int8_accuracy_latency_and_size_beside_fp32(profiled) -> None:
    report = profiled.to_json()["int8"]
    assert report["split"] == "test" and report["images"] >= 2
    miou = report["defect_miou"]
    assert set(miou) == {"onnxruntime", INT8_ENGINE} and all(0 <= v <= 100 for v in miou.values())
    assert report["defect_miou_drop"] == pytest.approx(miou["onnxruntime"] - miou[INT8_ENGINE])
    for engine in ("onnxruntime", INT8_ENGINE):
        spread = report["latency"][engine]
        assert 0 < spread["p10_ms"] <= spread["median_ms"] <= spread["p90_ms"]
    assert report["speedup"] == pytest.approx(report["latency"]["onnxruntime"]["median_ms"]
                                              / report["latency"][INT8_ENGINE]["median_ms"])
    assert profiled.profile["int8"] is profiled.int8  # profile.json carries it too
    assert set(profiled.profile["latency_ms"]) == {"torch", "onnxruntime"}


def test_onnx_accuracy_is_the_torch_evaluation_metric(checkpoint: Path, data_root: Path, tmp_path: Path) -> None:
    """The fp32 file computes the torch model's logits (to rounding), so scored by
    `evaluate_onnx` it must give torch evaluation's confusion matrix and defect mIoU."""
    from core.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    index = load_index("synthetic-steel", data_root, **OPTIONS)
    images = checkpoint_dataset(index, "train", SIZE, loaded.spec)
    fp32 = export_onnx(loaded.model, tmp_path / "model.onnx", SIZE, 1)
    by_torch = evaluate(loaded.model, images, batch_size=4, class_names=CLASSES)
    by_onnx = evaluate_onnx(fp32, images, CLASSES, batch_size=3)
    assert (by_torch.confusion.sum(axis=0) > 0).sum() >= 2  # more than one class predicted: a real comparison
    assert np.abs(by_onnx.confusion - by_torch.confusion).sum() <= 0.001 * by_torch.confusion.sum()
    assert by_onnx.metrics.defect_miou == pytest.approx(by_torch.metrics.defect_miou, abs=0.05)
    assert len(by_onnx.per_image) == len(images)
    # an INT8 copy is scored the same way
    int8 = quantize_onnx(fp32, tmp_path / "model.int8.onnx", images, images=4).path
    scored = evaluate_onnx(int8, images, CLASSES, per_image=False).metrics
    assert scored.pixels == by_torch.metrics.pixels and scored.defect_miou is not None


@pytest.mark.parametrize("settings, says", [
    ({"calibration_images": 0}, "--calibration-images: 0 calibration images: use 1 to 512"),
    ({"calibration_images": 100000}, "use 1 to 512"),
    ({"calibration_seed": -1}, "--calibration-seed: -1 must be from 0"),
    ({"int8": False, "calibration_images": 8}, "--calibration-images: calibration settings only apply with --int8"),
    ({"int8": False, "calibration_seed": 1}, "--calibration-seed: calibration settings only apply with --int8"),
])
def test_bad_calibration_settings_are_named_parameter_errors(settings: dict, says: str) -> None:
    values = {"checkpoint": "ck", "out": "x.onnx", "int8": True, **settings}
    with pytest.raises(ParameterError, match=re.escape(says)):
        ExportRequest(**values)


def test_an_earlier_export_counts_as_the_same_file_only_with_the_same_calibration(tmp_path: Path) -> None:
    """The Compare page offers an earlier export instead of exporting again only where it wrote
    the file asked for: an INT8 file calibrated on another dataset or other images is not it."""
    int8 = ExportRequest(checkpoint=str(tmp_path / "ck"), int8=True, format="synthetic-steel",
                         root=str(tmp_path / "data"), option={"num_images": 24})
    same = [ExportRequest(checkpoint=str(tmp_path / "x" / ".." / "ck"), int8=True, format="synthetic-steel",
                          root=str(tmp_path / "data"), option={"num_images": 24}, no_profile=True, runs=3),
            ExportRequest(checkpoint=str(tmp_path / "ck"), int8=True, format="synthetic-steel",
                          root=str(tmp_path / "data"), option={"num_images": 24}, calibration_images=32,
                          calibration_seed=0)]  # the defaults, given
    other = [{"checkpoint": str(tmp_path / "other")}, {"int8": False, "format": None, "root": None, "option": {}},
             {"format": "synthetic-tile"}, {"root": str(tmp_path / "data2")}, {"split_seed": 1},
             {"option": {"num_images": 30}}, {"calibration_images": 8}, {"calibration_seed": 1}, {"size": "128"},
             {"opset": 18}]
    assert all(int8.writes_same_file(request) for request in same)
    for change in other:
        values = {"checkpoint": int8.checkpoint, "int8": True, "format": int8.format, "root": int8.root,
                  "option": int8.option, **change}
        assert not int8.writes_same_file(ExportRequest(**values)), change
    fp32 = ExportRequest(checkpoint=str(tmp_path / "ck"))
    assert fp32.writes_same_file(ExportRequest(checkpoint=str(tmp_path / "ck"), no_profile=True))


def test_a_job_and_the_command_line_refuse_them_in_one_line(checkpoint: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ParameterError, match="calibration_images.*is not a whole number|'many' is not a whole"):
        ExportRequest.from_json({"checkpoint": str(checkpoint), "int8": True, "calibration_images": "many"},
                                out=str(tmp_path / "m.onnx"))
    with pytest.raises(SystemExit) as stopped:
        cli_main(["export-onnx", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx"), "--int8",
                  "--calibration-images", "9999"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--calibration-images" in err and "use 1 to 512" in err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_onnx_int8_json(checkpoint: Path, data_root: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli" / "tiny.int8.onnx"
    options = [arg for key, value in OPTIONS.items() for arg in ("--option", f"{key}={value}")]
    code = cli_main(["export-onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--int8",
                     "--calibration-images", "4", *options, "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert Path(report["path"]) == out.resolve() and report["size_bytes"] == out.stat().st_size
    assert report["int8"]["quantization"]["calibration_images"] == 4
    assert 0 <= report["max_abs_diff"] < 1e-4  # the fp32 export it quantised matches PyTorch
    assert "profile" not in report and "defect_miou" not in report["int8"]  # the command stays fast
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(str(out)).graph.node}


def test_a_checkpoint_with_another_datasets_classes_is_refused_before_any_work(checkpoint: Path,
                                                                                tmp_path: Path) -> None:
    from core.services.datasets import CheckpointDatasetMismatchError

    with pytest.raises(CheckpointDatasetMismatchError, match="scratch"):
        run_export(ExportRequest(checkpoint=str(checkpoint), out=str(tmp_path / "m.onnx"), int8=True,
                                 format="synthetic-tile", root=str(tmp_path / "tile"), option=dict(OPTIONS)))
    assert not (tmp_path / "m.onnx").exists()


def test_int8_cost_rows_time_models_in_turns_for_a_cost_table(checkpoint: Path, data_root: Path,
                                                              tmp_path: Path) -> None:
    """What the Compare page's INT8 ONNX Runtime row reads: per model, the INT8 file's size and
    latency spread, in a cost row's ``latency`` shape; a pruned model's INT8 file is smaller."""
    from core.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    model = loaded.model
    pruner = tp.pruner.MetaPruner(model, example_input(SIZE, 1), importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=classifier_layers(model))
    pruner.step()
    pruned = save_checkpoint(tmp_path / "pruned", model, loaded.spec, pruner.pruning_history())
    images = checkpoint_dataset(load_index("synthetic-steel", data_root, **OPTIONS), "test", SIZE, loaded.spec)
    rows = int8_cost_rows([checkpoint, pruned], images, runs=2, threads=1, images=3, evaluate_on=images)
    assert [row["checkpoint"] for row in rows] == [str(checkpoint), str(pruned)]
    for row in rows:
        spread = row["latency"][INT8_ENGINE]
        assert 0 < spread["p10_ms"] <= spread["median_ms"] <= spread["p90_ms"]
        assert row["latency_int8_ms"] == spread["median_ms"]
        assert 0 <= row["defect_miou_int8"] <= 100
    assert rows[1]["size_bytes_int8"] < 0.5 * rows[0]["size_bytes_int8"]
