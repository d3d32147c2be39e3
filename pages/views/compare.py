"""Compare: two models on the same images, class by class and image by image, with the cost
beside the accuracy; downloads of the pruned checkpoint, its ONNX export and a report."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from core.compare import ALL_CLASSES, check_comparable, compare_models, cost_row, pixel_changes
from core.data.dataset import SegmentationDataset
from core.profile import export_onnx
from core.runs import api
from core.visual import class_colour_hex, diff_overlay, overlay_mask
from ui.state import checkpoint_at, current_dataset, dataset_index, error_box, weights_mtime
from ui.widgets import class_legend, load_style

load_style()
st.title("Compare")
st.caption("Ground truth, before and after, for the same images; what changed per class and per image; "
           "and what each model costs.")

models = []
with error_box("Listing models"):
    models = api.list_models()
current = st.session_state.get("model")
paths = [m["path"] for m in models]
if current and current not in paths:
    paths.insert(0, current)
if len(paths) < 2:
    st.info("Comparing needs two models: train a baseline on the Model page and prune it on the Prune page.")
    st.stop()
labels = {m["path"]: f"#{m['id']} {m['arch']}-{m['encoder']}{' pruned' if m['pruned'] else ''} "
                     f"({Path(m['path']).parent.name}/{Path(m['path']).name})" for m in models}
c1, c2, c3 = st.columns([2, 2, 1])
before = c1.selectbox("Before", paths, index=0, format_func=lambda p: labels.get(p, p), key="compare_before")
after = c2.selectbox("After", paths, index=len(paths) - 1, format_func=lambda p: labels.get(p, p),
                     key="compare_after")
split = c3.selectbox("Split", ["val", "test"], key="compare_split")


@st.cache_resource(show_spinner="Predicting both models (cached on disk afterwards)...", max_entries=4)
def comparison(before: str, before_mtime: float, after: str, after_mtime: float, split: str, dataset_key: tuple):
    """Keyed by both checkpoints' versions: a model retrained or re-pruned at the same path is
    compared afresh, not shown from memory."""
    spec = checkpoint_at(before).spec
    index = dataset_index(current_dataset())
    dataset = SegmentationDataset(index, split, tuple(spec.input_size), spec.in_channels)
    return compare_models(before, after, dataset, list(spec.classes)), dataset


@st.cache_data(show_spinner="Measuring cost (latency: torch and ONNX Runtime, 1 thread)...")
def costs(path: str, mtime: float) -> dict:
    return cost_row(path, runs=10)


def zipped_checkpoint(folder: str) -> bytes:
    """The checkpoint folder as a zip, made when the download button is pressed."""
    with tempfile.TemporaryDirectory() as scratch:
        return Path(shutil.make_archive(str(Path(scratch) / "checkpoint"), "zip", folder)).read_bytes()


result = None
with error_box("Comparing"):
    check_comparable(checkpoint_at(before).spec, checkpoint_at(after).spec)
    choice = current_dataset()
    versions = (before, weights_mtime(before), after, weights_mtime(after), split,
                (choice.format, choice.root, choice.seed, choice.options))
    result, dataset = comparison(*versions)
if result is None:
    st.stop()
names = result.class_names
colours = [class_colour_hex(i) for i in range(1, len(names))]

st.markdown("#### Per class")
defects = result.per_class[result.per_class["class"] != names[0]]
bars = go.Figure([
    go.Bar(x=defects["class"], y=defects["iou_before"], name="before (plain)", marker={"color": colours}),
    go.Bar(x=defects["class"], y=defects["iou_after"], name="after (hatched)",
           marker={"color": colours, "pattern": {"shape": "/"}}),
])
bars.update_layout(barmode="group", title=f"IoU per defect class on {split} (%)", yaxis_title="IoU")
st.plotly_chart(bars, width="stretch")
m1, m2, m3 = st.columns(3)
before_miou, after_miou = result.metrics_before.defect_miou, result.metrics_after.defect_miou
m1.metric("Defect mIoU before", f"{before_miou or 0:.2f}")
m2.metric("Defect mIoU after", f"{after_miou or 0:.2f}", f"{(after_miou or 0) - (before_miou or 0):+.2f}")
m3.metric("Images", len(result.per_image))

st.markdown("#### Per image (worst change first; click a row)")
only = st.selectbox("Images with", ["any class"] + names[1:], key="compare_class")
with error_box("Showing the image"):
    table = result.per_image
    if only != "any class":
        table = table[table[f"present {only}"]]
    shown = table[["index", "image", "defect_miou before", "defect_miou after", "change"]].assign(
        image=lambda f: f["image"].map(lambda p: Path(p).name))
    # A keyed table keeps its selected row number when its rows change, where the number
    # names another image or none: each table (models, split, class filter) has its own key.
    table_key = hashlib.sha1(repr((versions, only)).encode()).hexdigest()[:12]
    selection = st.dataframe(shown, hide_index=True, on_select="rerun", selection_mode="single-row",
                             key=f"compare_table_{table_key}")
    rows = [r for r in selection.selection.rows if r < len(shown)]
    if shown.empty:
        st.info(f"No {split} image has {only}; choose another class.")
    else:
        chosen = int(shown.iloc[rows[0] if rows else 0]["index"])
        image, _mask = dataset.raw(chosen)
        truth, was, now = result.truth[chosen], result.before[chosen], result.after[chosen]
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
        st.dataframe(pixel_changes(truth, was, now, names), hide_index=True)

st.markdown("#### Cost")
cost = None
with error_box("Measuring cost"):
    rows_cost = [{"model": "before", **costs(before, weights_mtime(before))},
                 {"model": "after", **costs(after, weights_mtime(after))}]
    cost = pd.DataFrame(rows_cost)
    cost["MACs (M)"] = cost["macs"] / 1e6
    cost["params (M)"] = cost["params"] / 1e6
    cost["size (MiB)"] = cost["size_bytes"] / 2**20
    cost = cost.rename(columns={"latency_torch_ms": "torch ms", "latency_ort_ms": "ONNX Runtime ms"})
    st.table(cost[["model", "MACs (M)", "params (M)", "size (MiB)", "torch ms", "ONNX Runtime ms"]]
             .set_index("model").round(2))

st.markdown("#### Downloads")
d1, d2, d3, d4 = st.columns(4)
with error_box("Exporting ONNX"):
    exported_for = (after, weights_mtime(after))  # the ONNX offered is always the chosen after model's
    if d2.button("Export ONNX", key="compare_export"):
        with tempfile.TemporaryDirectory() as folder:
            loaded = checkpoint_at(after)
            onnx = export_onnx(loaded.model, Path(folder) / "model.onnx", loaded.spec.input_size,
                               loaded.spec.in_channels)
            st.session_state["compare_onnx"] = {"model": exported_for, "bytes": onnx.read_bytes()}
    exported = st.session_state.get("compare_onnx")
    if exported and exported["model"] == exported_for:
        d2.download_button("model.onnx", exported["bytes"], file_name="model.onnx", key="dl_onnx")
with error_box("Preparing downloads"):
    d1.download_button("Pruned checkpoint (zip)", functools.partial(zipped_checkpoint, after),
                       file_name="checkpoint.zip", mime="application/zip", key="dl_ckpt")
    report = {"before": before, "after": after, "split": split, "per_class": result.per_class.to_dict("records"),
              "cost": cost.to_dict("records") if cost is not None else None,
              "defect_miou": {"before": before_miou, "after": after_miou}}
    d3.download_button("Report (JSON)", json.dumps(report, indent=2, default=str), file_name="report.json",
                       key="dl_json")
    d4.download_button("Per-image table (CSV)", result.per_image.to_csv(index=False), file_name="per_image.csv",
                       key="dl_csv")
