"""The sidebar workspace (current dataset, model, run) and cached access to core objects."""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import streamlit as st
from streamlit.runtime.scriptrunner_utils.exceptions import RerunException, StopException

from core import safe_json
from core.config import confine_to_data_roots, data_roots, workspace_dir
from core.data.base import DatasetIndex, DatasetRootMissingError
from core.data.registry import DEFAULT_FORMAT, format_names, is_synthetic, load_index
from core.errors import DefectPruneError
from core.runs import api
from core.runs.kinds import DATASET, MODEL, RUN, address_kinds, job_kind
from core.runs.store import JobNotFoundError, JobRecord
from core.services.export import ExportResult
from core.services.compare_int8 import Int8CostResult
from core.services.request import SEED, ParameterError, Request
from core.services.score import ScoreResult

log = logging.getLogger("defectprune.ui")


class DatasetOptionsError(DefectPruneError):
    pass


class JobIdError(DefectPruneError):
    """A job id in the page's address is not a job id."""


class JobResultError(DefectPruneError):
    """A finished job's result file is gone or unreadable."""


class AddressValueError(DefectPruneError):
    """A workspace value in the page's address (``?format=``, ``?seed=``, ...) is unusable."""


# The workspace in the page's address, so a refresh or a shared link reopens it: the dataset
# (``?format=&root=&seed=&options=``) and the model (``?model=``, relative to the workspace when
# inside it). The run is ``?run=ID``, the prune job's own address key (core/runs/kinds.py).
DATASET_KEYS = ("format", "root", "seed", "options")
MODEL_KEY = "model"
RUN_KEY = "run"


@dataclass(frozen=True)
class DatasetChoice:
    format: str = DEFAULT_FORMAT
    root: str | None = None  # None: the synthetic cache in the workspace
    seed: int = 0
    options: str = ""  # format options as JSON text, e.g. {"category": "bottle"} for mvtec

    def parsed_options(self) -> dict:
        if not self.options.strip():
            return {}
        value = safe_json.loads(self.options, 'the format options (write e.g. {"category": "bottle"})',
                                DatasetOptionsError)
        if not isinstance(value, dict):
            raise DatasetOptionsError('options must be a JSON object, e.g. {"category": "bottle"}')
        return value

    @property
    def label(self) -> str:
        return self.format if is_synthetic(self.format) else f"{self.format} ({self.root})"


def current_dataset() -> DatasetChoice:
    if "dataset" not in st.session_state:
        st.session_state["dataset"] = asdict(DatasetChoice())
    return DatasetChoice(**st.session_state["dataset"])


def set_dataset(choice: DatasetChoice) -> None:
    st.session_state["dataset"] = asdict(choice)


@st.cache_resource(show_spinner="Reading the dataset (every image and mask is checked once)...")
def cached_index(format_name: str, root: str | None, seed: int, options: str) -> DatasetIndex:
    return load_index(format_name, root, seed=seed, **DatasetChoice(format_name, root, seed, options).parsed_options())


def dataset_index(choice: DatasetChoice) -> DatasetIndex:
    if choice.root and not Path(choice.root).is_dir():
        # the cached index would fail on its first image with a less telling message
        raise DatasetRootMissingError(f"dataset folder {choice.root} does not exist (any more); restore it or "
                                      "choose another dataset on the Data page")
    return cached_index(choice.format, choice.root, choice.seed, choice.options)


@contextmanager
def error_box(action: str) -> Iterator[None]:
    """Show a failure as an error box, never a traceback; the page keeps what it had.

    Errors a user can act on show their message; anything else is a bug: its traceback goes
    to the server log and the box says so."""
    try:
        yield
    except (StopException, RerunException):
        raise  # Streamlit's own control flow, not an error
    except DefectPruneError as exc:
        st.error(f"{action} failed: {exc}")
    except Exception as exc:  # noqa: BLE001 - the dashboard must never show a traceback
        log.error("%s failed unexpectedly:\n%s", action, traceback.format_exc())
        st.error(f"{action} failed unexpectedly ({type(exc).__name__}: {exc}). "
                 "The details are in the server log.")


@st.cache_resource(show_spinner="Loading the checkpoint...", max_entries=8)
def cached_checkpoint(path: str, mtime: float):
    """A loaded checkpoint, cached by path and modification time (a re-save reloads)."""
    from core.models.checkpoint import load_checkpoint

    return load_checkpoint(path)


def weights_mtime(path: str) -> float:
    """The version of a checkpoint's weights (the cache key); a checkpoint whose folder or
    weights file is gone is a named error, not an OSError."""
    from core.models.checkpoint import WEIGHTS_FILE, CheckpointMissingFileError, restore_interrupted_save

    restore_interrupted_save(path)  # a save killed between its renames left the old folder aside
    file = Path(path, WEIGHTS_FILE)
    try:
        return file.stat().st_mtime
    except OSError:
        where = f"{file} is missing" if Path(path).is_dir() else f"checkpoint folder {path} does not exist"
        raise CheckpointMissingFileError(f"{where}; load another checkpoint on the Model page") from None


def checkpoint_at(path: str):
    """A checkpoint, loaded once per version of its weights."""
    return cached_checkpoint(path, weights_mtime(path))


def current_checkpoint():
    """The model chosen on the Model page, loaded, or None."""
    path = st.session_state.get("model")
    return checkpoint_at(path) if path else None


def choose_model(path: str):
    """Make ``path`` the workspace's model, once it has loaded: a checkpoint that fails to load
    raises here (the caller's error box says why, once) and the working model stays the
    workspace's model (and the sidebar's)."""
    loaded = checkpoint_at(path)
    st.session_state["model"] = path
    return loaded


@st.cache_resource(show_spinner="Tracing the model's prunable groups...", max_entries=4)
def cached_cost_model(path: str, mtime: float):
    """The pruning graph and closed-form cost model of a checkpoint (built once: seconds;
    every answer afterwards: milliseconds)."""
    from core.allocation.cost import CostModel
    from core.models.graph import PruningGraph

    loaded = cached_checkpoint(path, mtime)
    graph = PruningGraph.traced(loaded.model, loaded.spec.input_size, loaded.spec.in_channels)
    return graph, CostModel(graph)


def current_cost_model():
    path = st.session_state.get("model")
    return cached_cost_model(path, weights_mtime(path))


def query_job_id(key: str) -> int | None:
    """The job id in the page's address (``?key=12``: a refreshed or reopened tab finds its
    job again), or None."""
    value = st.query_params.get(key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise JobIdError(f"?{key}={value} in the address is not a job id (a whole number); "
                         "remove it from the address") from None


def job_json(job, key: str) -> dict:
    """The JSON file a finished job names in its result under ``key`` (e.g. a score job's
    ``scores``), cached by modification time."""
    path = (job.result or {}).get(key)
    if not path:
        raise JobResultError(f"job {job.id} ({job.kind}) finished without a {key} file; run it again")
    try:
        mtime = Path(path).stat().st_mtime
    except OSError:
        raise JobResultError(f"{path}, the {key} file of job {job.id}, is gone (was the workspace cleaned?); "
                             "run the job again") from None
    return cached_json(path, mtime)


@st.cache_data(show_spinner=False, max_entries=16)
def cached_json(path: str, mtime: float) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JobResultError(f"{path} is not readable JSON ({exc}); run the job that wrote it again") from None


def require_model(missing: str = "No model yet: train or load one on the Model page.", stop: bool = True):
    """The current model, loaded; or an info box saying what to do, and the page stops (with
    ``stop=False`` it goes on without a model: None). Choosing a model only replaces the working
    one once it loaded (`choose_model`); a model that loaded when chosen and whose files broke
    later stays chosen (one error box says why): repairing its files and rerunning brings the
    page back."""
    loaded = None
    with error_box("Loading the model"):
        loaded = current_checkpoint()
    if loaded is None:
        st.info("Repair or replace that checkpoint, or choose another model on the Model page."
                if st.session_state.get("model") else missing)
        if stop:
            st.stop()
    return loaded


def require_dataset(choice: DatasetChoice, missing: str) -> DatasetIndex:
    """The chosen dataset's index; or an error box and ``missing`` as advice, and the page stops."""
    index = None
    with error_box(f"Reading {choice.label}"):
        index = dataset_index(choice)
    if index is None:
        st.info(missing)
        st.stop()
    return index


def job_request(job: JobRecord) -> Request:
    """The request a job was submitted with, rebuilt from its parameters (pages read a job's
    settings from it, never from the stored JSON)."""
    return job_kind(job.kind).request.from_json(job.params)


def score_result(job: JobRecord) -> ScoreResult:
    """What a finished score job found (its ``scores.json``)."""
    return ScoreResult.from_json(job_json(job, "scores"))


def export_result(job: JobRecord) -> ExportResult:
    """What a finished export job made (the ONNX file's path, its size, ...), from its result."""
    return _typed_result(job, ExportResult.from_json, "export", "export again")


def int8_cost_result(job: JobRecord) -> Int8CostResult:
    """What a finished INT8 step measured (`Int8CostResult`), from its result."""
    return _typed_result(job, Int8CostResult.from_json, "INT8", "measure INT8 again")


def _typed_result(job: JobRecord, read: Callable[[dict], Any], what: str, again: str) -> Any:
    try:
        return read(job.result or {})
    except (KeyError, TypeError, ValueError):
        raise JobResultError(f"job {job.id} ({job.kind}) finished without a readable {what} result; {again}") from None


def address_jobs() -> list[JobRecord]:
    """The jobs the page's address names (``?run=``, ``?score=``, ``?sensitivity=``,
    ``?job=``: each kind's address keys), those of the right kind, the page's own job first
    (``?run=`` names the workspace's run on every page); a bad or unknown id is left to the page
    that reads that key, which says what is wrong with it."""
    found = []
    for key, kind in sorted(address_kinds().items(), key=lambda item: item[0] == RUN_KEY):
        try:
            job_id = query_job_id(key)
            job = api.get_job(job_id) if job_id is not None else None
        except (JobIdError, JobNotFoundError):
            continue
        if job is not None and job.kind == kind.name:
            found.append(job)
    return found


def job_workspace(jobs: list[JobRecord]) -> dict:
    """What the jobs in the address bring back (what their kinds restore: the dataset; the
    checkpoint as the model; a prune job as the run), the first job naming each first."""
    restored: dict = {}
    for job in jobs:
        restores = job_kind(job.kind).restores
        request = job_request(job)
        if DATASET in restores and getattr(request, "format", None) and DATASET not in restored:
            restored[DATASET] = DatasetChoice(format=request.format, root=request.root,
                                              seed=int(request.split_seed or 0),
                                              options=json.dumps(request.option) if request.option else "")
        if MODEL in restores and getattr(request, "checkpoint", None) and MODEL not in restored:
            restored[MODEL] = request.checkpoint
        if RUN in restores and RUN not in restored:
            restored[RUN] = job.id
    return restored


def address_dataset() -> DatasetChoice | None:
    """The dataset the address names (``?format=&root=&seed=&options=``), checked and read
    once, or None when it names none. The root is a path typed by whoever wrote the link: it
    must lie inside a data root (or the workspace's datasets folder, where uploads go)."""
    params = st.query_params
    if not any(params.get(key) for key in DATASET_KEYS):
        return None
    fmt = params.get("format") or DEFAULT_FORMAT
    if fmt not in format_names():
        raise AddressValueError(f"?format={fmt} is not a dataset format (known: {', '.join(format_names())})")
    seed_text = params.get("seed") or "0"
    try:
        seed = SEED.parse(seed_text)
    except ParameterError as exc:
        raise AddressValueError(f"?seed={seed_text}: {exc}") from None
    root = None
    if not is_synthetic(fmt):  # the synthetic families live in the workspace's cache: no root
        if not params.get("root"):
            raise AddressValueError(f"?format={fmt} needs the dataset folder as ?root=FOLDER")
        root = str(confine_to_data_roots(params["root"], roots=[*data_roots(), workspace_dir() / "datasets"]))
    choice = DatasetChoice(format=fmt, root=root, seed=seed, options=params.get("options") or "")
    choice.parsed_options()
    dataset_index(choice)  # a folder that is gone or unreadable is refused here, not on every page
    return choice


def address_model() -> str | None:
    """The checkpoint the address names (``?model=``), loaded once, or None when it names
    none. It must lie inside the workspace or a data root (as a prune job's allocation file,
    core/runs/jobs.py); a relative path is taken against the workspace first."""
    value = st.query_params.get(MODEL_KEY)
    if not value:
        return None
    folder = str(confine_to_data_roots(value, roots=[workspace_dir(), *data_roots()]))
    checkpoint_at(folder)
    return folder


def restore_from_address() -> None:
    """A refreshed or reopened tab (or a shared link) starts with an empty session: its address
    brings the workspace back: the dataset and model named there (``?format=``, ``?model=``
    ...) and, for what those do not name, the jobs there (``?run=``, ``?job=`` ...: what their
    kinds restore). A bad value there is one error box and the default dataset and model (the
    run in ``?run=`` is left to its own checks). Only a session that has chosen nothing yet is
    restored: what the user chose in this session wins."""
    if "model" in st.session_state or "dataset" in st.session_state:
        return
    restored: dict = {}
    with error_box("Reading the job in the address"):
        restored = job_workspace(address_jobs())
    named: dict = {}
    with error_box("Reopening the workspace in the address"):
        dataset, model = address_dataset(), address_model()
        named = {key: value for key, value in ((DATASET, dataset), (MODEL, model)) if value is not None}
        named["ok"] = True
    if not named.pop("ok", False):  # a bad value: the default workspace, nothing half-restored
        restored.pop(DATASET, None)
        restored.pop(MODEL, None)
    restored.update(named)
    if DATASET in restored:
        set_dataset(restored[DATASET])
    if MODEL in restored:
        st.session_state["model"] = restored[MODEL]
    if RUN in restored:
        st.session_state["run"] = restored[RUN]


def address_path(path: str) -> str:
    """A checkpoint path as the address writes it: relative to the workspace when inside it."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(workspace_dir()).as_posix()
    except ValueError:
        return str(resolved)


def workspace_address() -> dict[str, str]:
    """The workspace as address values (only those it has)."""
    choice = current_dataset()
    values = {"format": choice.format, "seed": str(choice.seed)}
    if choice.root:
        values["root"] = choice.root
    if choice.options.strip():
        values["options"] = choice.options
    model = st.session_state.get("model")
    if model:
        values[MODEL_KEY] = address_path(model)
    return values


def write_address() -> None:
    """The workspace into the page's address on every run, so a refresh or a copied link
    reopens it (`restore_from_address`). Keys the pages set (``?job=``, ``?score=``) stay;
    ``?run=`` names the session's run when it has one, else it is left to the page (the Prune
    page says what is wrong with a bad one)."""
    with error_box("Writing the workspace into the address"):
        wanted = workspace_address()
        for key in (*DATASET_KEYS, MODEL_KEY):
            if key in wanted:
                if st.query_params.get(key) != wanted[key]:
                    st.query_params[key] = wanted[key]
            elif key in st.query_params:
                del st.query_params[key]
        run = st.session_state.get("run")
        if run is not None and st.query_params.get(RUN_KEY) != str(run):
            st.query_params[RUN_KEY] = str(run)


def run_label(run_id: int) -> str:
    """A prune run as the sidebar names it: id, method and state."""
    try:
        job = api.get_job(int(run_id))
    except DefectPruneError:
        return f"#{run_id} (not in the run store)"
    except Exception:  # noqa: BLE001 - drawn on every page, outside any page's error box
        log.error("reading run %s for the sidebar failed:\n%s", run_id, traceback.format_exc())
        return f"#{run_id} (run store unreadable: see the server log)"
    try:
        method = getattr(job_request(job), "method", "")
    except ParameterError:  # parameters this version no longer reads: the label goes without
        method = ""
    return f"#{job.id} {method} ({job.state})"


def sidebar_workspace() -> None:
    """What the user is working on, on every page."""
    with st.sidebar:
        st.markdown("### Workspace")
        st.markdown(f"**Dataset:** {current_dataset().label}")
        model = st.session_state.get("model")
        # the last two folders name a checkpoint well enough (runs/12/checkpoint, round_03)
        short = "/".join(Path(model).parts[-2:]) if model else "— none yet (Model page)"
        st.markdown(f"**Model:** {short}", help=model)
        run = st.session_state.get("run")
        st.markdown(f"**Run:** {run_label(run) if run else '— none yet (Prune page)'}")
