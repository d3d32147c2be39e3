"""Jobs run by a real worker process on a tiny model (64 px synthetic steel, one thread):
order, stop (running, queued, and killed after the grace), a prune job killed with SIGKILL in
its second round, resume, a run store that fails for a moment or through a shutdown, a disk
that fills up while a checkpoint is written, and a save killed between its two renames."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from core.runs import api
from core.runs.store import DB_FILE, FAILED, FINAL_STATES, QUEUED, RUNNING, STOPPED, SUCCEEDED, Store, StoreError
from core.runs.worker import WorkerSettings, _child_env, execute_job, run_worker

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


@pytest.fixture(autouse=True)
def no_job_left_behind(request):
    """The tests share one store: a job a test leaves queued or running (a failure part way)
    would be claimed by the next test and fail it too. Each test ends with every job final,
    so a failure shows once, where it happened."""
    yield
    if "trained" not in request.fixturenames:
        return
    store, _ = request.getfixturevalue("trained")
    for job in store.list_jobs(states=[QUEUED, RUNNING]):
        store.finish_job(job.id, STOPPED, "left unfinished by a test", only_if_running=False)


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
    # The loop reports "round 1 done" once round 1's checkpoint and rounds.json are on disk; in
    # that report the job mirrors the round into the store, writes its progress (metrics: round
    # 1) and goes on into round 2. The job's process group and its worker are killed the moment
    # the store shows that progress: round 2 has just begun and cannot have finished, however
    # fast the machine (killing only the worker would leave the job up to a second to go on).
    wait_for(lambda: store.get_job(job.id).metrics.get("round") == 1, 180, "the first round", interval=0.02)
    job_pid = store.get_job(job.id).pid
    os.killpg(job_pid, signal.SIGKILL)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    wait_for(lambda: not pid_alive(job_pid), 15, "the killed job process to be gone")

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


@pytest.mark.timeout(120)
def test_a_job_process_whose_worker_is_gone_ends_itself(trained):
    store, _ = trained
    job = api.submit("train", {**TINY_DATA, "epochs": 500, "max_steps_per_epoch": 1, "no_early_stop": True}, store)
    assert store.claim_next_job(worker_pid=os.getpid()).id == job.id
    # started as a worker starts it, but told its worker is a process that has ended (and was
    # reaped): what the job process sees once its worker was killed and it was handed on. Not
    # pid 1: pytest may itself be pid 1 in a container without init, and then it is the parent
    gone = subprocess.Popen(["true"])
    assert gone.wait(timeout=30) == 0  # ended and reaped
    ended = subprocess.run([sys.executable, "-m", "core", "worker", "--db", str(store.path), "--run-job", str(job.id),
                            "--parent-pid", str(gone.pid)], cwd=REPO, env=_child_env(store), capture_output=True, timeout=90)
    assert ended.returncode == 137, ended.stdout.decode()[-500:]
    left = store.get_job(job.id)
    assert left.state == RUNNING and left.pid and left.finished_at is None  # its end unrecorded: stale
    assert store.fail_stale_jobs(0) == [job.id]


@pytest.mark.timeout(120)
def test_the_worker_rides_out_a_failing_store_and_keeps_its_job(trained):
    store, checkpoint = trained

    class StoreFailingOnce(Store):
        """The worker's handle: its first write of the job's pid and of its own heartbeat
        fail, as with a database locked past the busy timeout or a full disk."""

        def __init__(self, path: Path):
            super().__init__(path)
            self.failed: list[str] = []

        def _fail_once(self, name: str, error: Exception) -> None:
            if name not in self.failed:
                self.failed.append(name)
                raise error

        def set_job_pid(self, job_id: int, pid: int) -> None:
            self._fail_once("set_job_pid", sqlite3.OperationalError("database is locked"))
            super().set_job_pid(job_id, pid)

        def worker_heartbeat(self, worker_id: int, state: str) -> None:
            self._fail_once("worker_heartbeat", StoreError("cannot write to the run store: database or disk is full"))
            super().worker_heartbeat(worker_id, state)

    job = api.submit("evaluate", {"checkpoint": str(checkpoint), "split": "val", "threads": 1}, store)
    assert [j.id for j in store.list_jobs(states=[QUEUED])] == [job.id]
    flaky, log = StoreFailingOnce(store.path), io.StringIO()
    assert run_worker(flaky, WorkerSettings(poll_seconds=0.1, max_jobs=1), log=log) == 0
    assert flaky.failed == ["set_job_pid", "worker_heartbeat"]
    assert log.getvalue().count("the run store failed") == 2 and "1 running job(s) go on" in log.getvalue()
    done = store.get_job(job.id)
    assert (done.state, done.error, done.attempts) == (SUCCEEDED, None, 1), done.error
    assert done.result["split"] == "val"


@pytest.mark.timeout(180)
def test_a_shutdown_while_the_store_fails_still_stops_the_job(trained):
    store, _ = trained

    class StoreFailingOnceTheJobTrains(Store):
        """The worker's handle: once its job has trained an epoch, the worker is told to shut
        down (SIGTERM) and every later call fails, as on a full disk; after a minute it works
        again, so that a worker which never acts on the shutdown ends the test."""

        failing = healed = False

        def connection(self):
            if self.failing and not self.healed:
                raise StoreError("cannot write to the run store: database or disk is full")
            return super().connection()

        def get_job(self, job_id: int):
            found = super().get_job(job_id)
            # "curve" appears once an epoch is done (its best weights exist to save); "epoch"
            # appears with the first step, and a stop before the first epoch ends saves nothing
            if found.state == RUNNING and found.metrics.get("curve") and not self.failing:
                self.failing = True
                os.kill(os.getpid(), signal.SIGTERM)  # run_worker's handler takes it
            return found

    job = api.submit("train", {**TINY_DATA, "epochs": 500, "max_steps_per_epoch": 1, "no_early_stop": True}, store)
    flaky, log = StoreFailingOnceTheJobTrains(store.path), io.StringIO()
    heal = threading.Timer(60, lambda: setattr(flaky, "healed", True))
    heal.start()
    try:
        assert run_worker(flaky, WorkerSettings(poll_seconds=0.1, stop_grace=60), log=log) == 0
    finally:
        heal.cancel()
    assert flaky.failing and not flaky.healed, log.getvalue()  # it shut down while the store failed
    assert "while shutting down; stopping 1 job(s) by signal" in log.getvalue()
    assert f"job {job.id}: ended (exit code 0)" in log.getvalue()
    stopped = store.get_job(job.id)  # the job stopped as after a stop request and said so itself
    assert stopped.state == STOPPED and stopped.error is None, stopped.error
    assert "best weights so far were saved" in stopped.message


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
    running = wait_for(lambda: (j := store.get_job(long.id)).eta_seconds is not None and j, 10, "an ETA")
    assert running.state == RUNNING and running.eta_seconds > 0 and 0 < running.progress < 1
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
    from safetensors import SafetensorError

    import core.models.checkpoint as checkpoint_module
    from core.models.checkpoint import load_checkpoint, save_checkpoint, tensors_digest

    store, checkpoint = trained
    real_save = checkpoint_module.save_file

    def half_written_then_full(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        # what safetensors raises on a full disk (seen on a full tmpfs): not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint_module, "save_file", half_written_then_full)

    # over an existing checkpoint: the old one stays, whole
    original = load_checkpoint(checkpoint)
    with pytest.raises(SafetensorError, match="No space"):
        save_checkpoint(checkpoint, original.model, original.spec)
    assert tensors_digest(load_checkpoint(checkpoint).model.state_dict()) == tensors_digest(original.model.state_dict())
    assert [p.name for p in checkpoint.parent.iterdir() if p.name.startswith(".")] == [".checkpoint.lock"]

    # inside a job: failed with an actionable message, nothing half-written, the store intact
    job = api.submit("train", {**TINY_DATA, "epochs": 1, "max_steps_per_epoch": 1}, store)
    assert store.claim_next_job(worker_pid=os.getpid()).id == job.id
    assert execute_job(store, job.id) == FAILED
    failed = store.get_job(job.id)
    assert failed.error.startswith(f"no space left on the device; earlier results are intact: free space under "
                                   f"{store.workspace} and submit a new train job")
    folder = store.job_dir(job.id)
    assert not (folder / "checkpoint").exists()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == [".checkpoint.lock"]
    assert store.find_model(folder / "checkpoint") is None
    assert store.query("PRAGMA integrity_check")[0][0] == "ok"
    assert load_checkpoint(checkpoint).spec.classes == original.spec.classes


def test_a_full_disk_is_recognised_through_causes_but_not_past_from_none():
    from core.atomic import disk_full as _no_space

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ws/runs/1/weights.safetensors")

    def raised_over(inner: BaseException, *, suppress: bool) -> ValueError:
        try:
            try:
                raise inner
            except OSError:
                if suppress:
                    raise ValueError("the model does not fit the data") from None
                raise ValueError("the model does not fit the data")
        except ValueError as exc:
            return exc

    assert _no_space(raised_over(full, suppress=False)) == (True, full.filename)  # raised while handling it
    assert _no_space(raised_over(full, suppress=True)) == (False, None)  # from None: it is not the reason
    try:
        raise RuntimeError("cannot save the checkpoint") from raised_over(full, suppress=True)
    except RuntimeError as exc:
        assert _no_space(exc) == (False, None)
    try:
        raise RuntimeError("cannot save the checkpoint") from full
    except RuntimeError as exc:
        assert _no_space(exc) == (True, full.filename)


@pytest.mark.timeout(120)
def test_a_save_killed_between_its_two_renames_loses_no_checkpoint(trained, tmp_path):
    import shutil

    from core.models.checkpoint import load_checkpoint, save_checkpoint, tensors_digest

    _, checkpoint = trained
    target = shutil.copytree(checkpoint, tmp_path / "model")
    original = tensors_digest(load_checkpoint(target).model.state_dict())
    # a process saving different weights over it is killed right after the old folder moved aside
    script = """import os, sys, torch
import core.models.checkpoint as c
real, calls = os.replace, []
def replace(src, dst):
    calls.append(dst)
    if len(calls) == 2:
        os._exit(9)
    real(src, dst)
os.replace = replace
loaded = c.load_checkpoint(sys.argv[1])
with torch.no_grad():
    next(loaded.model.parameters()).zero_()
c.save_checkpoint(sys.argv[1], loaded.model, loaded.spec, loaded.history)
"""
    killed = subprocess.run([sys.executable, "-c", script, str(target)], cwd=REPO, env=_child_env(trained[0]),
                            capture_output=True, text=True, timeout=90)
    assert killed.returncode == 9, killed.stderr[-500:]
    assert not target.exists()
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".model.lock", ".model.old", ".model.tmp"]

    loaded = load_checkpoint(target)  # puts the old one back
    assert tensors_digest(loaded.model.state_dict()) == original
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".model.lock", ".model.tmp", "model"]
    save_checkpoint(target, loaded.model, loaded.spec, loaded.history)  # and the next save sweeps up
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]
    assert tensors_digest(load_checkpoint(target).model.state_dict()) == original


@pytest.mark.timeout(120)
def test_a_prune_stopped_while_fine_tuning_skips_the_test_split(trained):
    from core.data.dataset import SegmentationDataset
    from core.data.registry import load_index
    from core.models.checkpoint import load_checkpoint
    from core.pruning.loop import LoopInputs, LoopSettings, read_rounds, run_prune_loop
    from core.train import TrainConfig

    store, checkpoint = trained
    loaded = load_checkpoint(checkpoint)
    index = load_index("synthetic-steel", store.workspace / "synthetic", num_images=24, image_size=64)
    train, val, test = (SegmentationDataset(index, split, (64, 64), loaded.spec.in_channels)
                        for split in ("train", "val", "test"))
    settings = LoopSettings(method="uniform-l1", target=0.8, step=0.3, finetune_epochs=1, max_rounds=3,
                            calibration_images=4, calibration_batch=2, latency_runs=2,
                            finetune=TrainConfig(epochs=1, batch_size=4, max_steps_per_epoch=1, patience=None))
    out = store.workspace / "stopped-prune"

    def stop_in_round_2_fine_tuning(fraction: float, message: str) -> bool:
        return message.startswith("round 2 fine-tune")

    inputs = LoopInputs(loaded.model, loaded.spec, list(loaded.history), train, val, test)
    result = run_prune_loop(inputs, out, settings,
                            progress=stop_in_round_2_fine_tuning,
                            evaluator=lambda model: {"defect_miou": 50.0, "per_class_iou": {}})
    assert result.stopped == "user" and [r.round for r in read_rounds(out)] == [1]
    assert result.result["checkpoint"] == result.rounds[0].checkpoint
    assert result.result["test"] is None and "stopped" in result.result["test_skipped"]  # round 1 was not tested
    assert json.loads((out / "rounds.json").read_text())["result"]["test_skipped"] == result.result["test_skipped"]


@pytest.mark.timeout(120)
def test_score_and_export_jobs_write_their_artifacts(trained):
    from core.models.checkpoint import load_checkpoint
    from core.profile import count_params

    store, checkpoint = trained
    score = api.submit("score", {"checkpoint": str(checkpoint), "method": "uniform-l1", "target": 0.5, "precision": "bf16",
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


def test_a_prune_job_reads_an_allocation_file_only_inside_the_workspace_or_a_data_root(trained):
    import tempfile

    store, checkpoint = trained
    outside = Path(tempfile.mkdtemp(prefix="defectprune-outside-")) / "allocation.json"
    outside.write_text("{}")
    try:
        job = api.submit("prune", {"checkpoint": str(checkpoint), "allocation": str(outside), "max_rounds": 1,
                                   "finetune_epochs": 0}, store)
        assert store.claim_next_job(worker_pid=os.getpid()).id == job.id
        assert execute_job(store, job.id) == FAILED
        failed = store.get_job(job.id)
        assert "outside the configured data roots" in failed.error and not store.list_rounds(job.id)
    finally:
        outside.unlink()
        outside.parent.rmdir()


def test_job_details_show_rounds_for_the_kinds_that_have_them(tmp_path, monkeypatch):
    """A kind's details carry its prune run and rounds when its JobKind says it has rounds
    (prune), not by its name; a kind this version does not know is shown without them."""
    import dataclasses

    from core.runs import kinds

    store = Store(tmp_path / DB_FILE)
    prune, train, unknown = (store.create_job(kind, {}) for kind in ("prune", "train", "no-such-kind"))
    details = api.job_details(prune, store)
    assert details["prune_run"] is None and details["rounds"] == []
    assert "prune_run" not in api.job_details(train, store) and "rounds" not in api.job_details(train, store)
    assert "rounds" not in api.job_details(unknown, store)
    monkeypatch.setitem(kinds.KINDS, "train", dataclasses.replace(kinds.KINDS["train"], has_rounds=True))
    assert api.job_details(train, store)["rounds"] == []
