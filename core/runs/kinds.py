"""The job kinds: one record each, read by the API (what a job takes, and resume), the worker
(what it runs, what a failure advises), the ``jobs`` command and the dashboard (what a job in
the page's address brings back). Adding a kind is one service, one runner in
`core.runs.jobs` and one line here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.runs.jobs import (
    JobContext, evaluate_job, export_job, import_job, int8_cost_job, prune_job, score_job, train_job,
)
from core.runs.store import JobRecord, JobStateError
from core.services.compare_int8 import Int8CostRequest
from core.services.evaluate import EvaluateRequest
from core.services.export import ExportRequest
from core.services.import_model import ImportRequest
from core.services.prune import PruneRequest
from core.services.request import ParameterError, Request
from core.services.score import ScoreRequest
from core.services.train import TrainRequest

# what a job named in the dashboard's address brings back into an empty session
DATASET, MODEL, RUN = "dataset", "model", "run"


class JobNotResumableError(JobStateError):
    """Resume was asked for a kind of job that cannot continue where it stopped."""


@dataclass(frozen=True)
class JobKind:
    name: str
    request: type[Request]  # what its parameters are (checked at submission, rebuilt by the runner)
    run: Callable[[JobContext], dict[str, Any]]
    description: str
    # continues where it stopped when resumed (a prune run after its last finished round); the
    # others would start over in the same folder and overwrite what they wrote
    resumable: bool = False
    has_rounds: bool = False  # writes a prune run and its rounds to the store (shown with the job's details)
    address: tuple[str, ...] = ()  # the page-address keys naming a job of this kind (``?run=12``)
    restores: frozenset[str] = frozenset()  # of DATASET, MODEL, RUN

    @property
    def takes_checkpoint(self) -> bool:
        """Its parameters name a checkpoint (made absolute at submission)."""
        return self.request.has_field("checkpoint")

    @property
    def takes_dataset(self) -> bool:
        """It runs a checkpoint on a dataset: the model's own, from the store, unless named."""
        return self.takes_checkpoint and self.request.has_field("format")


KINDS: dict[str, JobKind] = {kind.name: kind for kind in (
    JobKind("train", TrainRequest, train_job, "train a model from scratch and save a checkpoint",
            address=("job",), restores=frozenset({DATASET})),
    JobKind("score", ScoreRequest, score_job, "filter scores and the method's allocation, nothing cut",
            address=("score", "sensitivity"), restores=frozenset({DATASET, MODEL})),
    JobKind("prune", PruneRequest, prune_job, "iterative prune-retrain; resumes after its last finished round",
            resumable=True, has_rounds=True, address=("run",), restores=frozenset({DATASET, MODEL, RUN})),
    JobKind("evaluate", EvaluateRequest, evaluate_job, "metrics and per-image table of a checkpoint on a split"),
    JobKind("export", ExportRequest, export_job, "ONNX export checked with ONNX Runtime, and the profile"),
    JobKind("int8-cost", Int8CostRequest, int8_cost_job, "the Compare page's INT8 step: both models' fp32 and "
            "INT8 ONNX files timed in turns and scored with ONNX Runtime"),
    JobKind("import", ImportRequest, import_job, "a model trained elsewhere (smp folder or state dict) as a "
            "checkpoint, evaluated at once", address=("import",), restores=frozenset({DATASET})),
)}
JOB_KINDS = tuple(KINDS)


def job_kind(name: str) -> JobKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ParameterError(f"unknown job kind {name!r}; choose one of {', '.join(JOB_KINDS)}") from None


def job_request(kind: str, params: dict[str, Any]) -> Request:
    """The request a job's parameters stand for; a `ParameterError` for anything its command
    would refuse (checked at submission rather than when the job runs)."""
    return job_kind(kind).request.from_json(params)


def retry_advice(kind: str, job_id: int) -> str:
    """What to do after a job of ``kind`` failed for a reason the user can fix."""
    if kind in KINDS and KINDS[kind].resumable:
        return f"resume the job (`python -m core jobs resume {job_id}`); it continues after its last finished round"
    return f"submit a new {kind} job (its parameters: `python -m core jobs show {job_id}`)"


def check_resumable(job: JobRecord) -> None:
    """Refuse to resume a kind that would start over and overwrite its outputs."""
    if job.kind in KINDS and KINDS[job.kind].resumable:
        return
    resumable = ", ".join(k.name for k in KINDS.values() if k.resumable)
    raise JobNotResumableError(
        f"job {job.id} is a {job.kind} job, which cannot be resumed: it would start over in the same folder and "
        f"overwrite its outputs (only {resumable} jobs continue where they stopped); "
        f"{retry_advice(job.kind, job.id)} instead")


def address_kinds() -> dict[str, JobKind]:
    """Page-address key -> the kind of job it names."""
    return {key: kind for kind in KINDS.values() for key in kind.address}
