"""Small drawing helpers used by several pages (legend chips, image grids, per-layer bars, CSS)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from core.services.request import Request, choices_of, default_of
from core.visual import class_colour_hex

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def load_style() -> None:
    st.html(f"<style>{(ASSETS / 'style.css').read_text()}</style>")


def request_field(request_type: type[Request], name: str) -> dataclasses.Field:
    """A request's setting (its default, choices and help are what a form's widget shows)."""
    return next(f for f in dataclasses.fields(request_type) if f.name == name)


def precision_select(parent, request_type: type[Request], key: str) -> str:
    """The precision selectbox of a form whose request trains (train, prune): the choices,
    default and help of the request's ``precision`` setting (`precision_setting`)."""
    field = request_field(request_type, "precision")
    choices, text = choices_of(field), field.metadata["help"]
    return parent.selectbox("Precision", choices, index=choices.index(default_of(field)), key=key,
                            help=f"{text[0].upper()}{text[1:]}.")


def class_legend(classes: Sequence[str]) -> None:
    """Chips in each defect class's colour (background shown grey), the same on every page."""
    chips = ['<span class="dp-chip bg">0 background</span>']
    chips += [
        f'<span class="dp-chip" style="background:{class_colour_hex(i)}">{i} {name}</span>'
        for i, name in enumerate(classes) if i > 0
    ]
    st.html("<div>" + "".join(chips) + "</div>")


def image_grid(images: Sequence[np.ndarray], captions: Sequence[str], columns: int = 4) -> None:
    for start in range(0, len(images), columns):
        cols = st.columns(columns)
        for col, image, caption in zip(cols, images[start:start + columns], captions[start:start + columns]):
            col.image(image, caption=caption, width="stretch")


def layer_table(graph) -> pd.DataFrame:
    """One row per prunable layer (group) of a pruning graph, in network order: what
    `layer_bars` draws."""
    return pd.DataFrame([{"group": g.name, "index": g.index, "scale": f"stride {g.scale}", "role": g.role,
                          "channels": g.channels} for g in graph.groups])


def layer_bars(frame: pd.DataFrame, y: str, title: str, **kwargs) -> go.Figure:
    """One bar per layer (``frame["group"]``, in the frame's order: network order) coloured
    by ``frame["scale"]``. Plotly draws each colour as its own trace and would otherwise
    order a categorical axis by trace, grouping the layers by scale."""
    return px.bar(frame, x="group", y=y, color="scale", title=title,
                  category_orders={"group": list(frame["group"]), "scale": list(dict.fromkeys(frame["scale"]))},
                  **kwargs)
