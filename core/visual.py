"""Pictures as arrays: the per-class palette and mask overlays, shared by the dashboard,
the command line and the benchmark reports (numpy only, no plotting library)."""

from __future__ import annotations

import numpy as np

# Class 0 (background) is never painted. Defect classes take these colours in order, the
# same on every page so that "scratches" is always the same colour.
DEFECT_COLOURS: list[tuple[int, int, int]] = [
    (230, 57, 70),    # red
    (42, 157, 143),   # teal
    (244, 162, 97),   # orange
    (69, 123, 157),   # blue
    (155, 93, 229),   # violet
    (233, 196, 106),  # sand
    (106, 153, 78),   # green
    (241, 91, 181),   # pink
]


def class_colour(class_id: int) -> tuple[int, int, int]:
    if class_id == 0:
        return (0, 0, 0)
    return DEFECT_COLOURS[(class_id - 1) % len(DEFECT_COLOURS)]


def class_colour_hex(class_id: int) -> str:
    return "#{:02x}{:02x}{:02x}".format(*class_colour(class_id))


def to_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45, outline: bool = True) -> np.ndarray:
    """RGB uint8 image with each defect class painted in its colour (background untouched).

    A one-pixel outline in full colour keeps thin defects (hairline cracks) visible even
    where the fill is faint."""
    rgb = to_rgb(image).astype(np.float32)
    out = rgb.copy()
    for class_id in np.unique(mask):
        if class_id == 0:
            continue
        region = mask == class_id
        colour = np.array(class_colour(int(class_id)), np.float32)
        out[region] = (1 - alpha) * rgb[region] + alpha * colour
        if outline:
            edge = region & ~_erode(region)
            out[edge] = colour
    return out.clip(0, 255).astype(np.uint8)


def diff_masks(truth: np.ndarray, before: np.ndarray, after: np.ndarray,
               class_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixels whose correctness a change of model changed: (gained, lost) boolean masks.

    Without ``class_id`` a pixel is right when its predicted class is its true class. With
    ``class_id`` only that class counts: a pixel is right when prediction and truth agree on
    whether it belongs to the class, so a false alarm the second model drops is gained just
    like a defect pixel it finds (the pixels that move that class's IoU)."""
    if class_id is None:
        right_before, right_after = before == truth, after == truth
    else:
        inside = truth == class_id
        right_before, right_after = (before == class_id) == inside, (after == class_id) == inside
    return right_after & ~right_before, right_before & ~right_after


def diff_overlay(image: np.ndarray, truth: np.ndarray, before: np.ndarray, after: np.ndarray,
                 class_id: int | None = None) -> np.ndarray:
    """The image dimmed, green where the second model is right and the first was wrong
    (gained), red where it lost; over all classes, or for ``class_id`` alone (`diff_masks`)."""
    rgb = to_rgb(image).astype(np.float32) * 0.6
    gained, lost = diff_masks(truth, before, after, class_id)
    rgb[gained] = (46, 204, 113)
    rgb[lost] = (231, 76, 60)
    return rgb.clip(0, 255).astype(np.uint8)


def _erode(region: np.ndarray) -> np.ndarray:
    padded = np.pad(region, 1, constant_values=False)
    return (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
            & padded[1:-1, :-2] & padded[1:-1, 2:])
