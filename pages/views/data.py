"""Data: choose a dataset, look at samples with their masks, see per-class statistics."""

from __future__ import annotations

import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from core.config import confine_to_data_roots, data_roots, workspace_dir
from core.data.base import DatasetIndex
from core.data.registry import format_names, is_synthetic
from core.data.stats import class_statistics, defect_sizes
from core.data.upload import extract_dataset_zip
from core.services.train import describe_training_defaults
from core.visual import class_colour_hex, overlay_mask
from ui.state import DatasetChoice, current_dataset, dataset_index, error_box, require_dataset, set_dataset
from ui.widgets import class_legend, image_grid, load_style

load_style()
st.title("Data")
st.caption("Pick a defect dataset: a built-in synthetic surface, or a real one in its published layout.")

SYNTHETIC = [f for f in format_names() if is_synthetic(f)]
REAL = [f for f in format_names() if not is_synthetic(f)]
chosen = current_dataset()

SOURCES = ["Built-in synthetic", "Real dataset on disk", "Upload a zip"]
source = st.radio("Source", SOURCES, horizontal=True, key="data_source",
                  index=0 if is_synthetic(chosen.format) else 1)
if source == "Built-in synthetic":
    family = st.selectbox("Surface family", SYNTHETIC, key="data_family",
                          index=SYNTHETIC.index(chosen.format) if chosen.format in SYNTHETIC else 0)
    if family != chosen.format:
        # Switching family only changes the choice once the new index loaded cleanly.
        with error_box(f"Loading {family}"):
            dataset_index(DatasetChoice(format=family, seed=chosen.seed))
            set_dataset(DatasetChoice(format=family, seed=chosen.seed))
            st.rerun()  # the sidebar shows the new choice too
elif source == "Upload a zip":
    with st.form("upload_dataset"):
        upload = st.file_uploader("A zip holding images/ and masks/ with matching file names (at most 200 MB)",
                                  type="zip", key="data_upload")
        upload_options = st.text_input("Class map (JSON, optional)", key="data_upload_options",
                                       help='e.g. {"class_names": ["background", "scratch"]}')
        unpack = st.form_submit_button("Unpack and load")
    if unpack and upload is None:
        # A press while the browser is still sending the file reaches us without it.
        st.warning("No zip has arrived yet: choose one, wait until its size shows, then press the button again.")
    elif unpack:
        with error_box("Loading the upload"):
            folder = extract_dataset_zip(upload, workspace_dir() / "datasets" / "uploads", upload.name)
            choice = DatasetChoice(format="folder", root=str(folder), seed=chosen.seed, options=upload_options)
            dataset_index(choice)
            set_dataset(choice)
            st.rerun()
else:
    roots = ", ".join(f"`{r}`" for r in data_roots())
    with st.form("real_dataset"):
        fmt = st.selectbox("Format", REAL, key="data_format", index=REAL.index(chosen.format) if chosen.format in REAL else 0)
        path = st.text_input("Dataset folder", value=chosen.root or "", key="data_path",
                             help=f"Inside one of the data roots: {roots} (set DEFECTPRUNE_DATA_ROOTS).")
        options = st.text_input("Format options (JSON, optional)", value=chosen.options, key="data_options",
                                help='mvtec: {"category": "bottle"}; folder: {"class_names": ["background", '
                                     '"scratch"], "colours": [[0, 0, 0], [255, 0, 0]]}')
        submitted = st.form_submit_button("Load dataset")
    st.caption(f"Data roots: {roots}")
    if submitted:
        with error_box("Loading the dataset"):
            root = str(confine_to_data_roots(path))
            choice = DatasetChoice(format=fmt, root=root, seed=chosen.seed, options=options)
            dataset_index(choice)
            set_dataset(choice)
            st.rerun()

index = require_dataset(chosen, "Choose another dataset above; the last one could not be read.")

st.subheader(chosen.label)
splits = index.split_counts()
cols = st.columns(4)
cols[0].metric("Images", len(index.samples))
for col, (name, count) in zip(cols[1:], splits.items()):
    col.metric(name, count)
class_legend(index.classes)
st.info(describe_training_defaults(index.format, index.default_size))
for item in index.skipped[:20]:
    st.warning(f"Skipped {item['file']}: {item['reason']}")

st.markdown("#### Samples")
c1, c2, c3 = st.columns(3)
split = c1.selectbox("Split", key="data_split", options=[s for s, n in splits.items() if n] or ["train"])
class_filter = c2.selectbox("Showing images with", key="data_class_filter", options=["any class"] + index.classes[1:] + ["no defect"])
count = c3.slider("Images", key="data_count", min_value=4, max_value=24, value=12, step=4)
rows = index.split(split)
if class_filter == "no defect":
    rows = rows[rows["classes"].map(lambda cs: all(c == 0 for c in cs))]
elif class_filter != "any class":
    wanted = index.classes.index(class_filter)
    rows = rows[rows["classes"].map(lambda cs: wanted in cs)]
rows = rows.head(count)
if rows.empty:
    st.info("No image in this split matches the filter.")
else:
    with error_box("Drawing samples"):
        pictures, captions = [], []
        for _, row in rows.iterrows():
            pictures.append(overlay_mask(index.image_of(row), index.mask_of(row)))
            names = [index.classes[c] for c in row["classes"] if c] or ["no defect"]
            captions.append(f"{row['image'].rsplit('/', 1)[-1]}: {', '.join(names)}")
        image_grid(pictures, captions)

st.markdown("#### Per-class statistics")


@st.cache_resource(show_spinner=False, max_entries=8)
def statistics_figures(format_name: str, root: str | None, seed: int, options: str,
                       _index: DatasetIndex) -> tuple[go.Figure, go.Figure, go.Figure | None]:
    """The per-class charts of a dataset, keyed as its cached index is (`ui.state.cached_index`):
    built once (plotly express takes a quarter of a second for these), not on every page run."""
    stats = class_statistics(_index)
    defects = stats[stats["class_id"] > 0]
    colour_map = {name: class_colour_hex(int(i)) for name, i in zip(defects["class"], defects["class_id"])}
    images = px.bar(defects, x="class", y="images", color="class", color_discrete_map=colour_map,
                    title="Images per defect class")
    share = px.bar(defects, x="class", y="pixel_share_percent", color="class", color_discrete_map=colour_map,
                   title="Defect pixel share (% of all pixels)", labels={"pixel_share_percent": "% of pixels"})
    sizes = defect_sizes(_index)
    box = None if sizes.empty else px.box(
        sizes, x="class", y="area_px", color="class", color_discrete_map=colour_map, log_y=True, points=False,
        title="Defect size distribution (connected regions, px)")
    return images, share, box


with error_box("Drawing the per-class statistics"):
    images_chart, share_chart, sizes_chart = statistics_figures(chosen.format, chosen.root, chosen.seed,
                                                                chosen.options, index)
    c1, c2 = st.columns(2)
    c1.plotly_chart(images_chart, width="stretch")
    c2.plotly_chart(share_chart, width="stretch")
    if sizes_chart is None:
        st.info("No defect regions in this dataset.")
    else:
        st.plotly_chart(sizes_chart, width="stretch")
st.success("Next: the Model page trains a baseline on this dataset.")
