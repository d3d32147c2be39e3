"""Model: train a baseline in the background, load a checkpoint or import a model trained
elsewhere; its per-class metrics and a few predictions beside the ground truth."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from core.config import confine_to_data_roots, data_roots, workspace_dir
from core.models.importer import STATE_SUFFIXES, is_smp_folder
from core.models.upload import ModelUploadError, save_model_upload
from core.models.zoo import ARCHITECTURES, DEFAULT_ARCH, DEFAULT_ENCODER, ENCODERS
from core.runs import api
from core.runs.jobs import TrainingProgress
from core.runs.store import JobRecord
from core.services.evaluate import PredictionPreview, preview_predictions
from core.services.import_model import ImportRequest
from core.services.request import FINITE_FLOAT, POSITIVE_FLOAT, ParameterError, default_of
from core.services.train import TrainRequest, recommended_training
from core.visual import class_colour_hex, overlay_mask
from ui.jobs import follow_job, job_bar, stop_button
from ui.state import (
    DatasetChoice, JobIdError, choose_model, current_checkpoint, current_dataset, error_box, query_job_id,
    require_dataset, weights_mtime,
)
from ui.widgets import class_legend, image_grid, load_style, precision_select

load_style()
st.title("Model")
st.caption("Train a baseline on the current dataset (it runs in the background and survives a page "
           "refresh), load a checkpoint, or import a model trained elsewhere.")

choice = current_dataset()
index = require_dataset(choice, "Choose a readable dataset on the Data page first.")
# the training form's defaults are the request's (one place: core/services/train.py)
TRAIN_DEFAULTS = {field.name: default_of(field) for field in dataclasses.fields(TrainRequest)}
# training job id -> the workspace's model when this session started it (None: none yet)
TRAINING_FOR = "training_for"
# import job id -> the workspace's model when this session submitted it (None: none yet)
IMPORTING_FOR = "importing_for"
# training (and import) jobs whose model this session took as the workspace's model by itself (once each)
ADOPTED = "adopted_training"
# where uploaded models are kept: inside the workspace, where the import job may read them
IMPORTS_DIR = "imports"


def adopt_trained_model(job: JobRecord, checkpoint: str, started_for: str = TRAINING_FOR,
                        action: str = "Taking the trained model") -> None:
    """A finished training (or import) job's model becomes the workspace's model by itself,
    once, when the workspace has none or still has the one it had when this session started
    that job (a model picked since then stays); otherwise "Use this model" offers it."""
    adopted = st.session_state.setdefault(ADOPTED, {})
    if job.id in adopted:
        return
    training_for = st.session_state.get(started_for, {})
    current = st.session_state.get("model")
    if current is None or (job.id in training_for and training_for[job.id] == current):
        adopted[job.id] = checkpoint  # once, even when it fails to load (the error box says so)
        with error_box(action):
            choose_model(checkpoint)
            st.rerun()  # the sidebar and the page below show it


def start_job(kind: str, request, session_key: str, started_for: str, address_key: str) -> None:
    """Submit this tab's job, follow it in this session and the address, and remember the
    workspace model it was started for (what `adopt_trained_model` may replace)."""
    job = api.submit(kind, request)
    api.ensure_worker()
    st.session_state[session_key] = job.id
    st.session_state.setdefault(started_for, {})[job.id] = st.session_state.get("model")
    st.query_params[address_key] = str(job.id)


def follow_page_job(kind: str, session_key: str, address_key: str, wanted: str, action: str,
                    draw: Callable[[JobRecord], None]) -> None:
    """Follow this tab's job (this session's, or the one the address names), refusing a job
    of another kind by name."""
    with error_box(action):
        job_id = st.session_state.get(session_key) or query_job_id(address_key)
        if job_id:
            job = api.get_job(int(job_id))
            if job.kind != kind:
                raise JobIdError(f"job {job.id} is a {job.kind} job, not {wanted}")
            follow_job(job, action, draw)


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


def upload_cap_bytes() -> int:
    """The largest upload the server takes (``server.maxUploadSize``, MB), also the largest model file."""
    return int(st.get_option("server.maxUploadSize")) * 2**20


def parse_numbers(text: str, label: str, check) -> tuple[float, ...]:
    """``0.485, 0.456, 0.406`` -> numbers, each checked (a ParameterError naming ``label``)."""
    items = [item.strip() for item in re.split(r"[,\s]+", text.strip())] if text.strip() else []
    try:
        return tuple(check.parse(item) for item in items)
    except ParameterError as exc:
        raise ParameterError(f"{label}: {exc}; write numbers separated by commas, e.g. 0.485, 0.456, 0.406") from None


def parse_classes(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",")) if text.strip() else ()
    if any(not name for name in names):
        raise ParameterError(f"class names {text!r}: an empty name; write names separated by commas, background first")
    return names


def draw_import(job: JobRecord) -> None:
    """An import job as the worker reported it; once it succeeded, its evaluation and its
    model as the workspace's (once)."""
    job_bar(job, "Import")
    stop_button(job, "Stop the import")
    if job.state == "failed":
        st.error(f"Import failed: {job.error}")
        return
    if job.state == "stopped":
        st.info("The import was stopped before it finished; nothing was imported.")
        return
    result = job.result or {}
    checkpoint = result.get("checkpoint")
    if job.state != "succeeded" or not checkpoint:
        return
    adopt_trained_model(job, checkpoint, IMPORTING_FOR, "Taking the imported model")
    size = "x".join(map(str, result.get("input_size") or []))
    normalisation = result.get("normalisation") or {}
    st.markdown(f"**Imported {result.get('arch')}-{result.get('encoder')}** ({result.get('in_channels')} channel(s), "
                f"{size}, {result.get('tensors')} tensors loaded; mean {normalisation.get('mean')}, std "
                f"{normalisation.get('std')})")
    for note in result.get("notes") or []:
        st.caption(note)
    evaluation = result.get("evaluation") or {}
    if evaluation:
        split = evaluation.get("split", "val")
        cols = st.columns(3)
        cols[0].metric(f"{split} defect mIoU", f"{evaluation.get('defect_miou') or 0:.1f}")
        cols[1].metric("Background IoU", f"{evaluation.get('background_iou') or 0:.1f}")
        cols[2].metric("Pixel accuracy", f"{evaluation.get('pixel_accuracy') or 0:.1f}")
        classes = result.get("classes") or []
        iou = evaluation.get("per_class_iou") or {}
        defects = [name for name in classes[1:] if name in iou]
        st.dataframe(pd.DataFrame({"class": defects, "IoU (%)": [iou[name] for name in defects]}),
                     hide_index=True, key=f"import_iou_{job.id}")
        st.caption(f"On {evaluation.get('images')} {split} images of the current dataset; a class in neither the "
                   "truth nor the prediction has no IoU.")
    if st.session_state.get("model") == checkpoint:
        if st.session_state.get(ADOPTED, {}).get(job.id) == checkpoint:
            st.success(f"Imported: its model ({'/'.join(Path(checkpoint).parts[-2:])}) is now the workspace's model.")
    elif st.button("Use this model", key=f"use_{job.id}"):
        with error_box("Loading the imported model"):
            choose_model(checkpoint)
            st.rerun()


@st.cache_data(show_spinner="Predicting the preview images...", max_entries=8)
def cached_preview(checkpoint: str, mtime: float, dataset: DatasetChoice, split: str, count: int, *,
                   _model, _spec, _index) -> PredictionPreview:
    """Keyed by the checkpoint and its weights' version, the dataset, the split and the number
    of images: a rerun (any widget) draws the same preview without predicting again, and a
    model retrained or re-pruned at the same path is predicted afresh."""
    return preview_predictions(_model, _spec, _index, split, count)


def import_source(upload, typed: str) -> Path:
    """The file or folder to import: an upload kept in the workspace, or a typed path inside
    the workspace or a data root (where the import job reads)."""
    if upload is not None:
        return save_model_upload(upload.name, upload.getvalue(), workspace_dir() / IMPORTS_DIR, upload_cap_bytes())
    if not typed.strip():
        raise ModelUploadError("no model yet: upload a file or type the path of one")
    source = confine_to_data_roots(typed.strip(), roots=[workspace_dir(), *data_roots()])
    if not source.exists():
        raise ModelUploadError(f"{source} does not exist; type the path of a state-dict file or an smp "
                               "save_pretrained folder")
    return source


train_tab, load_tab, import_tab = st.tabs(["Train a baseline", "Load a checkpoint", "Import a model"])
with train_tab:
    with st.form("train_form"):
        c1, c2, c3 = st.columns(3)
        arch = c1.selectbox("Architecture", list(ARCHITECTURES), index=list(ARCHITECTURES).index(DEFAULT_ARCH),
                            key="model_arch")
        encoder = c2.selectbox("Encoder", ENCODERS, index=ENCODERS.index(DEFAULT_ENCODER), key="model_encoder")
        size = c3.text_input("Input size (N or HxW)", value="x".join(map(str, index.default_size)),
                             key="model_size")
        c4, c5, c6 = st.columns(3)
        # the dataset's format decides the default epochs (and the rate and schedule the request fills in)
        epochs = c4.number_input("Epochs (early stopping on val defect mIoU)", 1, 500,
                                 recommended_training(choice.format)["epochs"], key="model_epochs")
        batch = c5.number_input("Batch size", 1, 256, TRAIN_DEFAULTS["batch_size"], key="model_batch")
        seed = c6.number_input("Seed", 0, 10_000, TRAIN_DEFAULTS["seed"], key="model_seed")
        precision = precision_select(st, TrainRequest, key="model_precision")
        start = st.form_submit_button("Train in the background")
    if start:
        with error_box("Starting the training"):
            request = TrainRequest(format=choice.format, root=choice.root or None, size=size, arch=arch,
                                   encoder=encoder, epochs=int(epochs), batch_size=int(batch), seed=int(seed),
                                   split_seed=choice.seed, option=choice.parsed_options(), precision=precision)
            start_job("train", request, "train_job", TRAINING_FOR, "job")
    follow_page_job("train", "train_job", "job", "a training job; train one above", "Reading the training job",
                    draw_training)

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

with import_tab:
    st.caption("A model trained elsewhere, evaluated at once on the current dataset's val split: a state dict "
               "(.safetensors, or .pt/.pth saved with torch.save(model.state_dict(), ...)) or an smp "
               "model.save_pretrained(folder) folder (zipped to upload). A pickled whole model is refused.")
    UPLOAD, TYPED = "Upload", "A path inside the data roots"
    where = st.radio("Source", [UPLOAD, TYPED], horizontal=True, key="import_from")
    with st.form("import_form"):
        upload, typed = None, ""
        if where == UPLOAD:
            upload = st.file_uploader(f"A state dict ({', '.join(STATE_SUFFIXES)}) or a .zip of an smp "
                                      f"save_pretrained folder (at most {upload_cap_bytes() // 2**20} MB)",
                                      type=[s.lstrip(".") for s in (*STATE_SUFFIXES, ".zip")], key="import_upload")
        else:
            typed = st.text_input("A state-dict file or an smp save_pretrained folder", key="import_path",
                                  help="Inside the workspace or a data root: "
                                       + ", ".join(str(r) for r in [workspace_dir(), *data_roots()]))
        st.markdown("For a state dict (an smp folder names its own architecture and encoder):")
        c1, c2, c3 = st.columns(3)
        import_arch = c1.selectbox("Architecture", list(ARCHITECTURES),
                                   index=list(ARCHITECTURES).index(DEFAULT_ARCH), key="import_arch")
        import_encoder = c2.selectbox("Encoder", ENCODERS, index=ENCODERS.index(DEFAULT_ENCODER), key="import_encoder")
        import_size = c3.text_input("Input size (N or HxW)", value="x".join(map(str, index.default_size)),
                                    key="import_size")
        import_classes = st.text_input("Class names in logit order, background first", key="import_classes",
                                       value=", ".join(index.classes),
                                       help="The current dataset's by default; the model must predict them.")
        c4, c5 = st.columns(2)
        import_mean = c4.text_input("Mean per channel (optional, pixels scaled to 0..1)", key="import_mean",
                                    placeholder="ImageNet's for 3 channels, 0.5 for 1")
        import_std = c5.text_input("Std per channel (optional)", key="import_std",
                                   placeholder="ImageNet's for 3 channels, 0.25 for 1")
        start_import = st.form_submit_button("Import in the background")
    if start_import and where == UPLOAD and upload is None:
        # a press while the browser is still sending the file reaches us without it
        st.warning("No file has arrived yet: choose one, wait until its size shows, then press the button again.")
    elif start_import:
        with error_box("Starting the import"):
            mean = parse_numbers(import_mean, "mean", FINITE_FLOAT)
            std = parse_numbers(import_std, "std", POSITIVE_FLOAT)
            if bool(mean) != bool(std):
                raise ParameterError("give both the mean and the std the model was trained with, or neither")
            classes = parse_classes(import_classes)
            source = import_source(upload, typed)
            smp = is_smp_folder(source)
            request = ImportRequest(source=str(source), format=choice.format, root=choice.root or None,
                                    option=choice.parsed_options(), split_seed=choice.seed, size=import_size or None,
                                    classes=classes, arch=None if smp else import_arch,
                                    encoder=None if smp else import_encoder, mean=mean, std=std)
            start_job("import", request, "import_job", IMPORTING_FOR, "import")
    follow_page_job("import", "import_job", "import", "an import; import a model above", "Reading the import job",
                    draw_import)

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
    preview = cached_preview(str(loaded.path), weights_mtime(str(loaded.path)), choice, split, count, _model=loaded.model,
                             _spec=spec, _index=index)
    pictures, captions = [], []
    for i, (image, truth, prediction) in enumerate(zip(preview.images, preview.truths, preview.predictions)):
        pictures += [overlay_mask(image, truth), overlay_mask(image, prediction)]
        captions += [f"ground truth {i + 1}", f"prediction {i + 1}"]
    image_grid(pictures, captions, columns=4)
    defects = list(spec.classes[1:])
    st.plotly_chart(px.bar(preview.per_class(), x="class", y="IoU", color="class", range_y=[0, 100],
                           color_discrete_map={name: class_colour_hex(i + 1) for i, name in enumerate(defects)},
                           hover_data=["pixels in truth", "pixels predicted"],
                           title=f"IoU per defect class on these {len(preview)} {split} images (%)"),
                    width="stretch")
    st.caption("A class in neither the truth nor the prediction of these images has no bar.")
st.success("Next: the Prune page starts prune-retrain rounds from this model.")
