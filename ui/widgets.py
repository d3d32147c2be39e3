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


PATTERNS = ["", "/", "\\", "x", "-", "|", "+", "."]  # plotly express's pattern order


def layer_bars(frame: pd.DataFrame, y: str, title: str, pattern_shape: str | None = None,
               range_y: Sequence[float] | None = None) -> go.Figure:
    """One bar per layer (``frame["group"]``, in the frame's order: network order) coloured
    by ``frame["scale"]`` and, with ``pattern_shape``, hatched by that column (the layer's
    role). Each colour and pattern is its own trace, so the categorical axis is ordered
    explicitly (by trace it would group the layers by scale). Built from graph objects, not
    plotly express: a third of the time, and the live tuning redraws this on every slider move."""
    colours = px.colors.qualitative.Plotly
    scales = list(dict.fromkeys(frame["scale"]))
    marks = list(frame[pattern_shape]) if pattern_shape else [None] * len(frame)
    patterns = list(dict.fromkeys(marks))
    bars: dict[tuple[str, object], tuple[list, list]] = {}  # (scale, pattern) -> (layers, values), in frame order
    for group, value, scale, mark in zip(frame["group"], frame[y], frame["scale"], marks):
        layers, values = bars.setdefault((scale, mark), ([], []))
        layers.append(group)
        values.append(value)
    traces = [go.Bar(x=layers, y=values, name=scale if mark is None else f"{scale}, {mark}", legendgroup=scale,
                     marker={"color": colours[scales.index(scale) % len(colours)],
                             "pattern": {"shape": PATTERNS[patterns.index(mark) % len(PATTERNS)]}},
                     hovertemplate=f"%{{x}}<br>{y}: %{{y}}<extra>{scale}</extra>")
              for (scale, mark), (layers, values) in sorted(
                  bars.items(), key=lambda item: (scales.index(item[0][0]), patterns.index(item[0][1])))]
    figure = go.Figure(traces)
    figure.update_layout(
        title=title, barmode="relative",
        legend_title_text="scale" + (f", {pattern_shape}" if pattern_shape else ""),
        xaxis={"title": "group", "categoryorder": "array", "categoryarray": list(frame["group"])},
        yaxis={"title": y, **({"range": list(range_y)} if range_y is not None else {})})
    return figure
