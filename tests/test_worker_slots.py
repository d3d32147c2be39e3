"""``python -m core worker --slots N``: two tiny training jobs run at once in a 2-slot worker
(observed from the run store), a third waits for a free slot and takes the one freed, no slot
ever holds two jobs, each job's process gets its slot's device and threads; the cap, the GPU
assignment and the dashboard's slot setting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.runs import api
from core.runs import worker as worker_module
from core.runs.store import DB_FILE, FINAL_STATES, QUEUED, RUNNING, STOPPED, SUCCEEDED, Store
from core.runs.worker import SlotPlan, WorkerSlotsError, _child_env, configured_slots, slot_plan, visible_gpus

REPO = Path(__file__).resolve().parents[1]


def _tiny(root: Path, **extra) -> dict:
    return {"format": "synthetic-steel", "option": {"num_images": 24, "image_size": 64}, "size": "64",
            "batch_size": 4, "root": str(root), "max_steps_per_epoch": 1, **extra}


def _wait(condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.timeout(400)
def test_two_slots_run_two_jobs_at_once_and_never_two_in_one_slot(tmp_path):
    cores = worker_module.cpu_cores()
    if cores < 2:
        pytest.skip("two CPU slots need two cores")
    store = Store(tmp_path / "ws" / DB_FILE)
    # no threads set: each job takes its slot's share of the cores (OMP_NUM_THREADS)
    first = api.submit("train", _tiny(tmp_path / "a", epochs=500, no_early_stop=True), store)
    second = api.submit("train", _tiny(tmp_path / "b", epochs=500, no_early_stop=True), store)
    third = api.submit("train", _tiny(tmp_path / "c", epochs=1), store)
    env = {**_child_env(store), "CUDA_VISIBLE_DEVICES": ""}  # a CPU machine, whatever this one has
    log = open(tmp_path / "worker.log", "ab")
    worker = subprocess.Popen([sys.executable, "-m", "core", "worker", "--db", str(store.path), "--slots", "2",
                               "--poll", "0.2"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        def both_training():
            a, b, c = store.get_job(first.id), store.get_job(second.id), store.get_job(third.id)
            assert c.state == QUEUED, "a third job started while both slots were busy"
            if a.state == b.state == RUNNING and a.metrics.get("epoch") and b.metrics.get("epoch"):
                return a, b
            assert a.state not in FINAL_STATES and b.state not in FINAL_STATES, (a.error, b.error)
            return None

        # both report finished epochs in the same read of the store: they run at once
        a, b = _wait(both_training, 240, "both long jobs to finish an epoch")
        assert {a.slot, b.slot} == {0, 1}
        api.stop(first.id, store)
        done = _wait(lambda: (j := store.get_job(third.id)).state in FINAL_STATES and j, 180,
                     "the third job to take the freed slot and finish")
        assert done.state == SUCCEEDED, done.error
        stopped = store.get_job(first.id)
        assert stopped.state == STOPPED and done.slot == a.slot  # the slot the stopped job left
        assert done.started_at >= stopped.finished_at
        assert store.get_job(second.id).state == RUNNING  # the other slot's job went on meanwhile
        api.stop(second.id, store)
        _wait(lambda: store.get_job(second.id).state in FINAL_STATES, 60, "the second job to stop")

        jobs = [store.get_job(j.id) for j in (first, second, third)]
        for x in jobs:  # one slot, one job at a time
            for y in jobs:
                if x.id < y.id and x.slot == y.slot:
                    assert x.finished_at <= y.started_at or y.finished_at <= x.started_at, (x.id, y.id)
        a, b, c = jobs
        assert a.started_at < b.finished_at and b.started_at < a.finished_at  # their intervals overlap
        threads = max(1, cores // 2)
        for job in jobs:
            text = (store.job_dir(job.id) / "job.log").read_text()
            assert f"in slot {job.slot} (" in text and f"OMP_NUM_THREADS={threads})" in text
        history = json.loads((Path(done.result["checkpoint"]) / "training_history.json").read_text())
        assert history["torch_threads"] == threads  # torch started with its slot's share
        worker_log = (tmp_path / "worker.log").read_text()
        assert f"2 slots: slot 0 (CPU, {threads} CPU thread(s)), slot 1 (CPU, {threads} CPU thread(s))" in worker_log
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGTERM)  # it stops its jobs and leaves
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        for job in store.list_jobs(states=[RUNNING]):
            if job.pid:
                try:
                    os.killpg(job.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        log.close()


def test_slots_take_one_gpu_each_or_share_the_cores():
    plan = slot_plan(2, gpus=["0", "1", "2"], cores=16)
    assert plan.env(0) == {"DEFECTPRUNE_WORKER_SLOT": "0", "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "8",
                           "MKL_NUM_THREADS": "8"}
    assert plan.env(1)["CUDA_VISIBLE_DEVICES"] == "1" and plan.describe(1) == "slot 1 (GPU 1, 8 CPU thread(s))"
    with pytest.raises(ValueError):
        plan.env(2)
    cpu = slot_plan(3, gpus=[], cores=8)
    assert cpu.env(2) == {"DEFECTPRUNE_WORKER_SLOT": "2", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    # one slot leaves the job's environment as it was: every GPU, torch's own thread count
    assert slot_plan(1, gpus=["0", "1"], cores=8).env(0) == {"DEFECTPRUNE_WORKER_SLOT": "0"}
    assert slot_plan(4, gpus=[], cores=4).threads == 1
    with pytest.raises(WorkerSlotsError, match=r"--slots 3 is more than this machine takes: 2 GPU\(s\)"):
        slot_plan(3, gpus=["0", "1"], cores=64)
    with pytest.raises(WorkerSlotsError, match=r"--slots 5 is more than this machine takes: 4 CPU core\(s\)"):
        slot_plan(5, gpus=[], cores=4)
    with pytest.raises(WorkerSlotsError):
        slot_plan(0, gpus=[], cores=4)
    assert SlotPlan(2, ("4", "6"), 1).env(1)["CUDA_VISIBLE_DEVICES"] == "6"


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"]
    assert slot_plan(2, cores=8).env(0)["CUDA_VISIBLE_DEVICES"] == "2"  # slot i: the i-th visible GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,2")
    assert visible_gpus() == ["0"]  # a negative id hides it and the rest
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8c2b,GPU-11af")
    assert visible_gpus() == ["GPU-8c2b", "GPU-11af"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(worker_module.shutil, "which", lambda name: "/usr/bin/nvidia-smi")

    class Listed:
        returncode = 0
        stdout = ("GPU 0: NVIDIA H200 (UUID: GPU-aa)\nGPU 1: NVIDIA H200 (UUID: GPU-bb)\n"
                  "  MIG 1g.18gb Device 0: (UUID: MIG-cc)\n")

    monkeypatch.setattr(worker_module.subprocess, "run", lambda *a, **k: Listed())
    assert visible_gpus() == ["0", "1"]
    monkeypatch.setattr(worker_module.shutil, "which", lambda name: None)
    assert visible_gpus() == []


def test_the_dashboards_worker_takes_its_slots_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(worker_module, "cpu_cores", lambda: 4)
    monkeypatch.delenv("DEFECTPRUNE_WORKER_SLOTS", raising=False)
    assert configured_slots() == 1
    for value, slots in (("3", 3), ("64", 4), ("0", 1), ("many", 1)):  # capped at the cores; nonsense is 1
        monkeypatch.setenv("DEFECTPRUNE_WORKER_SLOTS", value)
        assert configured_slots() == slots, value
    commands = []

    class Started:
        pid = 12345

        def poll(self):
            return None

    def popen(command, **kwargs):
        commands.append(command)
        return Started()

    monkeypatch.setattr(api.subprocess, "Popen", popen)
    monkeypatch.setenv("DEFECTPRUNE_WORKER_SLOTS", "3")
    assert api.ensure_worker(Store(tmp_path / "three" / DB_FILE)) == 12345
    monkeypatch.delenv("DEFECTPRUNE_WORKER_SLOTS")
    assert api.ensure_worker(Store(tmp_path / "one" / DB_FILE)) == 12345
    assert commands[0][-2:] == ["--slots", "3"] and "--slots" not in commands[1]


def test_too_many_slots_is_a_one_line_error(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    slots = worker_module.cpu_cores() + 1
    done = subprocess.run([sys.executable, "-m", "core", "worker", "--db", str(tmp_path / DB_FILE), "--slots",
                           str(slots)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: --slots {slots} is more than this machine takes: {slots - 1} CPU core(s), one job per core at "
        f"least; use --slots {slots - 1} or fewer"]
    assert not (tmp_path / DB_FILE).exists()  # refused before the store was opened
