"""Issue 13 on the Prune page (and what Compare lists): the launch form's recovery, distillation
and precision settings reach the prune job; a run's recovery phase (mirrored from rounds.json
by the job) is drawn after its last round, with its numbers, and its checkpoint is a model."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from streamlit.testing.v1 import AppTest

from core.errors import DefectPruneError
from core.pruning.loop import RECOVERED_DIR, ROUNDS_FILE
from core.runs import api
from core.runs.jobs import JobContext, sync_rounds
from page_helpers import claim, figure, open_page, tiny_steel_model, values

ROUNDS = "Validation defect mIoU against MACs, round by round"
BASE = {"macs": 1_000_000_000, "params": 1_000_000, "defect_miou": 50.0}


@pytest.fixture()
def tiny_model(tmp_path) -> str:
    return tiny_steel_model(tmp_path, metrics={"defect_miou": 20.0})


@pytest.fixture()
def no_worker(monkeypatch) -> None:
    monkeypatch.setattr(api, "ensure_worker", lambda *a, **k: None)
    monkeypatch.setattr(api, "worker_alive", lambda *a, **k: False)


def page() -> AppTest:
    return open_page("prune", run=False)


def test_the_launch_form_sends_recovery_distillation_and_precision(tiny_model, no_worker):
    at = page()
    at.session_state["model"] = tiny_model
    at.run()
    assert not at.exception and not at.error
    epochs = at.number_input(key="prune_recover_epochs")
    assert epochs.value == 0 and "the recovered checkpoint becomes the result" in epochs.help
    assert at.number_input(key="prune_recover_lr").value is None  # blank: the fine-tune rate
    assert at.slider(key="prune_distill_weight").value == 0.0
    assert at.number_input(key="prune_distill_temperature").value == 2.0
    assert at.selectbox(key="prune_precision").value == "auto"
    assert list(at.selectbox(key="prune_precision").options) == ["auto", "fp32", "bf16"]

    at.button[0].click().run()  # the defaults: no recovery, no distillation, auto precision
    assert not at.exception and not at.error
    plain = api.get_job(at.session_state["run"])
    assert {k: plain.params[k] for k in ("recover_epochs", "distill_weight", "distill_temperature", "precision")} == {
        "recover_epochs": 0, "distill_weight": 0.0, "distill_temperature": 2.0, "precision": "auto"}
    assert "recover_lr" not in plain.params  # the command's default (--lr) applies
    api.stop(plain.id)

    at.number_input(key="prune_recover_epochs").set_value(5)
    at.number_input(key="prune_recover_lr").set_value(0.0005)
    at.slider(key="prune_distill_weight").set_value(0.5)
    at.number_input(key="prune_distill_temperature").set_value(3.0)
    at.selectbox(key="prune_precision").set_value("fp32")
    at.button[0].click().run()
    assert not at.exception and not at.error
    job = api.get_job(at.session_state["run"])
    assert job.id != plain.id and job.kind == "prune"
    assert job.params["recover_epochs"] == 5 and job.params["recover_lr"] == pytest.approx(0.0005)
    assert job.params["distill_weight"] == 0.5 and job.params["distill_temperature"] == 3.0
    assert job.params["precision"] == "fp32"
    api.stop(job.id)


def round_record(number: int, checkpoint: str, miou: float, precision: str, distill: float) -> dict:
    macs = int(BASE["macs"] * 0.7 ** number)
    return {"round": number, "macs": macs, "params": BASE["params"], "macs_reduction": 1 - macs / BASE["macs"],
            "params_reduction": 0.0, "defect_miou": miou, "drop": BASE["defect_miou"] - miou,
            "val": {"defect_miou": miou}, "latency_ms": 1.0, "wall_s": 1.0, "checkpoint": checkpoint,
            "accepted": True, "step": {}, "precision": precision, "distill_weight": distill}


def recovered_run(tiny_model: str) -> tuple[int, dict, str]:
    """A prune job whose rounds.json has two rounds and a recovery of round 2, mirrored into
    the store by the job's own `sync_rounds` (as the worker does after each write)."""
    store = api.open_store()
    job_id = store.create_job("prune", {"checkpoint": tiny_model, "method": "uniform-l1", "tolerance": 5.0,
                                        "recover_epochs": 5, "distill_weight": 0.5})
    claim(job_id)
    out = store.job_dir(job_id) / "prune"
    out.mkdir(parents=True)
    for name in ("round_01", "round_02", RECOVERED_DIR):  # any checkpoint will do: only its spec is read
        shutil.copytree(tiny_model, out / name)
    rounds = [round_record(1, str(out / "round_01"), 48.0, "fp32", 0.0),
              round_record(2, str(out / "round_02"), 45.0, "bf16", 0.5)]
    recovery = {"from_round": 2, "epochs": 5, "lr": 0.0005, "warmup": 0.05, "distill_weight": 0.5,
                "distill_temperature": 2.0, "precision": "bf16", "best_epoch": 4,
                "checkpoint": str(out / RECOVERED_DIR), "macs": rounds[1]["macs"], "params": rounds[1]["params"],
                "macs_reduction": rounds[1]["macs_reduction"], "params_reduction": 0.0, "defect_miou": 47.5,
                "drop": 2.5, "val": {"defect_miou": 47.5}, "latency_ms": 1.0, "train_step_seconds": 0.1,
                "teacher_step_seconds": 0.02, "wall_s": 3.0}
    # what the loop writes before evaluating the test split (the result comes after)
    (out / ROUNDS_FILE).write_text(json.dumps({"base": BASE, "rounds": rounds, "recovery": recovery}))
    job = store.get_job(job_id)
    base_model_id = store.register_model(tiny_model, arch="unet", encoder="resnet18")
    run_id = store.upsert_prune_run(job_id, tiny_model, out, "uniform-l1", job.params, base_model_id=base_model_id)
    ctx = JobContext(store, job)
    assert sync_rounds(ctx, run_id, out, base_model_id, {}) == 2
    store.finish_job(job_id, "succeeded", result={})
    return job_id, recovery, str(out / RECOVERED_DIR)


def test_a_run_with_a_recovery_draws_it_after_the_last_round_with_its_numbers(tiny_model):
    job_id, recovery, _ = recovered_run(tiny_model)
    assert api.job_details(job_id)["prune_run"]["result"]["recovery"] == recovery  # the store kept it
    at = page()
    at.session_state["model"] = tiny_model
    at.session_state["run"] = job_id
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    traces = {t["name"]: t for t in figure(at, ROUNDS)["data"]}
    assert traces["rounds"]["text"] == ["r0", "r1", "r2"]
    point = traces["recovery"]
    assert point["text"][-1] == "recovery (5 epochs)" and point["marker"]["symbol"][-1] == "star"
    # from round 2's point to the recovered one, at the same MACs
    assert list(values(point["y"])) == [45.0, 47.5]
    assert list(values(point["x"])) == pytest.approx([recovery["macs"] / 1e6] * 2)
    shown = {m.label: m.value for m in at.metric}
    assert shown["Val defect mIoU before recovery"] == "45.00"
    assert shown["Val defect mIoU after recovery"] == "47.50"
    assert any(m.value == "#### Recovery of round 2" for m in at.markdown)
    tables = [t.value for t in at.dataframe]
    rounds_table = next(t for t in tables if "round" in t.columns)
    assert list(rounds_table["precision"]) == ["fp32", "bf16"]
    assert list(rounds_table["distillation"]) == ["off", "on (weight 0.5)"]
    settings = next(t for t in tables if "setting" in t.columns).set_index("setting")["value"]
    assert settings["epochs"] == "5" and settings["learning rate"] == "0.0005" and settings["best epoch"] == "4"
    assert settings["precision"] == "bf16" and settings["distillation"] == "on (weight 0.5)"


def test_a_recovery_of_an_earlier_round_is_not_drawn(tiny_model):
    """A resumed run that went on past the recovered round redoes the recovery at its end:
    until then the stored one describes another round and is left out."""
    job_id, _, _ = recovered_run(tiny_model)
    store = api.open_store()
    run = store.get_prune_run(job_id)
    assert run["result"]["recovery"]["from_round"] == 2  # still in the store, until the new one replaces it
    store.save_rounds(run["id"], [round_record(3, run["out_dir"] + "/round_02", 44.0, "bf16", 0.5)])
    at = page()
    at.session_state["model"] = tiny_model
    at.session_state["run"] = job_id
    at.run()
    assert not at.exception and not at.error
    assert "recovery" not in {t["name"] for t in figure(at, ROUNDS)["data"]}
    assert not any(m.label.endswith("recovery") for m in at.metric)
    rounds_table = next(t.value for t in at.dataframe if "round" in t.value.columns)
    assert list(rounds_table["round"]) == [1, 2, 3] and rounds_table["precision"].iloc[-1] == "bf16"


def test_the_recovered_checkpoint_is_a_model_compare_offers_as_after(tiny_model, monkeypatch):
    _, _, recovered = recovered_run(tiny_model)
    model = next(m for m in api.list_models() if m["path"] == recovered)
    base = next(m for m in api.list_models() if m["path"] == tiny_model)
    assert model["parent_id"] == base["id"] and model["pruned"]
    assert model["metrics"]["recovery"] == {"from_round": 2, "epochs": 5}
    assert model["metrics"]["defect_miou"] == 47.5

    def not_now(*_args, **_kwargs):  # the models' listing is what is checked, not a comparison
        raise DefectPruneError("comparison skipped in this test")

    monkeypatch.setattr("core.compare.check_comparable", not_now)
    at = open_page("compare", run=False)
    at.run()
    assert not at.exception
    after = at.selectbox(key="compare_after")
    assert after.value == recovered  # the newest model: the default After
    assert f"#{model['id']} unet-resnet18 pruned (prune/recovered)" in after.options
    assert os.path.isdir(recovered)
