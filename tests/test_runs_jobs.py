"""Jobs run by a real worker process on a tiny model (64 px synthetic steel, one thread):
order, stop (running, queued, and killed after the grace), a worker killed with SIGKILL in
the middle of a prune round, resume, and a disk that fills up while a checkpoint is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from core.runs import api
from core.runs.store import DB_FILE, FAILED, FINAL_STATES, RUNNING, STOPPED, SUCCEEDED, Store
from core.runs.worker import _child_env, execute_job

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = {"format": "synthetic-steel", "option": {"num_images": 24, "image_size": 64}, "size": "64",
             "threads": 1, "batch_size": 4}


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def pid_alive(pid: int) -> bool:
    """Running (a zombie whose parent is gone counts as dead)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


class Workers:
    """Worker processes started by a test, and their job processes, ended at teardown."""

    def __init__(self, store: Store, log_dir: Path):
        self.store, self.log_dir, self.pids = store, log_dir, []

    def start(self, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"worker-{len(self.pids)}.log", "ab")
        process = subprocess.Popen([sys.executable, "-m", "core", "worker", "--db", str(self.store.path),
                                    "--poll", "0.2", *args], cwd=REPO, env=_child_env(self.store),
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pids.append(process.pid)
        return process

    def adopt(self, pid: int) -> None:
        self.pids.append(pid)

    def close(self) -> None:
        job_pids = [j.pid for j in self.store.list_jobs() if j.pid]
        for pid in self.pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGTERM)  # a worker stops its jobs and leaves
        end = time.monotonic() + 15
        while time.monotonic() < end and any(pid_alive(p) for p in self.pids):
            time.sleep(0.1)
        for pid in self.pids + job_pids:
            if pid_alive(pid) and _is_ours(pid):
                os.killpg(pid, signal.SIGKILL)


def _is_ours(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"worker" in command and b"core" in command


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, Path]:
    """A store with one trained tiny model (a train job run in this process)."""
    workspace = tmp_path_factory.mktemp("runs-ws")
    store = Store(workspace / DB_FILE)
    job = api.submit("train", {**TINY_DATA, "root": str(workspace / "synthetic"), "epochs": 1,
                               "max_steps_per_epoch": 2}, store)
    assert store.claim_next_job(worker_pid=os.getpid()).id == job.id
    assert execute_job(store, job.id) == SUCCEEDED, store.get_job(job.id).error
    done = store.get_job(job.id)
    checkpoint = Path(done.result["checkpoint"])
    assert checkpoint == store.job_dir(job.id) / "checkpoint"
    model = store.find_model(checkpoint)
    assert model["job_id"] == job.id and model["params"] > 0 and model["macs"] > 0 and not model["pruned"]
    assert done.metrics["epoch"] == 1 and done.progress == 1.0
    [point] = done.metrics["curve"]  # one epoch: one point of the Model page's curves
    assert point["epoch"] == 1 and point["loss"] > 0 and point["val_defect_miou"] is not None
    return store, checkpoint


@pytest.fixture
def workers(trained, tmp_path):
    store, _ = trained
    pool = Workers(store, tmp_path)
    yield pool
    pool.close()


@pytest.mark.timeout(300)
def test_prune_killed_in_its_second_round_keeps_the_first_and_resumes(trained, workers):
    from core.models.checkpoint import load_checkpoint
    from core.profile import count_macs
    from core.pruning.loop import read_rounds

    store, checkpoint = trained
    job = api.submit("prune", {"checkpoint": str(checkpoint), "threads": 1, "batch_size": 4, "target_macs": 0.9,
                               "step": 0.3, "max_rounds": 3, "finetune_epochs": 1, "scoring_steps": 4,
                               "calibration_images": 4, "no_tolerance_stop": True}, store)
    assert job.params["option"] == TINY_DATA["option"]  # the model's dataset, from the store
    worker = workers.start("--heartbeat-timeout", "3")
    # round 1 is mirrored into the store from the loop's first progress report after it is on
    # disk, so the job is past round 1 and into round 2 when the kill lands. A fast machine may
    # even have saved round 2's checkpoint folder; the round is finished only once rounds.json
    # lists it, and resume redoes it.
    wait_for(lambda: store.list_rounds(job.id), 180, "the first round", interval=0.02)
    job_pid = store.get_job(job.id).pid
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    wait_for(lambda: not pid_alive(job_pid), 15, "the job process to end with its worker")

    out = store.job_dir(job.id) / "prune"
    assert [r.round for r in read_rounds(out)] == [1]
    first = store.list_rounds(job.id)
    assert [r["round"] for r in first] == [1]
    loaded = load_checkpoint(first[0]["checkpoint"])
    assert loaded.history and count_macs(loaded.model, (64, 64), loaded.spec.in_channels) == first[0]["macs"]
    assert store.find_model(first[0]["checkpoint"])["pruned"]
    assert store.get_job(job.id).state == RUNNING  # nobody knows yet

    wait_for(lambda: time.time() - store.get_job(job.id).heartbeat_at > 3.2, 10, "the heartbeat to go stale")
    workers.start("--heartbeat-timeout", "3")  # the next worker's start notices
    failed = wait_for(lambda: (j := store.get_job(job.id)).state == FAILED and j, 30, "the job to be failed")
    assert "worker stopped responding (killed or crashed) at" in failed.error

    api.resume(job.id, store)
    done = wait_for(lambda: (j := store.get_job(job.id)).state in FINAL_STATES and j, 200, "the resumed job")
    assert done.state == SUCCEEDED, done.error
    assert done.attempts == 2 and done.result["resumed_from_round"] == 1
    rounds = store.list_rounds(job.id)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["record"] == first[0]["record"]  # round 1 was kept, not done again
    assert rounds[0]["macs"] > rounds[1]["macs"] > rounds[2]["macs"]
    assert [r.round for r in read_rounds(out)] == [1, 2, 3]
    assert store.get_prune_run(job.id)["result"]["checkpoint"] == str(out / "round_03")


@pytest.mark.timeout(240)
def test_jobs_run_in_order_and_stop_a_running_and_a_queued_job(trained, workers):
    from core.models.checkpoint import load_checkpoint

    store, checkpoint = trained
    first = api.submit("evaluate", {"checkpoint": str(checkpoint), "split": "val", "threads": 1}, store)
    second = api.submit("evaluate", {"checkpoint": str(checkpoint), "split": "test", "threads": 1}, store)
    long = api.submit("train", {**TINY_DATA, "epochs": 500, "max_steps_per_epoch": 1, "no_early_stop": True}, store)
    queued = api.submit("evaluate", {"checkpoint": str(checkpoint), "threads": 1}, store)
    assert api.stop(queued.id, store).state == STOPPED  # a queued job stops at once

    pid = api.ensure_worker(store, idle_exit=120, extra_args=["--poll", "0.2"])  # as the dashboard does
    assert pid
    workers.adopt(pid)
    wait_for(lambda: api.worker_alive(store), 20, "the worker to start")
    assert api.ensure_worker(store) is None  # one worker per workspace

    wait_for(lambda: store.get_job(long.id).metrics.get("val_defect_miou") is not None, 180,
             "the long training to finish an epoch")
    asked = time.monotonic()
    api.stop(long.id, store)
    stopped = wait_for(lambda: (j := store.get_job(long.id)).state != RUNNING and j, 30, "the stop")
    assert time.monotonic() - asked < 10  # honoured between steps, well before the kill
    assert stopped.state == STOPPED and stopped.error is None
    assert stopped.message.startswith("stopped after") and "best weights so far were saved" in stopped.message
    assert load_checkpoint(stopped.result["checkpoint"]).spec.input_size == (64, 64)

    a, b, d = store.get_job(first.id), store.get_job(second.id), store.get_job(queued.id)
    assert a.state == b.state == SUCCEEDED
    assert a.started_at < a.finished_at <= b.started_at < b.finished_at <= stopped.started_at
    assert a.result["split"] == "val" and b.result["split"] == "test"
    assert json.loads((store.job_dir(a.id) / "evaluation.json").read_text())["defect_miou"] == a.result["defect_miou"]
    assert (d.state, d.started_at, d.attempts) == (STOPPED, None, 0)


@pytest.mark.timeout(120)
def test_a_job_that_ignores_the_stop_is_killed_after_the_grace(trained, workers):
    store, _ = trained
    worker = workers.start("--stop-grace", "0.3")
    job = api.submit("train", {**TINY_DATA, "epochs": 5, "max_steps_per_epoch": 1}, store)
    # stopped while its process still starts (imports torch): it cannot answer within 0.3 s
    running = wait_for(lambda: (j := store.get_job(job.id)).state == RUNNING and j.pid and j, 30, "the start")
    api.stop(job.id, store)
    ended = wait_for(lambda: (j := store.get_job(job.id)).state in FINAL_STATES and j, 30, "the kill")
    assert ended.state == STOPPED and ended.error is None
    assert "did not stop within the 0.3 s grace and was killed" in ended.message
    wait_for(lambda: not pid_alive(running.pid), 10, "the killed job process to be gone")
    # a second worker on the same workspace leaves at once
    second = subprocess.run([sys.executable, "-m", "core", "worker", "--db", str(store.path)], cwd=REPO,
                            env=_child_env(store), capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "another worker already runs jobs" in second.stderr
    assert worker.poll() is None


@pytest.mark.timeout(120)
def test_a_full_disk_while_saving_fails_the_job_and_leaves_no_partial_checkpoint(trained, monkeypatch):
    import core.models.checkpoint as checkpoint_module
    from core.models.checkpoint import load_checkpoint, save_checkpoint, tensors_digest

    store, checkpoint = trained
    real_save = checkpoint_module.save_file

    def half_written_then_full(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(checkpoint_module, "save_file", half_written_then_full)

    # over an existing checkpoint: the old one stays, whole
    original = load_checkpoint(checkpoint)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(checkpoint, original.model, original.spec)
    assert tensors_digest(load_checkpoint(checkpoint).model.state_dict()) == tensors_digest(original.model.state_dict())
    assert [p.name for p in checkpoint.parent.iterdir() if p.name.startswith(".")] == []

    # inside a job: failed with an actionable message, nothing half-written, the store intact
    job = api.submit("train", {**TINY_DATA, "epochs": 1, "max_steps_per_epoch": 1}, store)
    assert store.claim_next_job(worker_pid=os.getpid()).id == job.id
    assert execute_job(store, job.id) == FAILED
    failed = store.get_job(job.id)
    assert failed.error.startswith("no space left on the device while writing") and "resume the job" in failed.error
    folder = store.job_dir(job.id)
    assert not (folder / "checkpoint").exists()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
    assert store.find_model(folder / "checkpoint") is None
    assert store.query("PRAGMA integrity_check")[0][0] == "ok"
    assert load_checkpoint(checkpoint).spec.classes == original.spec.classes


@pytest.mark.timeout(120)
def test_score_and_export_jobs_write_their_artifacts(trained):
    from core.models.checkpoint import load_checkpoint
    from core.profile import count_params

    store, checkpoint = trained
    score = api.submit("score", {"checkpoint": str(checkpoint), "method": "uniform-l1", "target": 0.5,
                                 "calibration_images": 4, "batch_size": 4, "threads": 1}, store)
    export = api.submit("export", {"checkpoint": str(checkpoint), "runs": 2, "warmup": 1}, store)
    for job in (score, export):
        assert store.claim_next_job(worker_pid=os.getpid()).id == job.id
        assert execute_job(store, job.id) == SUCCEEDED, store.get_job(job.id).error

    scores = json.loads((store.job_dir(score.id) / "scores.json").read_text())
    assert scores["allocator"] == "uniform" and scores["criterion"] == "l1" and scores["groups"]
    for group in scores["groups"]:
        assert len(group["scores"]) == group["channels"] >= group["kept"] >= 1
        assert len(group["removed"]) == group["channels"] - group["kept"]
        assert all(0 <= i < group["channels"] for i in group["removed"])
    assert scores["allocation"]["predicted"]["macs_reduction"] == pytest.approx(0.5, abs=0.05)

    done = store.get_job(export.id)
    assert done.result["max_abs_diff"] < 1e-3
    profile = json.loads((store.job_dir(export.id) / "profile.json").read_text())
    assert profile["params"] == count_params(load_checkpoint(checkpoint).model)
    kinds = {a["kind"]: a for a in store.list_artifacts(export.id)}
    assert set(kinds) == {"onnx", "profile"} and kinds["onnx"]["bytes"] == (store.job_dir(export.id) / "model.onnx").stat().st_size
    assert kinds["onnx"]["model_id"] == store.find_model(checkpoint)["id"]
