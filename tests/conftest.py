"""Shared test setup: every test session gets its own workspace, so tests never touch
./workspace; the real datasets are found beside the repository when present."""

from __future__ import annotations

import os
from pathlib import Path

# One compute thread per process: tests start subprocesses (CLI, worker, dashboard) beside
# this one, and two processes each spinning two threads on two cores run many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session", autouse=True)
def isolated_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workspace = tmp_path_factory.mktemp("workspace")
    os.environ["DEFECTPRUNE_WORKSPACE"] = str(workspace)
    os.environ.setdefault("DEFECTPRUNE_DATA_ROOTS", os.pathsep.join([str(workspace / "datasets"), str(tmp_path_factory.getbasetemp())]))
    return workspace


@pytest.fixture(autouse=True)
def no_job_left_queued(isolated_workspace: Path):
    """Tests in one pytest worker share its workspace's run store: a job a test leaves queued
    or running (a failure part way, a test that only submits) would be claimed by a later
    test and fail it. Each test ends with every job there final, so a failure shows once,
    where it happened."""
    yield
    from core.runs.store import DB_FILE, QUEUED, RUNNING, STOPPED, Store

    if not (isolated_workspace / DB_FILE).is_file():
        return
    store = Store(isolated_workspace / DB_FILE)
    try:
        for job in store.list_jobs(states=[QUEUED, RUNNING]):
            store.finish_job(job.id, STOPPED, "left unfinished by a test", only_if_running=False)
    finally:
        store.close()


def shared_dataset(name: str) -> Path:
    """A real dataset from ../shared/datasets, or a skip saying why it is absent."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name} not found at {path} (it lives in ../shared/datasets beside the repository)")
    return path
