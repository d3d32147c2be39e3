"""Model: train a baseline in the background or load a checkpoint; its per-class metrics and
a few predictions beside the ground truth."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots
import torch

from core.config import confine_to_data_roots, data_roots, workspace_dir
from core.data.dataset import SegmentationDataset
from core.metrics import SegmentationMetrics, batch_confusion
from core.models.zoo import ARCHITECTURES, DEFAULT_ARCH, DEFAULT_ENCODER, ENCODERS
from core.precision import PRECISIONS
from core.predictions import predict_split
from core.runs import api
from core.runs.jobs import TrainingProgress
from core.runs.store import JobRecord
from core.services.request import default_of
from core.services.train import TrainRequest
from core.visual import class_colour_hex, overlay_mask
from ui.jobs import follow_job, job_bar, stop_button
from ui.state import (
    JobIdError, choose_model, current_checkpoint, current_dataset, error_box, query_job_id, require_dataset,
)
from ui.widgets import class_legend, image_grid, load_style

load_style()
st.title("Model")
st.caption("Train a baseline on the current dataset (it runs in the background and survives a page "
           "refresh), or load a checkpoint.")

choice = current_dataset()
index = require_dataset(choice, "Choose a readable dataset on the Data page first.")
# the training form's defaults are the request's (one place: core/services/train.py)
TRAIN_DEFAULTS = {field.name: default_of(field) for field in dataclasses.fields(TrainRequest)}
# training job id -> the workspace's model when this session started it (None: none yet)
TRAINING_FOR = "training_for"
# training jobs whose model this session took as the workspace's model by itself (once each)
ADOPTED = "adopted_training"


def adopt_trained_model(job: JobRecord, checkpoint: str) -> None:
    """A finished training job's model becomes the workspace's model by itself, once, when the
    workspace has none or still has the one it had when this session started that training (a
    model picked since then stays); otherwise "Use this model" offers it."""
    adopted = st.session_state.setdefault(ADOPTED, {})
    if job.id in adopted:
        return
    training_for = st.session_state.get(TRAINING_FOR, {})
    current = st.session_state.get("model")
    if current is None or (job.id in training_for and training_for[job.id] == current):
        adopted[job.id] = checkpoint  # once, even when it fails to load (the error box says so)
        with error_box("Taking the trained model"):
            choose_model(checkpoint)
            st.rerun()  # the sidebar and the page below show it


def training_curves(curve: pd.DataFrame) -> go.Figure:
    """Loss and validation defect mIoU per epoch, side by side, each with its own y axis and
    numbers on it; whole epochs on x."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=["Training loss", "Validation defect mIoU (%)"])
    for col, (series, colour) in enumerate((("loss", "#457b9d"), ("val_defect_miou", "#2a9d8f")), start=1):
        figure.add_trace(go.Scatter(x=curve["epoch"], y=curve[series], mode="lines+markers", name=series,
                                    line={"color": colour}, showlegend=False), row=1, col=col)
        figure.update_xaxes(title_text="epoch", tickmode="linear", tick0=1, dtick=max(1, len(curve) // 10),
                            row=1, col=col)
    figure.update_yaxes(title_text="loss", row=1, col=1)
    figure.update_yaxes(title_text="defect mIoU (%)", row=1, col=2)
    figure.update_layout(title="Training loss and validation defect mIoU per epoch", height=360)
    return figure


def draw_training(job: JobRecord) -> None:
    """What the worker reported of a training job (it runs there, not in this page)."""
    job_bar(job, "Training")
    progress = TrainingProgress.of(job)
    if progress.reported:
        c1, c2, c3 = st.columns(3)
        c1.metric("Epoch", "-" if progress.epoch is None else int(progress.epoch))
        c2.metric("Loss", "-" if progress.loss is None else f"{progress.loss:.4f}")
        c3.metric("Val defect mIoU", "-" if progress.val_defect_miou is None else f"{progress.val_defect_miou:.1f}")
    curve = pd.DataFrame(progress.curve)
    if len(curve):
        st.plotly_chart(training_curves(curve), width="stretch", key=f"curve_{job.id}")
    stop_button(job, "Stop training",
                requested="Stop requested: training stops within seconds and keeps its best checkpoint.")
    if job.state == "failed":
        st.error(f"Training failed: {job.error}")
    elif job.state in ("succeeded", "stopped") and progress.checkpoint:
        checkpoint = progress.checkpoint
        adopt_trained_model(job, checkpoint)
        if st.session_state.get("model") == checkpoint:
            if st.session_state.get(ADOPTED, {}).get(job.id) == checkpoint:
                st.success(f"Training {'finished' if job.state == 'succeeded' else 'stopped'}: its model "
                           f"({'/'.join(Path(checkpoint).parts[-2:])}) is now the workspace's model.")
        elif st.button("Use this model", key=f"use_{job.id}"):
            with error_box("Loading the trained model"):
                choose_model(checkpoint)
                st.rerun()


train_tab, load_tab = st.tabs(["Train a baseline", "Load a checkpoint"])
with train_tab:
    with st.form("train_form"):
        c1, c2, c3 = st.columns(3)
        arch = c1.selectbox("Architecture", list(ARCHITECTURES), index=list(ARCHITECTURES).index(DEFAULT_ARCH),
                            key="model_arch")
        encoder = c2.selectbox("Encoder", ENCODERS, index=ENCODERS.index(DEFAULT_ENCODER), key="model_encoder")
        size = c3.text_input("Input size (N or HxW)", value="x".join(map(str, index.default_size)),
                             key="model_size")
        c4, c5, c6 = st.columns(3)
        epochs = c4.number_input("Epochs (early stopping on val defect mIoU)", 1, 500, TRAIN_DEFAULTS["epochs"],
                                 key="model_epochs")
        batch = c5.number_input("Batch size", 1, 256, TRAIN_DEFAULTS["batch_size"], key="model_batch")
        seed = c6.number_input("Seed", 0, 10_000, TRAIN_DEFAULTS["seed"], key="model_seed")
        precision = st.selectbox("Precision", PRECISIONS, key="model_precision",
                                 help="Of the training forward passes: auto picks bf16 where the device runs it "
                                      "fast, else fp32. Evaluation and the saved weights are always fp32.")
        start = st.form_submit_button("Train in the background")
    if start:
        with error_box("Starting the training"):
            request = TrainRequest(format=choice.format, root=choice.root or None, size=size, arch=arch,
                                   encoder=encoder, epochs=int(epochs), batch_size=int(batch), seed=int(seed),
                                   split_seed=choice.seed, option=choice.parsed_options(), precision=precision)
            job = api.submit("train", request)
            api.ensure_worker()
            st.session_state["train_job"] = job.id
            st.session_state.setdefault(TRAINING_FOR, {})[job.id] = st.session_state.get("model")
            st.query_params["job"] = str(job.id)
    with error_box("Reading the training job"):
        job_id = st.session_state.get("train_job") or query_job_id("job")
        if job_id:
            job = api.get_job(int(job_id))
            if job.kind != "train":
                raise JobIdError(f"job {job.id} is a {job.kind} job, not a training job; train one above")
            follow_job(job, "Reading the training job", draw_training)

with load_tab:
    models = []
    with error_box("Listing models"):
        models = api.list_models()
    if models:
        labels = {m["path"]: f"#{m['id']} {m['arch']}-{m['encoder']}{' (pruned)' if m['pruned'] else ''}: "
                             f"{m['path']}" for m in models}
        picked = st.selectbox("Models in the workspace", list(labels), format_func=labels.get, key="model_pick")
        if st.button("Use this model", key="model_use_listed"):
            with error_box("Loading the checkpoint"):
                choose_model(picked)  # a checkpoint that fails to load leaves the working model in place
                st.rerun()
    path = st.text_input("Or a checkpoint folder (inside the workspace or a data root)", key="model_path")
    if st.button("Load checkpoint", key="model_load"):
        with error_box("Loading the checkpoint"):
            folder = str(confine_to_data_roots(path, roots=[workspace_dir(), *data_roots()])) if path else ""
            if folder:
                choose_model(folder)  # a checkpoint that fails to load leaves the working model in place
                st.rerun()

loaded = None
with error_box("Loading the model"):
    loaded = current_checkpoint()
if loaded is None:
    st.info("No model yet. Train a baseline above (a few minutes at 128 px on a CPU) or load a checkpoint; "
            "the Layer importance and Prune pages need one.")
    st.stop()

spec = loaded.spec
st.subheader(f"{spec.arch}-{spec.encoder}, {spec.input_size[0]}x{spec.input_size[1]}, "
             f"{'pruned' if loaded.history else 'unpruned'}")
if list(spec.classes) != list(index.classes):
    st.warning(f"This model predicts {', '.join(spec.classes)}, but the current dataset has "
               f"{', '.join(index.classes)}: choose its dataset on the Data page to see predictions.")
    st.stop()
class_legend(spec.classes)
metrics = spec.metrics or {}
training = metrics.get("training")  # recorded since training kept its precision; older checkpoints lack it
if isinstance(training, dict) and training.get("precision"):
    st.caption(f"Trained in {training['precision']} ({training.get('memory_format') or 'standard'} memory format), "
               f"{training.get('epochs_run', '?')} epoch(s), best epoch {training.get('best_epoch', '?')}.")
per_class = {name: value for name, value in (metrics.get("per_class_iou") or {}).items() if name != spec.classes[0]}
if per_class:
    cols = st.columns(3)
    cols[0].metric("Val defect mIoU", f"{metrics.get('defect_miou') or 0:.1f}")
    cols[1].metric("Background IoU", f"{metrics.get('background_iou') or 0:.1f}")
    cols[2].metric("Pixel accuracy", f"{metrics.get('pixel_accuracy') or 0:.1f}")
    frame = pd.DataFrame({"class": list(per_class), "IoU": [v if v is not None else 0.0 for v in per_class.values()]})
    colours = {name: class_colour_hex(spec.classes.index(name)) for name in per_class}
    st.plotly_chart(px.bar(frame, x="class", y="IoU", color="class", color_discrete_map=colours, range_y=[0, 100],
                           title="Validation IoU per defect class (%)"), width="stretch")

heading = st.empty()  # named after the split chosen below
c1, c2 = st.columns(2)
split = c1.selectbox("Split", [s for s, n in index.split_counts().items() if n and s != "train"] or ["train"],
                     key="model_preview_split")
heading.markdown(f"#### Predictions on {'validation' if split == 'val' else split} images")
count = c2.slider("Images", 2, 8, 4, step=2, key="model_preview_count")
with error_box("Predicting"):
    shown = SegmentationDataset(index, split, tuple(spec.input_size), spec.in_channels, limit=count,
                                normalisation=spec.normalisation)
    with torch.inference_mode():
        predictions = predict_split(loaded.model, shown)
    pictures, captions, truths = [], [], []
    for i, prediction in enumerate(predictions):
        image, truth = shown.raw(i)
        pictures += [overlay_mask(image, truth), overlay_mask(image, prediction)]
        captions += [f"ground truth {i + 1}", f"prediction {i + 1}"]
        truths.append(truth)
    image_grid(pictures, captions, columns=4)
    confusion = batch_confusion(predictions, np.stack(truths), len(spec.classes))
    shown_metrics = SegmentationMetrics.from_confusion(confusion.sum(axis=0), spec.classes)
    defects = list(spec.classes[1:])
    frame = pd.DataFrame({"class": defects, "IoU": [shown_metrics.per_class_iou[name] for name in defects],
                          "pixels in truth": confusion.sum(axis=(0, 2))[1:],
                          "pixels predicted": confusion.sum(axis=(0, 1))[1:]})
    st.plotly_chart(px.bar(frame, x="class", y="IoU", color="class", range_y=[0, 100],
                           color_discrete_map={name: class_colour_hex(i + 1) for i, name in enumerate(defects)},
                           hover_data=["pixels in truth", "pixels predicted"],
                           title=f"IoU per defect class on these {len(shown)} {split} images (%)"),
                    width="stretch")
    st.caption("A class in neither the truth nor the prediction of these images has no bar.")
st.success("Next: the Prune page starts prune-retrain rounds from this model.")
