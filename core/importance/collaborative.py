"""Contribution, the combined score, and collaborative (greedy) removal.

S_i = c_i x (1 - beta x s_i). Collaborative removal takes filters out one at a time, always
the lowest S among those kept, and after each removal recomputes s for the filters whose
strongest partner was the one just removed: of two duplicate filters, removing one makes the
other irreplaceable, so it stays.
"""

from __future__ import annotations

import numpy as np

from core.importance.substitutability import substitutability


def min_max(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min() if values.size else 0.0
    return (values - values.min()) / span if span > 0 else np.ones_like(values)


def combined_scores(contribution: np.ndarray, subst: np.ndarray, beta: float) -> np.ndarray:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], not {beta}")
    return np.asarray(contribution, np.float64) * (1.0 - beta * np.asarray(subst, np.float64))


def collaborative_removal_order(contribution: np.ndarray, correlation: np.ndarray, beta: float) -> np.ndarray:
    """All channels in the order collaborative removal would take them out (first = first
    removed). Removing k channels = the first k of this order, for any k."""
    c = np.asarray(contribution, np.float64)
    r = np.abs(np.asarray(correlation, np.float64)).copy()
    n = c.size
    np.fill_diagonal(r, -np.inf)
    kept = np.ones(n, dtype=bool)
    partner = r.argmax(axis=1)
    s = np.maximum(r.max(axis=1), 0.0)  # a lone channel has no partner: s = 0
    order = []
    for _ in range(n):
        scores = np.where(kept, combined_scores(c, s, beta), np.inf)
        victim = int(np.argmin(scores))
        order.append(victim)
        kept[victim] = False
        r[:, victim] = -np.inf
        stale = kept & (partner == victim)
        if stale.any():
            rows = r[stale]
            partner[stale] = rows.argmax(axis=1)
            s[stale] = np.maximum(rows.max(axis=1), 0.0)
    return np.asarray(order, dtype=np.int64)


def order_to_scores(order: np.ndarray) -> np.ndarray:
    """Scores whose ascending order is ``order``: channel removed first scores lowest."""
    scores = np.empty(order.size, dtype=np.float64)
    scores[order] = np.arange(order.size, dtype=np.float64)
    return scores / max(order.size - 1, 1)


def substitutability_scores(contribution: np.ndarray, correlation: np.ndarray, beta: float) -> np.ndarray:
    """S without the greedy recomputation (the ablation's "+ substitutability" step)."""
    return combined_scores(contribution, substitutability(correlation), beta)
