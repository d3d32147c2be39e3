"""The Model page's "Import a model" tab through AppTest (issue 17): an uploaded state dict is
queued as an import job on the current dataset, and once the job ran, the page shows its
evaluation and the imported model is the workspace's; a pickled whole model fails with its
named error in one box and the working model stays; a zipped smp folder is unpacked into the
workspace, a zip with an unsafe path and a typed path outside the data roots are one error box
and nothing is submitted; ``?import=ID`` brings the job back."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import save as safetensors_bytes
from streamlit.testing.v1 import AppTest

from core.config import workspace_dir
from core.models.checkpoint import load_checkpoint
from core.runs import api
from core.runs.worker import execute_job
from core.services.import_model import ImportRequest
from page_helpers import STEEL_CLASSES, claim, open_page, run_inline, sidebar_text, tiny_steel_model
from ui.state import DatasetChoice

# a small synthetic steel set: 12 images at 64 px (2 in val, what the import is evaluated on)
OPTIONS = {"num_images": 12, "image_size": 64}
DATASET = DatasetChoice(format="synthetic-steel", options=json.dumps(OPTIONS))
SUBMIT = "Import in the background"


@pytest.fixture(scope="module")
def source_model() -> torch.nn.Module:
    """An smp model as another pipeline leaves it: 1 channel, the steel classes, 64 px."""
    torch.manual_seed(0)
    model = smp.FPN(encoder_name="mobilenet_v2", encoder_weights=None, in_channels=1, classes=len(STEEL_CLASSES))
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 1, 64, 64))  # BatchNorm statistics that are not the initial ones
    return model.eval()


@pytest.fixture()
def no_worker(monkeypatch):
    """The test is the worker: none is started, and the one the page asks about is alive."""
    started = []
    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: started.append(True))
    monkeypatch.setattr(api, "worker_alive", lambda *a, **k: True)
    return started


def model_page(model: str | None = None) -> AppTest:
    at = open_page("model", run=False)
    at.session_state["dataset"] = asdict(DATASET)
    if model:
        at.session_state["model"] = model
    at.run()
    assert not at.exception, at.exception
    return at


def submit(at: AppTest) -> None:
    next(b for b in at.button if b.label == SUBMIT).click().run()
    assert not at.exception, at.exception


def upload(at: AppTest, name: str, data: bytes) -> None:
    at.file_uploader(key="import_upload").set_value((name, data, "application/octet-stream"))


def import_jobs() -> set[int]:
    return {job.id for job in api.list_jobs(kind="import", limit=None)}


def state_dict_upload(model: torch.nn.Module) -> bytes:
    return safetensors_bytes({k: v.contiguous() for k, v in model.state_dict().items()})


def test_an_uploaded_state_dict_is_imported_evaluated_and_becomes_the_workspaces_model(source_model, no_worker):
    at = model_page()
    assert any("No model yet" in info.value for info in at.info)
    data = state_dict_upload(source_model)
    upload(at, "my model.safetensors", data)
    at.selectbox(key="import_arch").set_value("fpn")
    at.selectbox(key="import_encoder").set_value("mobilenet_v2")
    submit(at)
    assert not at.error, [e.value for e in at.error]
    job = api.get_job(at.session_state["import_job"])
    assert job.kind == "import" and job.state == "queued" and no_worker
    assert at.query_params["import"] == str(job.id)  # a refresh brings the job back
    # the request: the upload kept inside the workspace, the current dataset, the form's settings
    request = ImportRequest.from_json(job.params, out="unused")
    source = Path(request.source)
    assert workspace_dir() / "imports" in source.parents and source.suffix == ".safetensors"
    assert source.read_bytes() == data
    assert (request.arch, request.encoder, request.classes) == ("fpn", "mobilenet_v2", tuple(STEEL_CLASSES))
    assert (request.format, request.root, request.option, request.split_seed) == ("synthetic-steel", None, OPTIONS, 0)
    assert request.size == "64x64" and request.mean == () and request.std == () and "out" not in job.params
    assert any(f"Import, job {job.id} (queued)" in p.proto.text for p in at.get("progress"))

    run_inline(job.id)
    done = api.get_job(job.id)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    checkpoint = done.result["checkpoint"]
    assert at.session_state["model"] == checkpoint  # adopted without a press
    assert any("is now the workspace's model" in s.value for s in at.success)
    assert not any("No model yet" in info.value for info in at.info)
    assert f"{job.id}/checkpoint" in sidebar_text(at)
    evaluation = done.result["evaluation"]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["val defect mIoU"] == f"{evaluation['defect_miou']:.1f}"
    table = next(frame.value for frame in at.dataframe if "IoU (%)" in frame.value.columns)
    assert list(table["class"]) == [c for c in STEEL_CLASSES[1:] if c in evaluation["per_class_iou"]]
    assert list(table["IoU (%)"]) == [evaluation["per_class_iou"][c] for c in table["class"]]
    assert any(f"{done.result['tensors']} tensors loaded" in m.value for m in at.markdown)
    # the workspace's model is the source model: same outputs
    loaded = load_checkpoint(checkpoint)
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), source_model(x))
    assert len(at.get("image")) == 4  # the page below: truth and prediction of the 2 val images
    # once: a model picked afterwards stays, the import is offered
    other = tiny_steel_model(Path(checkpoint).parent.parent / "other")
    at.session_state["model"] = other
    at.run()
    assert not at.exception and at.session_state["model"] == other
    assert at.button(key=f"use_{job.id}")


def test_a_pickled_whole_model_fails_with_its_named_error_once_and_the_model_stays(source_model, no_worker,
                                                                                     tmp_path):
    working = tiny_steel_model(tmp_path)
    at = model_page(working)
    buffer = io.BytesIO()
    torch.save(source_model, buffer)  # the whole model, pickled: its classes would have to be unpickled
    upload(at, "whole.pt", buffer.getvalue())
    at.selectbox(key="import_arch").set_value("fpn")
    at.selectbox(key="import_encoder").set_value("mobilenet_v2")
    submit(at)
    assert not at.error, [e.value for e in at.error]
    job_id = at.session_state["import_job"]
    claim(job_id)
    assert execute_job(api.open_store(), job_id) == "failed"
    at.run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1, errors
    assert errors[0].startswith("Import failed:") and "needs code to be unpickled" in errors[0]
    assert errors[0] == f"Import failed: {api.get_job(job_id).error}"
    assert "Traceback" not in errors[0]
    assert at.session_state["model"] == working and f"{job_id}/checkpoint" not in sidebar_text(at)
    assert len(at.get("image")) == 4  # the working model is still drawn (2 val images)


def smp_zip(model: torch.nn.Module, folder: Path, prefix: str = "exported/") -> bytes:
    model.save_pretrained(folder)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in folder.iterdir():
            archive.write(file, prefix + file.name)
        archive.writestr("__MACOSX/exported/._config.json", b"junk")
    return buffer.getvalue()


def test_a_zipped_smp_folder_is_unpacked_in_the_workspace_and_names_its_own_network(source_model, no_worker,
                                                                                      tmp_path):
    at = model_page()
    upload(at, "exported.zip", smp_zip(source_model, tmp_path / "smp"))
    submit(at)
    job_id = at.session_state.get("import_job")
    try:
        assert not at.error, [e.value for e in at.error]
        job = api.get_job(job_id)
        source = Path(job.params["source"])
        assert workspace_dir() / "imports" in source.parents
        assert sorted(p.name for p in source.iterdir()) == ["config.json", "model.safetensors"]
        assert "arch" not in job.params and "encoder" not in job.params  # config.json names them
    finally:
        if job_id:
            api.stop(job_id)
    assert api.get_job(job_id).state == "stopped"


@pytest.mark.parametrize("member", ["../escaped.json", "/abs/config.json"])
def test_a_zip_with_an_unsafe_path_is_one_error_box_and_nothing_is_submitted(no_worker, member):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model/config.json", "{}")
        archive.writestr("model/model.safetensors", b"x")
        archive.writestr(member, "{}")
    before = import_jobs()
    at = model_page()
    upload(at, "evil.zip", buffer.getvalue())
    submit(at)
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "unsafe path" in errors[0], errors
    assert import_jobs() == before and "import_job" not in at.session_state
    assert not (workspace_dir() / "escaped.json").exists() and not no_worker


def test_a_typed_path_outside_the_data_roots_is_one_error_box_and_nothing_is_submitted(no_worker):
    before = import_jobs()
    at = model_page()
    at.radio(key="import_from").set_value("A path inside the data roots").run()
    at.text_input(key="import_path").input("/etc/passwd")
    submit(at)
    errors = [e.value for e in at.error]
    assert len(errors) == 1, errors
    assert errors[0].startswith("Starting the import failed") and "outside the configured data roots" in errors[0]
    assert import_jobs() == before and "import_job" not in at.session_state and not no_worker


def test_a_mean_that_is_not_a_number_is_one_error_box_and_nothing_is_submitted(source_model, no_worker):
    before = import_jobs()
    at = model_page()
    upload(at, "weights.safetensors", state_dict_upload(source_model))
    at.text_input(key="import_mean").input("0.5, abc")
    at.text_input(key="import_std").input("0.25, 0.25")
    submit(at)
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "mean: 'abc' is not a number" in errors[0], errors
    assert import_jobs() == before


def test_a_reopened_tab_finds_the_import_job_and_its_dataset(tmp_path, no_worker):
    job = api.submit("import", ImportRequest(source=str(tmp_path / "weights.safetensors"), format="synthetic-tile",
                                             arch="unet", encoder="resnet18"))
    try:
        at = open_page("model", run=False)
        at.query_params["import"] = str(job.id)  # nothing in the session
        at.run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        assert at.session_state["dataset"]["format"] == "synthetic-tile"
        assert any(f"Import, job {job.id} (queued)" in p.proto.text for p in at.get("progress"))
        at.button(key=f"stop_{job.id}").click().run()
        assert not at.exception
    finally:
        api.stop(job.id)
    assert api.get_job(job.id).state == "stopped"


def test_an_import_id_naming_another_kind_of_job_is_an_error_box(no_worker):
    job = api.submit("train", {"format": "synthetic-steel", "size": "64", "epochs": 1})
    try:
        at = open_page("model", run=False)
        at.query_params["import"] = str(job.id)
        at.run()
        assert not at.exception
        assert any(f"job {job.id} is a train job, not an import" in e.value for e in at.error)
    finally:
        api.stop(job.id)

