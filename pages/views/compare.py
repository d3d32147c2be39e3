"""Compare: two models on the same images, class by class and image by image, with the cost
beside the accuracy; downloads of the pruned checkpoint, its ONNX export and a report. The
work is `core.services.compare` (predicting, cached) and an export job (in the worker)."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from core.compare import ALL_CLASSES, cost_rows
from core.data.base import DatasetIndex
from core.errors import DefectPruneError
from core.runs import api
from core.runs.store import FAILED, STOPPED, SUCCEEDED, JobRecord
from core.services.compare import (CompareRequest, CompareResult, checked_specs, checkpoint_zip, compare_costs,
                                   run_compare)
from core.services.compare_int8 import Int8CostRequest, Int8CostResult
from core.services.export import ExportRequest
from core.visual import class_colour_hex, diff_overlay, overlay_mask
from ui import background
from ui.jobs import follow_job, job_bar
from ui.state import (current_dataset, dataset_index, error_box, export_result, int8_cost_result, job_request,
                      weights_mtime)
from ui.widgets import class_legend, load_style

load_style()
st.title("Compare")
st.caption("Ground truth, before and after, for the same images; what changed per class and per image; "
           "and what each model costs.")


@dataclass(frozen=True)
class RunPair:
    """What a prune run compares: its starting checkpoint (before) and its best kept model
    (after: its result once it ended, else its last kept round; None while it has none)."""

    run: int
    before: str
    after: str | None
    after_words: str  # which model after is, in words

    def within(self, paths: list[str]) -> RunPair:
        """The same pair spelt as ``paths`` spells each checkpoint (the store's paths), the
        checkpoints ``paths`` lacks added to it when their folders are there."""
        return replace(self, before=_listed(self.before, paths), after=self.after and _listed(self.after, paths))


def _same(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _listed(path: str, paths: list[str]) -> str:
    for known in paths:
        if _same(known, path):
            return known
    if Path(path).is_dir():
        paths.append(path)
    return path


def run_pair(run_id: int) -> RunPair | None:
    job = api.get_job(run_id)
    if job.kind != "prune":
        return None
    after, words = api.prune_run(job.id).best_kept()
    return RunPair(run=job.id, before=job_request(job).checkpoint, after=after, after_words=words)


def _chosen() -> None:
    """The user chose a model: that pair stays, over the workspace run's, in this session (also
    after visiting another page, where the widgets' own state is dropped)."""
    st.session_state["compare_choice"] = {side: st.session_state.get(f"compare_{side}") for side in SIDES}


SIDES = ("before", "after")
models = []
with error_box("Listing models"):
    models = api.list_models()
current = st.session_state.get("model")
paths = [m["path"] for m in models]
if current and current not in paths:
    paths.insert(0, current)
pair: RunPair | None = None
if st.session_state.get("run"):
    with error_box(f"Reading run {st.session_state['run']}"):
        pair = run_pair(int(st.session_state["run"]))
        pair = pair and pair.within(paths)
if len(paths) < 2:
    st.info("Comparing needs two models: train a baseline on the Model page and prune it on the Prune page.")
    st.stop()
labels = {m["path"]: f"#{m['id']} {m['arch']}-{m['encoder']}{' pruned' if m['pruned'] else ''} "
                     f"({Path(m['path']).parent.name}/{Path(m['path']).name})" for m in models}
if st.session_state.pop("compare_run", None) is not None:  # "Compare this run" on the Prune page
    st.session_state.pop("compare_choice", None)
choice = st.session_state.get("compare_choice") or {}
# The run's pair until the user chooses otherwise; then theirs (while both are still listed).
preset = {"before": paths[0], "after": paths[-1]}
if pair and not choice:
    preset["before"] = pair.before if pair.before in paths else preset["before"]
    preset["after"] = pair.after if pair.after in paths else preset["after"]
for side in SIDES:  # set before the widgets are drawn: their values, whatever page the user came from
    st.session_state[f"compare_{side}"] = choice[side] if choice.get(side) in paths else preset[side]
c1, c2, c3 = st.columns([2, 2, 1])
before = c1.selectbox("Before", paths, format_func=lambda p: labels.get(p, p), key="compare_before",
                      on_change=_chosen)
after = c2.selectbox("After", paths, format_func=lambda p: labels.get(p, p), key="compare_after", on_change=_chosen)
split = c3.selectbox("Split", ["val", "test"], key="compare_split")
if pair and not choice:
    if pair.after in paths:
        st.caption(f"Run #{pair.run}: before is its starting model, after is {pair.after_words}. Choose others above "
                   "to compare those instead.")
    elif pair.after is None:
        st.info(f"Run #{pair.run} has {pair.after_words}: its starting model is before; choose the after model.")
    else:
        st.warning(f"Run #{pair.run}'s model to compare, {pair.after_words}, is gone ({pair.after}): its starting "
                   "model is before; choose the after model.")


def comparison(request: CompareRequest, versions: tuple[float, float], index: DatasetIndex,
               foreground: bool = True) -> CompareResult | None:
    """The comparison of ``request`` (both checkpoints at ``versions``: a model retrained or
    re-pruned at the same path is compared afresh) once it is done; until then None and a bar
    in its place (`ui.background`: the rest of the page is drawn meanwhile). Without
    ``foreground``, started after the queued work for a later page run (the other split)."""
    key = repr((request, versions))

    def compare(report) -> CompareResult:
        return run_compare(request, lambda fraction, message: report(fraction, f"comparing: {message}"), index=index)

    if not foreground:
        background.prefetch("compare", key, compare)
        return None
    checked_specs(request)  # a pair that cannot be compared is refused at once, not after a poll
    return background.result("compare", key, compare, "Predicting both models")


def costs(before: str, after: str, versions: tuple[float, float]) -> list[dict] | None:
    """Both models' cost, measured together (timed in turns: a cost of one model measured at
    another moment, at another load on the machine, made a pruned model look slower), once it
    is done; until then None and a bar in the table's place."""
    return background.result("cost", repr((before, after, versions)), lambda _report: cost_rows([before, after], runs=10),
                             "Measuring cost (latency: torch and ONNX Runtime, 1 thread)")


def onnx_download(onnx: Path, int8: bool = False) -> None:
    if int8:
        st.download_button("model.int8.onnx", onnx.read_bytes, file_name="model.int8.onnx", key="dl_onnx_int8",
                           help="the after model as one static INT8 ONNX file (QDQ, per-channel weights, calibrated "
                                "on seeded training images of the chosen dataset); its metadata names the classes, "
                                "input size and normalisation, and how it was quantised")
        return
    st.download_button("model.onnx", onnx.read_bytes, file_name="model.onnx", key="dl_onnx",
                       help="the after model as one ONNX file (opset 17, dynamic batch); its metadata names "
                            "the classes, input size and normalisation")


def draw_export(job: JobRecord) -> None:
    """The export job's bar while the worker exports, then the file to download in its place."""
    int8 = job_request(job).int8
    what = "Exporting INT8 ONNX" if int8 else "Exporting ONNX"
    if job.state == SUCCEEDED:
        onnx_download(Path(export_result(job).path), int8)
    elif job.state == FAILED:
        st.error(f"{what} failed: {job.error}")
    else:
        job_bar(job, what)


def exported_onnx(wanted: ExportRequest, mtime: float) -> Path | None:
    """An earlier export that wrote the file ``wanted`` asks for (this version of the checkpoint;
    an INT8 one calibrated on the same dataset and images) and is still there: offered for
    download at once, without exporting again (also after a refresh)."""
    for job in api.list_jobs(states=[SUCCEEDED], kind="export", limit=50):
        try:
            asked, onnx = job_request(job), Path(export_result(job).path)
        except DefectPruneError:  # an export whose record no longer reads: not one to offer
            continue
        if wanted.writes_same_file(asked) and onnx.is_file() and onnx.stat().st_mtime >= mtime:
            return onnx
    return None


def measured_int8(wanted: Int8CostRequest, mtimes: tuple[float, float]) -> tuple[JobRecord, Int8CostResult] | None:
    """An earlier INT8 step of these models' versions on this dataset and split, and what it
    measured: its numbers join the cost table at once (also after a refresh), without
    measuring again."""
    for job in api.list_jobs(states=[SUCCEEDED], kind="int8-cost", limit=50):
        if (job.started_at or 0) < max(mtimes):
            continue
        try:
            if job_request(job) == wanted:
                return job, int8_cost_result(job)
        except DefectPruneError:  # a record this version no longer reads: not one to show
            continue
    return None


def draw_int8(job: JobRecord) -> None:
    """The INT8 step's bar (with its Stop button) while the worker measures; its error once it
    failed (the cost table above keeps its fp32 rows). Once it succeeded the page reruns and
    the table has its rows."""
    if job.state == FAILED:
        st.error(f"Measuring INT8 failed: {job.error}")
    elif job.state == STOPPED:
        st.info("The INT8 step was stopped; measure again to add its rows.")
    elif job.state != SUCCEEDED:
        job_bar(job, "Measuring INT8 (export, calibration, timing, scoring with ONNX Runtime)", stoppable=True)


result: CompareResult | None = None
with error_box("Comparing"):
    data = current_dataset()
    request = CompareRequest(before=before, after=after, split=split, format=data.format, root=data.root,
                             split_seed=data.seed, options=data.parsed_options())
    versions = (weights_mtime(before), weights_mtime(after))
    index = dataset_index(data)
    result = comparison(request, versions, index)
if result is None:
    st.stop()
compared = result.comparison
names = compared.class_names
colours = [class_colour_hex(i) for i in range(1, len(names))]

st.markdown("#### Per class")
defects = compared.per_class[compared.per_class["class"] != names[0]]
bars = go.Figure([
    go.Bar(x=defects["class"], y=defects["iou_before"], name="before (plain)", marker={"color": colours}),
    go.Bar(x=defects["class"], y=defects["iou_after"], name="after (hatched)",
           marker={"color": colours, "pattern": {"shape": "/"}}),
])
bars.update_layout(barmode="group", title=f"IoU per defect class on {split} (%)", yaxis_title="IoU")
st.plotly_chart(bars, width="stretch")
m1, m2, m3 = st.columns(3)
before_miou, after_miou = compared.metrics_before.defect_miou, compared.metrics_after.defect_miou
m1.metric("Defect mIoU before", f"{before_miou or 0:.1f}")
m2.metric("Defect mIoU after", f"{after_miou or 0:.1f}", f"{(after_miou or 0) - (before_miou or 0):+.1f}")
m3.metric("Images", len(compared.per_image))

st.markdown("#### Per image (worst change first; click a row)")
only = st.selectbox("Images with", ["any class"] + names[1:], key="compare_class")
with error_box("Showing the image"):
    shown = result.images_with(None if only == "any class" else only)
    # A keyed table keeps its selected row number when its rows change, where the number
    # names another image or none: each table (models, split, class filter) has its own key.
    table_key = hashlib.sha1(repr((request, versions, only)).encode()).hexdigest()[:12]
    # IoU with one decimal, as everywhere else (the CSV download keeps full precision)
    iou_columns = {name: st.column_config.NumberColumn(name, format="%.1f")
                   for name in shown.columns if name.startswith("defect_miou") or name == "change"}
    selection = st.dataframe(shown, hide_index=True, on_select="rerun", selection_mode="single-row",
                             key=f"compare_table_{table_key}", column_config=iou_columns)
    rows = [r for r in selection.selection.rows if r < len(shown)]
    if shown.empty:
        st.info(f"No {split} image has {only}; choose another class.")
    else:
        chosen = int(shown.iloc[rows[0] if rows else 0]["index"])
        image = compared.images[chosen]
        truth, was, now = compared.truth[chosen], compared.before[chosen], compared.after[chosen]
        overlay = st.selectbox("Gained and lost pixels of", [ALL_CLASSES] + names[1:], key="compare_overlay")
        class_legend(names)
        panels = [("ground truth", overlay_mask(image, truth)), ("before", overlay_mask(image, was)),
                  ("after", overlay_mask(image, now)),
                  (f"gained (green) / lost (red): {overlay}",
                   diff_overlay(image, truth, was, now, None if overlay == ALL_CLASSES else names.index(overlay)))]
        figure = make_subplots(rows=1, cols=4, subplot_titles=[t for t, _ in panels], shared_xaxes=True,
                               shared_yaxes=True)
        for col, (_title, picture) in enumerate(panels, start=1):
            figure.add_trace(px.imshow(picture).data[0], row=1, col=col)
        figure.update_yaxes(autorange="reversed", matches="y")
        figure.update_xaxes(matches="x")
        figure.update_layout(title=f"Image {chosen}: zoom one panel, the others follow", height=360,
                             margin={"l": 10, "r": 10, "t": 60, "b": 10})
        st.plotly_chart(figure, width="stretch")
        st.caption(f"Pixels of image {chosen} the after model gets right and the before model got wrong "
                   "(gained) or the other way round (lost); per class, a pixel counts when the two models "
                   "disagree on whether it belongs to that class.")
        st.dataframe(result.pixel_changes(chosen), hide_index=True)

st.markdown("#### Cost")
cost = None
int8_params: dict = {}
int8_done: tuple[JobRecord, Int8CostResult] | None = None
int8_job: JobRecord | None = None
with error_box("Reading the INT8 step"):
    int8_request = Int8CostRequest.for_comparison(request)
    int8_params = int8_request.to_json()
    int8_done = measured_int8(int8_request, versions)
    asked = st.session_state.get("compare_int8_job")
    if int8_done is None and asked and asked["params"] == int8_params and asked["versions"] == versions:
        int8_job = api.get_job(asked["job"])
with error_box("Measuring cost"):
    measured_cost = costs(before, after, versions)
    if measured_cost is not None:
        cost = compare_costs(*measured_cost, int8=int8_done[1].to_json() if int8_done else None)
if cost is not None:
    st.table(cost.table)
    caption = ("Batch 1 on the CPU, one thread; latency is the median of 10 timed runs with the 10th to 90th "
               "percentile in brackets, both models timed in turns. Change = after / before - 1; speed-up = "
               "before's median / after's.")
    if int8_done:
        int8_ran, measured = int8_done
        caption += (f" fp32 and INT8 ONNX Runtime rows: the INT8 step (job {int8_ran.id}) exported both models, "
                    f"quantised them (calibrated on {measured.calibration_images} seeded training images) and "
                    f"timed all four files in turns ({measured.runs} runs each); defect mIoU of each file scored "
                    f"with ONNX Runtime on the {measured.split} split.")
    st.caption(caption)
    for note in cost.notes:
        st.warning(note)
with error_box("Measuring INT8"):
    if int8_job is not None:
        follow_job(int8_job, "Reading the INT8 step", draw_int8)
    if int8_done is None and (int8_job is None or int8_job.state in (FAILED, STOPPED)) and st.button(
            "Measure INT8 (ONNX Runtime)", key="compare_int8",
            help="exports both models to ONNX, quantises them to INT8 (calibrated on seeded training images of "
                 "the chosen dataset), times the fp32 and INT8 files in turns and scores them on this split, in "
                 "the background; their rows join the table above when it is done"):
        int8_job = api.submit("int8-cost", int8_params)
        api.ensure_worker()
        st.session_state["compare_int8_job"] = {"params": int8_params, "versions": versions, "job": int8_job.id}
        st.rerun()  # the step's bar, then its rows, in the button's place

st.markdown("#### Downloads")
d1, d2, d3, d4 = st.columns(4)
with error_box("Exporting ONNX"):
    precision = d2.radio("ONNX to export", ["fp32", "INT8"], horizontal=True, key="compare_onnx_precision",
                         help="INT8: static quantisation with ONNX Runtime (QDQ, per-channel weights), "
                              "calibrated on seeded training images of the chosen dataset")
    int8 = precision == "INT8"
    # exported by the worker (checked against PyTorch), like every other job; no profile: the
    # cost table above already has it. INT8 calibrates on the chosen dataset.
    dataset = {"format": request.format, "root": request.root, "split_seed": request.split_seed,
               "option": dict(request.options)} if int8 else {}
    wanted = ExportRequest(checkpoint=after, no_profile=True, int8=int8, **dataset)
    exported_for = (repr(wanted), versions[1])  # the ONNX offered is always the chosen after model's
    export = st.session_state.get("compare_onnx")
    if export and export["model"] != exported_for:
        export = None
    ready = None if export else exported_onnx(wanted, versions[1])
    job = api.get_job(export["job"]) if export else None
    if ready is not None:
        with d2:
            onnx_download(ready, int8)
    else:
        if job is not None:
            with d2:
                follow_job(job, "Reading the export job", draw_export)
        if (job is None or job.state in (FAILED, STOPPED)) and d2.button(
                "Export INT8 ONNX" if int8 else "Export ONNX", key="compare_export",
                help="exports the after model in the background; the download button takes this one's "
                     "place when the file is ready"):
            job = api.submit("export", wanted)
            api.ensure_worker()
            st.session_state["compare_onnx"] = {"model": exported_for, "job": job.id}
            st.rerun()  # the export's bar, then its download, in the button's place

with error_box("Preparing downloads"):
    d1.download_button("Pruned checkpoint (zip)", functools.partial(checkpoint_zip, after),
                       file_name="checkpoint.zip", mime="application/zip", key="dl_ckpt")
    d3.download_button("Report (JSON)", json.dumps(result.report(cost.models if cost else None), indent=2, default=str),
                       file_name="report.json", key="dl_json")
    d4.download_button("Per-image table (CSV)", compared.per_image.to_csv(index=False), file_name="per_image.csv",
                       key="dl_csv")

# The other split, predicted after everything above while the user looks at this one: switching
# to it then draws at once.
with error_box("Preparing the other split"):
    for other in ("val", "test"):
        if other != split:
            comparison(replace(request, split=other), versions, index, foreground=False)
