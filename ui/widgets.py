"""Small drawing helpers used by several pages (legend chips, image grids, CSS)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import streamlit as st

from core.visual import class_colour_hex

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def load_style() -> None:
    st.html(f"<style>{(ASSETS / 'style.css').read_text()}</style>")


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
