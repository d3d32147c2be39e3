"""Experiment tracking (issue 17): with a tracking URI, train, prune and export each log one
MLflow run (parameters, per-epoch / per-round metrics, nested round runs, artifacts), read back
here through MLflow's own client from a local file store; without one MLflow is never
imported; a bad URI is one warning line and the job still succeeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.services.export import ExportRequest, run_export
from core.services.prune import PruneRequest, run_prune
from core.services.tracking import ENV_URI, KIND_TAG, PARENT_TAG, ROUND_TAG
from core.services.train import TrainRequest, run_train
from test_train import write_tiny_neu_seg

REPO = Path(__file__).resolve().parents[1]
TINY = {"format": "neu-seg", "size": "64", "batch_size": 3, "threads": 1, "device": "cpu"}


@pytest.fixture(autouse=True)
def no_environment_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_URI, raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return (tmp_path_factory.mktemp("mlflow") / "mlruns").as_uri()  # file:///...


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_neu_seg(tmp_path_factory.mktemp("neu"))


@pytest.fixture(scope="module")
def trained(store: str, data: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ckpt") / "unet"
    result = run_train(TrainRequest(root=str(data), epochs=2, no_early_stop=True, out=str(out), mlflow_uri=store,
                                    **TINY))
    return result


def client(store: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store)


def runs_of(store: str, kind: str) -> list:
    mlflow = client(store)
    experiment = mlflow.get_experiment_by_name("defectprune")
    return mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`{KIND_TAG}` = '{kind}'")


def artifacts(store: str, run_id: str, folder: str | None = None) -> set[str]:
    return {f.path for f in client(store).list_artifacts(run_id, folder)}


def steps(store: str, run_id: str, key: str) -> list[int]:
    return [m.step for m in client(store).get_metric_history(run_id, key)]


def test_train_logs_its_parameters_epochs_and_checkpoint(store: str, trained) -> None:
    (run,) = runs_of(store, "train")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["epochs"] == "2" and params["batch_size"] == "3" and params["format"] == "neu-seg"
    assert params["out"] == str(Path(trained.checkpoint))
    assert "mlflow_uri" not in params  # a server URI may hold credentials
    history = json.loads((Path(trained.checkpoint) / "training_history.json").read_text())["history"]
    for key in ("train_loss", "val_defect_miou", "lr", "val_dice"):
        assert steps(store, run.info.run_id, key) == [1, 2], key
    losses = [m.value for m in client(store).get_metric_history(run.info.run_id, "train_loss")]
    assert losses == pytest.approx([h["train_loss"] for h in history])
    assert run.data.metrics["best_val_defect_miou"] == pytest.approx(trained.val["defect_miou"])
    assert run.data.metrics["epochs_run"] == 2
    checkpoint = artifacts(store, run.info.run_id, "checkpoint")
    assert {"checkpoint/training_history.json"} <= checkpoint
    assert any(p.endswith(".safetensors") for p in checkpoint)
    assert "report/result.json" in artifacts(store, run.info.run_id, "report")


def test_a_two_round_prune_logs_round_runs_under_its_own(store: str, trained, tmp_path: Path) -> None:
    request = PruneRequest(checkpoint=trained.checkpoint, method="uniform-l1", target_macs=0.5, step=0.3,
                           finetune_epochs=1, batch_size=3, calibration_images=4, no_tolerance_stop=True, threads=1,
                           out=str(tmp_path / "prune"), mlflow_uri=store)
    result = run_prune(request)
    assert [r.round for r in result.rounds] == [1, 2]
    (parent,) = runs_of(store, "prune")
    assert parent.info.status == "FINISHED" and parent.data.params["method"] == "uniform-l1"
    rounds = sorted(runs_of(store, "prune-round"), key=lambda r: r.data.tags[ROUND_TAG])
    assert [r.data.tags[ROUND_TAG] for r in rounds] == ["1", "2"]
    assert {r.data.tags[PARENT_TAG] for r in rounds} == {parent.info.run_id}
    for run, record in zip(rounds, result.rounds):
        assert run.data.metrics["macs_reduction"] == pytest.approx(record.macs_reduction)
        assert run.data.metrics["params_reduction"] == pytest.approx(record.params_reduction)
        assert run.data.metrics["val_defect_miou"] == pytest.approx(record.defect_miou)
        assert run.data.metrics["latency_ms"] == pytest.approx(record.latency_ms)
    assert steps(store, parent.info.run_id, "macs_reduction") == [1, 2]
    assert parent.data.metrics["result_macs_reduction"] == pytest.approx(result.result["macs_reduction"])
    assert parent.data.metrics["result_test_defect_miou"] == pytest.approx(result.result["test"]["defect_miou"])
    assert {"report/rounds.json", "report/result.json"} <= artifacts(store, parent.info.run_id, "report")
    assert any(p.endswith(".safetensors") for p in artifacts(store, parent.info.run_id, "checkpoint"))

    # a stopped job resumed (same --out): the same MLflow run, its rounds not logged twice
    client(store).set_terminated(parent.info.run_id, "KILLED")
    run_prune(request)
    (again,) = runs_of(store, "prune")
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert len(runs_of(store, "prune-round")) == 2
    assert steps(store, parent.info.run_id, "base_macs") == [0]


def test_the_export_logs_the_onnx_file(store: str, trained, tmp_path: Path) -> None:
    result = run_export(ExportRequest(checkpoint=trained.checkpoint, out=str(tmp_path / "model.onnx"),
                                      no_profile=True, mlflow_uri=store))
    (run,) = runs_of(store, "export")
    assert run.info.status == "FINISHED"
    assert "onnx/model.onnx" in artifacts(store, run.info.run_id, "onnx")
    assert run.data.metrics["max_abs_diff"] == pytest.approx(result.max_abs_diff)
    assert run.data.metrics["size_bytes"] == result.size_bytes


def test_an_export_job_logs_to_the_uri_in_its_parameters(trained, tmp_path: Path) -> None:
    import os

    from core.runs import api
    from core.runs.store import DB_FILE, SUCCEEDED, Store
    from core.runs.worker import execute_job

    job_store = (tmp_path / "job-mlruns").as_uri()
    store = Store(tmp_path / "workspace" / DB_FILE)
    job = api.submit("export", {"checkpoint": trained.checkpoint, "no_profile": True, "mlflow_uri": job_store}, store)
    assert store.claim_next_job(worker_pid=os.getpid()).id == job.id
    assert execute_job(store, job.id) == SUCCEEDED, store.get_job(job.id).error
    (run,) = runs_of(job_store, "export")
    assert run.data.params["checkpoint"] == trained.checkpoint and run.data.tags["defectprune.out"] == str(
        store.job_dir(job.id) / "model.onnx")
    assert "onnx/model.onnx" in artifacts(job_store, run.info.run_id, "onnx")


def test_jobs_and_the_command_line_take_the_uri(store: str) -> None:
    from core.cli import build_parser, request_from_args

    request = TrainRequest.from_json({"format": "neu-seg", "mlflow_uri": store})
    assert request.mlflow_uri == store and request.to_json()["mlflow_uri"] == store
    parser = build_parser()
    for command, request_type, args in (("train", TrainRequest, ["--format", "neu-seg"]),
                                        ("prune", PruneRequest, ["--checkpoint", "ck"]),
                                        ("export-onnx", ExportRequest, ["--checkpoint", "ck"])):
        parsed = parser.parse_args([command, *args, "--out", "o", "--mlflow-uri", store])
        assert request_from_args(request_type, parsed).mlflow_uri == store, command


def test_without_a_uri_a_job_never_imports_mlflow(data: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from core.cli import main\n"
        f"rc = main(['train', '--format', 'neu-seg', '--root', {str(data)!r}, '--size', '64', '--epochs', '1', "
        f"'--max-steps-per-epoch', '1', '--batch-size', '3', '--threads', '1', '--out', {str(tmp_path / 'ck')!r}])\n"
        "sys.exit(rc or ('mlflow' in sys.modules and 'mlflow was imported'))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != ENV_URI}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ck" / "training_history.json").is_file()


@pytest.mark.parametrize("uri", ["http://127.0.0.1:9", "nosuchscheme://tracking"])
def test_a_bad_uri_is_one_warning_and_the_job_succeeds(uri: str, data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the operator's setting wins over ours
    monkeypatch.setenv(ENV_URI, uri)  # from the environment, as a worker gets it
    result = run_train(TrainRequest(root=str(data), epochs=1, max_steps_per_epoch=1, out=str(tmp_path / "ck"),
                                    **TINY))
    assert result.epochs_run == 1 and (tmp_path / "ck" / "training_history.json").is_file()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "tracking" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("warning: experiment tracking is off for the rest of this train run")


def test_an_mlflow_error_midway_is_one_warning(data: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    def refuse(*args, **kwargs):
        raise RuntimeError("the artifact store is full")

    monkeypatch.setattr(MlflowClient, "log_artifacts", refuse)
    store = (tmp_path / "mlruns").as_uri()
    result = run_train(TrainRequest(root=str(data), epochs=1, max_steps_per_epoch=1, out=str(tmp_path / "ck"),
                                    mlflow_uri=store, **TINY))
    assert result.epochs_run == 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if "tracking" in line]
    (run,) = runs_of(store, "train")
    assert run.info.status == "FAILED"  # not left running; what came before the error is kept
    assert steps(store, run.info.run_id, "train_loss") == [1]
    assert warnings == ["warning: experiment tracking is off for the rest of this train run: logging ck failed: "
                        "the artifact store is full"]
