"""Models trained elsewhere (issue 17): an smp ``save_pretrained`` folder and a bare state dict
import as checkpoints whose outputs are the source model's; a pickled whole model is refused
without being unpickled; every named error; a checkpoint's own mean/std normalises its images
(dataset item and prediction) while older checkpoints keep the fixed one bit for bit; encoder
weights from torchvision or timm load into the encoder (mapped by name or by layout) and
change its output; ``train --encoder-weights``; the import job and its path confinement."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn as nn
from safetensors.torch import save_file

from core.data.dataset import IMAGENET_MEAN, IMAGENET_STD, PIXEL_MEAN, PIXEL_STD, SegmentationDataset, normalise
from core.data.registry import load_index
from core.errors import DefectPruneError
from core.models.checkpoint import CheckpointSpecError, load_checkpoint, read_spec, save_checkpoint
from core.models.importer import (
    EncoderWeightsError, MissingKeysError, NonFiniteWeightsError, NotAStateDictError, PickledCodeError,
    ShapeMismatchError, UnexpectedKeysError, UnknownSmpArchitectureError, UnknownSmpEncoderError,
    UnsupportedSmpSettingError, WeightsFileError, load_encoder_weights,
)
from core.models.zoo import ModelSpec, build_model
from core.predictions import predict_split
from core.services.import_model import ImportClassesError, ImportRequest, run_import
from core.services.request import ParameterError

REPO = Path(__file__).resolve().parents[1]
OPTIONS = {"num_images": 12, "image_size": 64}
CLASSES = ["background", "scratch", "inclusion", "patch"]  # synthetic-steel's


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The dataset an import is evaluated on: 12 synthetic steel images at 64 px."""
    root = tmp_path_factory.mktemp("steel")
    index = load_index("synthetic-steel", str(root), **OPTIONS)
    assert list(index.classes) == CLASSES
    return {"format": "synthetic-steel", "root": str(root), "option": dict(OPTIONS)}


def source_model(arch: type[nn.Module] = smp.Unet, encoder: str = "resnet18", in_channels: int = 3,
                 classes: int = 4, seed: int = 0) -> nn.Module:
    """An smp model as another pipeline leaves it: random weights and BatchNorm statistics
    that are not the initial ones, in eval mode."""
    torch.manual_seed(seed)
    model = arch(encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=classes)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, in_channels, 64, 64) * 2 + 0.3)
    return model.eval()


def same_outputs(a: nn.Module, b: nn.Module, in_channels: int) -> bool:
    x = torch.randn(2, in_channels, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("arch, name, encoder, in_channels", [
    (smp.Unet, "unet", "resnet18", 3),
    (smp.FPN, "fpn", "mobilenet_v2", 1),
])
def test_an_smp_folder_imports_as_a_checkpoint_with_the_source_outputs(tmp_path, data, arch, name, encoder,
                                                                        in_channels):
    model = source_model(arch, encoder, in_channels)
    model.save_pretrained(tmp_path / "smp")
    result = run_import(ImportRequest(source=str(tmp_path / "smp"), **data, size="64", out=str(tmp_path / "ck"),
                                      threads=1))
    loaded = load_checkpoint(result.checkpoint)
    assert same_outputs(model, loaded.model, in_channels)
    spec = loaded.spec
    assert (spec.arch, spec.encoder, spec.in_channels, spec.classes) == (name, encoder, in_channels, CLASSES)
    assert spec.dataset_format == "synthetic-steel" and tuple(spec.input_size) == (64, 64) and loaded.history == []
    expected = (list(IMAGENET_MEAN), list(IMAGENET_STD)) if in_channels == 3 else ([PIXEL_MEAN], [PIXEL_STD])
    assert (spec.mean, spec.std) == expected and result.normalisation == dict(zip(("mean", "std"), expected))
    # evaluated at once, on the val split, and the spec says so (the Model page's val metrics)
    assert result.evaluation["split"] == "val" and result.evaluation["images"] == 2
    assert spec.metrics["split"] == "val" and spec.metrics["defect_miou"] == result.evaluation["defect_miou"]
    assert spec.metrics["import"]["kind"] == "smp folder" and result.tensors == len(model.state_dict())
    assert json.loads((Path(result.checkpoint) / "spec.json").read_text())["format_version"] == 2


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", "wrapped.pt"])
def test_a_state_dict_imports_with_the_source_outputs(tmp_path, suffix):
    model = source_model(smp.Linknet, "resnet18", in_channels=1, classes=3, seed=1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    file = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(file))
    elif suffix == ".pth":
        torch.save({f"module.{k}": v for k, v in state.items()}, file)  # as DataParallel saves it
    else:
        torch.save({"state_dict": state, "epoch": 7}, file)  # as a training script saves it
    result = run_import(ImportRequest(source=str(file), arch="linknet", encoder="resnet18",
                                      classes=("background", "crack", "hole"), mean=(0.4,), std=(0.2,),
                                      out=str(tmp_path / "ck")))
    loaded = load_checkpoint(result.checkpoint)
    assert same_outputs(model, loaded.model, 1)
    assert loaded.spec.in_channels == 1  # read from the first convolution's weights
    assert (loaded.spec.mean, loaded.spec.std) == ([0.4], [0.2]) and result.evaluation is None
    assert loaded.spec.classes == ["background", "crack", "hole"] and result.source_kind == "state dict"


def test_a_pickled_whole_model_is_refused_without_being_unpickled(tmp_path):
    whole = tmp_path / "model.pt"
    torch.save(source_model(), whole)
    with pytest.raises(PickledCodeError, match=r"segmentation_models_pytorch\..*Unet.*torch\.save\(model\.state_dict"):
        run_import(ImportRequest(source=str(whole), arch="unet", encoder="resnet18", classes=tuple(CLASSES),
                                 out=str(tmp_path / "ck")))
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    hostile = tmp_path / "hostile.pth"
    torch.save({"conv.weight": torch.zeros(1), "x": Payload()}, hostile)
    with pytest.raises(PickledCodeError, match="open"):
        run_import(ImportRequest(source=str(hostile), arch="unet", encoder="resnet18", classes=tuple(CLASSES),
                                 out=str(tmp_path / "ck")))
    assert not marker.exists() and not (tmp_path / "ck").exists()


# ---------------------------------------------------------------- named errors
def _state_file(tmp_path: Path, edit=None) -> Path:
    state = dict(source_model(classes=4).state_dict())
    if edit:
        edit(state)
    file = tmp_path / "weights.pth"
    torch.save(state, file)
    return file


def _smp_folder(tmp_path: Path, **config_changes) -> Path:
    source_model().save_pretrained(tmp_path / "smp")
    config_file = tmp_path / "smp" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(config_changes)
    config_file.write_text(json.dumps(config))
    return tmp_path / "smp"


def _grow(state):
    state["decoder.extra.weight"] = torch.zeros(3)


def _nan(state):
    state["encoder.conv1.weight"][0, 0, 0, 0] = float("nan")


@pytest.mark.parametrize("make, request_args, error, needles", [
    (lambda t: _state_file(t, lambda s: s.pop("decoder.blocks.0.conv1.0.weight")), {}, MissingKeysError,
     ["lacks 1 tensor", "decoder.blocks.0.conv1.0.weight"]),
    (lambda t: _state_file(t, _grow), {}, UnexpectedKeysError, ["decoder.extra.weight"]),
    (lambda t: _state_file(t, lambda s: s.update({"decoder.blocks.0.conv1.0.weight": torch.zeros(8, 8, 3, 3)})), {},
     ShapeMismatchError, ["decoder.blocks.0.conv1.0.weight", "(8, 8, 3, 3)", "(256, 768, 3, 3)"]),
    (lambda t: _state_file(t, _nan), {}, NonFiniteWeightsError, ["encoder.conv1.weight"]),
    (lambda t: _state_file(t), {"encoder": "resnet34"}, MissingKeysError, ["layer1.2"]),
    (lambda t: _state_file(t), {"classes": ("background", "scratch", "inclusion")}, ImportClassesError,
     ["predicts 4 classes", "background, scratch, inclusion"]),
    (lambda t: _smp_folder(t, _model_class="PSPNet"), {}, UnknownSmpArchitectureError, ["'PSPNet'", "Unet"]),
    (lambda t: _smp_folder(t, encoder_name="resnet50"), {}, UnknownSmpEncoderError, ["'resnet50'", "resnet18"]),
    (lambda t: _smp_folder(t, decoder_channels=[128, 64, 32, 16, 8]), {}, UnsupportedSmpSettingError,
     ["decoder_channels", "(256, 128, 64, 32, 16)"]),
    (lambda t: _smp_folder(t, classes=3), {}, ImportClassesError, ["predicts 3 classes", "names 4"]),
    (lambda t: _smp_folder(t), {"arch": "fpn"}, ParameterError, ["--arch fpn", "says unet"]),
    (lambda t: t / "nothing.pth", {}, WeightsFileError, ["is not a file"]),
    (lambda t: (t / "notes.txt").write_text("x") and t / "notes.txt", {}, WeightsFileError, [".safetensors"]),
])
def test_every_problem_with_a_source_is_a_named_error(tmp_path, make, request_args, error, needles):
    source = make(tmp_path)
    args = {"arch": "unet", "encoder": "resnet18", "classes": tuple(CLASSES)}
    if (Path(source) / "config.json").is_file():
        args = {"classes": tuple(CLASSES)}
    args.update(request_args)
    with pytest.raises(error) as caught:
        run_import(ImportRequest(source=str(source), out=str(tmp_path / "ck"), **args))
    assert isinstance(caught.value, DefectPruneError)
    for needle in needles:
        assert needle in str(caught.value)
    assert not (tmp_path / "ck").exists()  # nothing written


def test_a_pickle_that_is_not_a_state_dict_and_a_state_dict_without_its_network_are_refused(tmp_path):
    notes = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "lr": 0.1}, notes)
    with pytest.raises(NotAStateDictError, match=r"epoch \(int\), lr \(float\)"):
        run_import(ImportRequest(source=str(notes), arch="unet", encoder="resnet18", classes=tuple(CLASSES),
                                 out=str(tmp_path / "ck")))
    with pytest.raises(ParameterError, match="--arch and --encoder"):
        run_import(ImportRequest(source=str(_state_file(tmp_path)), classes=tuple(CLASSES), out=str(tmp_path / "ck")))


def test_classes_that_are_not_the_datasets_name_both_lists(tmp_path, data):
    with pytest.raises(ImportClassesError) as caught:
        run_import(ImportRequest(source=str(_state_file(tmp_path)), arch="unet", encoder="resnet18",
                                 classes=("background", "crack", "pit", "stain"), **data, out=str(tmp_path / "ck")))
    message = str(caught.value)
    assert "background, crack, pit, stain" in message and "background, scratch, inclusion, patch" in message
    with pytest.raises(DefectPruneError, match="4 values|one per channel"):
        run_import(ImportRequest(source=str(_state_file(tmp_path)), arch="unet", encoder="resnet18",
                                 classes=tuple(CLASSES), mean=(0.1, 0.2), std=(0.3, 0.3), out=str(tmp_path / "ck")))


# ---------------------------------------------------------------- normalisation
def test_a_checkpoint_with_its_own_mean_and_std_normalises_its_images_with_them(tmp_path, data):
    index = load_index(data["format"], data["root"], **data["option"])
    mean, std = [0.2, 0.4, 0.6], [0.1, 0.2, 0.3]
    spec = ModelSpec(classes=CLASSES, in_channels=3, input_size=(64, 64), mean=mean, std=std)
    model = source_model()
    path = save_checkpoint(tmp_path / "ck", model, spec)
    loaded = load_checkpoint(path)
    assert (loaded.spec.mean, loaded.spec.std) == (mean, std)
    dataset = SegmentationDataset(index, "val", (64, 64), 3, normalisation=loaded.spec.normalisation)
    image, _mask = dataset.raw(0)
    assert image.ndim == 2  # a grey dataset: the 3-channel model sees the grey value in every channel
    pixels = torch.from_numpy(np.stack([image] * 3).astype(np.float32)) / 255
    expected = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(dataset[0][0], expected, atol=1e-6)
    # the prediction is the model's on images normalised with them, not with the fixed normalisation
    with torch.no_grad():
        own = loaded.model(torch.stack([dataset[i][0] for i in range(len(dataset))])).argmax(1).numpy()
        fixed = loaded.model(torch.stack([normalise(dataset.raw(i)[0], 3) for i in range(len(dataset))])).argmax(1)
    predicted = predict_split(loaded.model, dataset)
    assert np.array_equal(predicted, own.astype(np.uint8)) and not np.array_equal(predicted, fixed.numpy())


def test_a_checkpoint_without_mean_and_std_keeps_the_fixed_normalisation_bit_for_bit(tmp_path, data):
    index = load_index(data["format"], data["root"], **data["option"])
    spec = ModelSpec(classes=CLASSES, in_channels=1, input_size=(64, 64))
    path = save_checkpoint(tmp_path / "ck", build_model(spec), spec)
    stored = json.loads((path / "spec.json").read_text())
    assert "mean" not in stored and "std" not in stored and stored["format_version"] == 1  # as before the field
    loaded = read_spec(path)
    assert loaded.normalisation is None and loaded.pixel_normalisation.mean == (PIXEL_MEAN,)
    image, _ = SegmentationDataset(index, "val", (64, 64), 1).raw(0)
    item = SegmentationDataset(index, "val", (64, 64), 1, normalisation=loaded.normalisation)[0][0]
    before = (torch.from_numpy(image[None].astype(np.float32)) / 255.0 - PIXEL_MEAN) / PIXEL_STD
    assert torch.equal(item, before)


@pytest.mark.parametrize("changes, needle", [
    ({"mean": [0.5], "std": None}, "without 'std'"),
    ({"mean": [0.5, 0.5], "std": [0.2, 0.2]}, "2 values for 1 input channel"),
    ({"mean": [0.5], "std": [0.0]}, "positive"),
    ({"mean": ["a"], "std": [0.2]}, "list of numbers"),
])
def test_a_spec_with_a_bad_normalisation_is_refused(tmp_path, changes, needle):
    spec = ModelSpec(classes=CLASSES, in_channels=1, input_size=(64, 64))
    path = save_checkpoint(tmp_path / "ck", build_model(spec), spec)
    data = json.loads((path / "spec.json").read_text())
    data.update(changes)
    (path / "spec.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointSpecError, match=needle):
        read_spec(path)


# ---------------------------------------------------------------- encoder weights
def test_torchvision_resnet_weights_load_into_the_encoder_by_name(tmp_path):
    import torchvision

    torch.manual_seed(3)
    reference = torchvision.models.resnet18().eval()
    file = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(file))
    model = build_model(ModelSpec(classes=CLASSES, encoder="resnet18", in_channels=3)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model.encoder(x)[-1].clone()
        report = load_encoder_weights(model, file, "resnet18")
        after = model.encoder(x)[-1]
        r = reference
        features = r.layer4(r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x))))))))
    assert (report.loaded, report.total, report.mapping, report.not_loaded) == (100, 100, "names", [])
    assert sorted(report.unused) == ["fc.bias", "fc.weight"]  # the classification head, left out
    assert not torch.equal(before, after) and torch.equal(after, features)


def test_timm_mobilenet_weights_load_by_their_layout_and_a_grey_model_sums_the_first_conv(tmp_path):
    import timm

    torch.manual_seed(4)
    reference = timm.create_model("mobilenetv2_100", pretrained=False).eval()
    file = tmp_path / "mobilenet.pth"
    torch.save(reference.state_dict(), file)
    model = build_model(ModelSpec(classes=CLASSES, encoder="mobilenet_v2", in_channels=3)).eval()
    report = load_encoder_weights(model, file, "mobilenet_v2")
    assert report.mapping == "timm mobilenetv2_100" and report.loaded == report.total and not report.not_loaded
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.encoder(x)[-1], reference.forward_features(x))
    grey = build_model(ModelSpec(classes=CLASSES, encoder="mobilenet_v2", in_channels=1))
    report = load_encoder_weights(grey, file, "mobilenet_v2")
    assert report.loaded == report.total and "summed" in report.notes[0]
    assert torch.equal(grey.encoder.features[0][0].weight, reference.conv_stem.weight.sum(1, keepdim=True))


def test_encoder_weights_of_another_network_are_refused(tmp_path):
    import torchvision

    model = build_model(ModelSpec(classes=CLASSES, encoder="resnet18", in_channels=3))
    deeper = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), deeper)
    with pytest.raises(UnexpectedKeysError, match="layer1.2"):
        load_encoder_weights(model, deeper, "resnet18")
    other = tmp_path / "other.safetensors"
    save_file({"blob.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(EncoderWeightsError, match="none of its 1 tensors fits the resnet18 encoder"):
        load_encoder_weights(model, other, "resnet18")
    wide = tmp_path / "wide.pth"
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    torch.save(state, wide)
    with pytest.raises(ShapeMismatchError, match=r"conv1.weight has shape \(32, 3, 7, 7\).*\(64, 3, 7, 7\)"):
        load_encoder_weights(model, wide, "resnet18")


def test_train_with_encoder_weights_reports_what_loaded(tmp_path, data):
    import torchvision

    from core.services.train import TrainRequest, run_train

    file = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), file)
    result = run_train(TrainRequest(**data, size="64", epochs=1, max_steps_per_epoch=1, batch_size=4, threads=1,
                                    device="cpu", encoder_weights=str(file), out=str(tmp_path / "ck")))
    assert result.encoder_weights["loaded"] == 100 and result.encoder_weights["mapping"] == "names"
    assert "summed" in result.encoder_weights["notes"][0]  # the grey dataset's 1-channel model
    history = json.loads(result.history_file.read_text())
    assert history["encoder_weights"]["loaded"] == 100


# ---------------------------------------------------------------- job and command line
def test_the_import_job_registers_the_model_and_reads_only_inside_the_data_roots(tmp_path, data):
    import tempfile

    from core.runs import api
    from core.runs.store import DB_FILE, FAILED, SUCCEEDED, Store
    from core.runs.worker import execute_job

    store = Store(tmp_path / "ws" / DB_FILE)
    source = tmp_path / "smp"
    source_model().save_pretrained(source)
    job = api.submit("import", ImportRequest(source=str(source), **data, size="64", threads=1), store)
    assert store.claim_next_job(worker_pid=os.getpid()).id == job.id
    assert execute_job(store, job.id) == SUCCEEDED, store.get_job(job.id).error
    done = store.get_job(job.id)
    model = store.find_model(done.result["checkpoint"])
    assert model["id"] == done.result["model_id"] and model["dataset_id"] == done.dataset_id
    assert Path(done.result["checkpoint"]) == store.job_dir(job.id) / "checkpoint"
    assert done.result["evaluation"]["split"] == "val"
    outside = Path(tempfile.mkdtemp(prefix="defectprune-outside-"))
    try:
        source_model().save_pretrained(outside / "smp")
        job = api.submit("import", {"source": str(outside / "smp"), "classes": CLASSES}, store)
        assert store.claim_next_job(worker_pid=os.getpid()).id == job.id
        assert execute_job(store, job.id) == FAILED
        assert "outside the configured data roots" in store.get_job(job.id).error
    finally:
        shutil.rmtree(outside)


def test_the_command_prints_json_and_a_refused_pickle_in_one_line(tmp_path, data):
    source_model().save_pretrained(tmp_path / "smp")
    whole = tmp_path / "model.pt"
    torch.save(source_model(), whole)
    options = [arg for key, value in data["option"].items() for arg in ("--option", f"{key}={value}")]
    proc = subprocess.run([sys.executable, "-m", "core", "import-model", "--source", str(tmp_path / "smp"),
                           "--format", data["format"], "--root", data["root"], *options, "--size", "64",
                           "--threads", "1", "--out", str(tmp_path / "ck"), "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["arch"] == "unet" and payload["classes"] == CLASSES and payload["evaluation"]["images"] == 2
    proc = subprocess.run([sys.executable, "-m", "core", "import-model", "--source", str(whole), "--arch", "unet",
                           "--encoder", "resnet18", "--classes", *CLASSES, "--out", str(tmp_path / "ck2")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error:") and "needs code to be unpickled" in lines[0]


# ---------------------------------------------------------------- every caller takes the spec's normalisation
def test_the_import_is_evaluated_and_exported_with_its_own_normalisation(tmp_path, data):
    from core.data.dataset import Normalisation
    from core.services.export import onnx_metadata_for
    from core.train import evaluate

    model = source_model(seed=2)
    model.save_pretrained(tmp_path / "smp")
    mean, std = (0.2, 0.4, 0.6), (0.1, 0.2, 0.3)
    result = run_import(ImportRequest(source=str(tmp_path / "smp"), **data, size="64", mean=mean, std=std,
                                      threads=1, out=str(tmp_path / "ck")))
    index = load_index(data["format"], data["root"], **data["option"])
    own, fixed = (evaluate(model, SegmentationDataset(index, "val", (64, 64), 3, normalisation=n), "cpu", 8)
                  for n in (Normalisation(mean, std), None))
    assert result.evaluation["pixel_accuracy"] == own.metrics.to_dict()["pixel_accuracy"]
    assert own.metrics.to_dict()["pixel_accuracy"] != fixed.metrics.to_dict()["pixel_accuracy"]
    spec = load_checkpoint(result.checkpoint).spec
    meta = onnx_metadata_for(spec, (64, 64), pruned=False)
    assert json.loads(meta["mean"]) == list(mean) and json.loads(meta["std"]) == list(std)
    legacy = onnx_metadata_for(ModelSpec(classes=CLASSES, in_channels=1), (64, 64), pruned=False)
    assert (float(legacy["mean"]), float(legacy["std"])) == (PIXEL_MEAN, PIXEL_STD)  # as every export so far
