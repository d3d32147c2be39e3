"""DefectPrune engine: datasets, models, pruning and evaluation. Knows nothing of Streamlit."""

__version__ = "0.1.0"
