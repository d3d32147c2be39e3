"""DefectPrune dashboard: the frame (navigation and the sidebar workspace)."""

from pathlib import Path

import streamlit as st

from ui.state import restore_from_address, sidebar_workspace, write_address

ASSETS = Path(__file__).parent / "assets"

st.set_page_config(page_title="DefectPrune", page_icon=str(ASSETS / "logo.png"), layout="wide")
st.logo(str(ASSETS / "logo.png"))

pages = [
    st.Page("pages/views/data.py", title="Data", icon=":material/dataset:", default=True),
    st.Page("pages/views/model.py", title="Model", icon=":material/model_training:"),
    st.Page("pages/views/importance.py", title="Layer importance", icon=":material/bar_chart:"),
    st.Page("pages/views/correlation.py", title="Filter correlation", icon=":material/grid_on:"),
    st.Page("pages/views/prune.py", title="Prune", icon=":material/content_cut:"),
    st.Page("pages/views/compare.py", title="Compare", icon=":material/compare:"),
]
navigation = st.navigation(pages)
# A refreshed or reopened tab has an empty session: its address brings the workspace back
# (the dataset, model and run written there on every run, or the job it names).
restore_from_address()
write_address()
# Drawn before the page (a page may st.stop()); a page that changes the workspace reruns.
sidebar_workspace()
navigation.run()
