"""Gained and lost pixels between two models' masks, over all classes and per class."""

from __future__ import annotations

import numpy as np

from core.compare import pixel_changes
from core.visual import diff_masks, diff_overlay

# one row of four pixels; classes 0 background, 1 scratch, 2 patch
TRUTH = np.array([[1, 1, 0, 2]])
BEFORE = np.array([[0, 1, 2, 2]])  # misses a scratch pixel, a false patch at pixel 2
AFTER = np.array([[1, 1, 0, 1]])   # finds the scratch, drops the false patch, calls the patch a scratch


def test_diff_masks_over_all_classes_and_for_one_class():
    gained, lost = diff_masks(TRUTH, BEFORE, AFTER)
    assert gained.tolist() == [[True, False, True, False]] and lost.tolist() == [[False, False, False, True]]
    gained, lost = diff_masks(TRUTH, BEFORE, AFTER, class_id=1)
    # the scratch found is gained; the patch pixel now called scratch is a false scratch: lost
    assert gained.tolist() == [[True, False, False, False]] and lost.tolist() == [[False, False, False, True]]
    gained, lost = diff_masks(TRUTH, BEFORE, AFTER, class_id=2)
    # the false patch dropped is gained as much as a patch found would be; the patch missed is lost
    assert gained.tolist() == [[False, False, True, False]] and lost.tolist() == [[False, False, False, True]]


def test_pixel_changes_table_and_the_overlay_it_describes():
    table = pixel_changes(TRUTH, BEFORE, AFTER, ["background", "scratch", "patch"])
    assert table.to_dict("records") == [
        {"class": "all classes", "gained": 2, "lost": 1, "net": 1},
        {"class": "scratch", "gained": 1, "lost": 1, "net": 0},
        {"class": "patch", "gained": 1, "lost": 1, "net": 0},
    ]
    image = np.full((1, 4), 100, np.uint8)
    picture = diff_overlay(image, TRUTH, BEFORE, AFTER, class_id=2)
    assert picture.shape == (1, 4, 3)
    assert picture[0, 2].tolist() == [46, 204, 113] and picture[0, 3].tolist() == [231, 76, 60]
    assert picture[0, 0].tolist() == [60, 60, 60]  # unchanged for patches: the image, dimmed
    assert diff_overlay(image, TRUTH, BEFORE, AFTER)[0, 0].tolist() == [46, 204, 113]  # gained over all classes
