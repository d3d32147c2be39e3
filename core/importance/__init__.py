"""Filter scoring (METHOD.md part 1): contribution, substitutability, the combined score and
collaborative removal, each a Torch-Pruning `Importance` so that one pruner runs every
criterion."""

from core.importance.criteria import CRITERIA, make_importance
from core.importance.substitutability import collect_correlations

__all__ = ["CRITERIA", "make_importance", "collect_correlations"]
