"""DefectPrune dashboard: the frame (navigation and the sidebar workspace)."""

from pathlib import Path

import streamlit as st

from ui.state import sidebar_workspace

ASSETS = Path(__file__).parent / "assets"

st.set_page_config(page_title="DefectPrune", page_icon=str(ASSETS / "logo.png"), layout="wide")
st.logo(str(ASSETS / "logo.png"))

pages = [
    st.Page("pages/data.py", title="Data", icon=":material/dataset:", default=True),
]
navigation = st.navigation(pages)
try:
    navigation.run()
finally:
    # drawn after the page, so that a choice made on this run shows at once
    sidebar_workspace()
