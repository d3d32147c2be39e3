"""Per-class statistics of a dataset for the Data page and `data info`."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from core.data.base import DatasetIndex


def class_statistics(index: DatasetIndex) -> pd.DataFrame:
    """One row per class: images containing it, and its share of all pixels (percent)."""
    counts = np.array(index.samples["pixel_counts"].tolist(), dtype=np.int64).reshape(-1, index.num_classes)
    total = max(int(counts.sum()), 1)
    images = [int((counts[:, c] > 0).sum()) for c in range(index.num_classes)]
    return pd.DataFrame({
        "class_id": range(index.num_classes),
        "class": index.classes,
        "images": images,
        "pixel_share_percent": counts.sum(axis=0) / total * 100.0,
    })


def defect_sizes(index: DatasetIndex, max_images: int = 400, seed: int = 0) -> pd.DataFrame:
    """Connected defect regions (8-connected) per class with their area in pixels, over up
    to ``max_images`` defect images (a seeded sample, so the chart is stable)."""
    defect_rows = index.samples[index.samples["classes"].map(lambda cs: any(c != 0 for c in cs))]
    if len(defect_rows) > max_images:
        defect_rows = defect_rows.sample(n=max_images, random_state=seed)
    records = []
    for _, row in defect_rows.iterrows():
        mask = index.mask_of(row)
        for class_id in row["classes"]:
            if class_id == 0:
                continue
            n, _, stats, _ = cv2.connectedComponentsWithStats((mask == class_id).astype(np.uint8), connectivity=8)
            for area in stats[1:n, cv2.CC_STAT_AREA]:
                records.append({"class": index.classes[class_id], "area_px": int(area)})
    return pd.DataFrame(records, columns=["class", "area_px"])
