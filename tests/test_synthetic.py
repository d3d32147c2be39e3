"""The built-in synthetic datasets: determinism, class maps, class coverage, the on-disk cache
(reuse, atomic generation) and the registry entry points. Small sizes keep this fast."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from core import config
from core.data import synthetic
from core.data.base import UnknownFormatError, read_image, read_label_image
from core.data.registry import load_index
from core.data.synthetic import FAMILIES, SyntheticOptionError, build, generate_sample

SIZE = 64
COUNT = 24


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_seed_gives_identical_samples_and_another_seed_differs(family: str) -> None:
    image, mask = generate_sample(family, 5, seed=0, size=SIZE)
    again_image, again_mask = generate_sample(family, 5, seed=0, size=SIZE)
    assert image.dtype == np.uint8 and mask.dtype == np.uint8
    assert image.shape == mask.shape == (SIZE, SIZE)
    assert np.array_equal(image, again_image) and np.array_equal(mask, again_mask)
    other_image, _ = generate_sample(family, 5, seed=1, size=SIZE)
    neighbour_image, _ = generate_sample(family, 6, seed=0, size=SIZE)
    assert not np.array_equal(image, other_image)
    assert not np.array_equal(image, neighbour_image)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_masks_stay_in_class_map_every_class_appears_and_some_images_are_defect_free(family: str) -> None:
    classes = FAMILIES[family]
    assert classes[0] == "background" and len(classes) >= 3
    n = 80
    images_with = np.zeros(len(classes), int)
    free = 0
    for i in range(n):
        image, mask = generate_sample(family, i, seed=0, size=SIZE)
        assert int(mask.max()) < len(classes)
        present = np.bincount(mask.ravel(), minlength=len(classes)) > 0
        images_with += present
        free += int(not present[1:].any())
        assert image.std() > 2  # textured, never a flat image
    assert 0.05 * n <= free <= 0.3 * n, f"{free} of {n} images defect-free"
    for cid, name in enumerate(classes[1:], start=1):
        assert images_with[cid] >= 0.15 * n, f"{name} in only {images_with[cid]} of {n} images"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_defect_changes_exactly_its_mask_pixels_and_visibly(family: str) -> None:
    """Masks are drawn, then the image is changed only inside them: drawing a defect on a
    background leaves every pixel outside its region untouched, and changes the pixels inside
    by several grey levels on average (subtle at worst, never invisible)."""
    impl = synthetic._FAMILY_IMPL[family]
    assert sorted(impl.drawers) == sorted(FAMILIES[family][1:]) == sorted(impl.order)
    for name, draw in impl.drawers.items():
        changes = []
        for i in range(12):
            rng, ctx = np.random.default_rng(i), {}
            image = impl.background(rng, SIZE, ctx)
            before = image.copy()
            region = draw(rng, image, SIZE, ctx)
            assert region.dtype == bool and region.shape == (SIZE, SIZE) and region.any()
            delta = np.abs(image - before)
            assert not delta[~region].any(), f"{family}/{name} changed pixels outside its mask"
            changes.append(float(delta[region].mean()))
        assert min(changes) > 3, f"{family}/{name}: a defect changed its pixels by {min(changes):.1f} only"
        assert np.mean(changes) > 8, f"{family}/{name}: defects too faint ({np.mean(changes):.1f})"


def test_the_default_family_draws_clear_defects_at_three_scales() -> None:
    """The demo dataset (issue 16) is learnable in minutes: every steel defect stands out by
    tens of grey levels on average, and the classes differ in scale (scratches long and thin,
    inclusions small clusters, patches large areas), as in NEU-Seg."""
    import cv2

    impl, size = synthetic._FAMILY_IMPL["steel"], synthetic.DEFAULT_IMAGE_SIZE
    change, area, length = {}, {}, {}
    for name, draw in impl.drawers.items():
        changes, areas, lengths = [], [], []
        for i in range(12):
            rng, ctx = np.random.default_rng(i), {}
            image = impl.background(rng, size, ctx)
            before = image.copy()
            region = draw(rng, image, size, ctx)
            changes.append(float(np.abs(image - before)[region].mean()))
            _, _, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8))
            areas += list(stats[1:, cv2.CC_STAT_AREA])
            lengths += list(np.maximum(stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT]))
        change[name], area[name], length[name] = np.mean(changes), np.median(areas), np.median(lengths)
    assert min(change.values()) > 25, change
    assert area["patch"] > 4 * area["inclusion"], area
    assert length["scratch"] > 0.3 * size and length["scratch"] ** 2 > 10 * area["scratch"], (length, area)


def test_build_writes_pngs_equal_to_generate_sample_and_indexes_them(tmp_path: Path) -> None:
    index = build(tmp_path, seed=3, family="metal", num_images=COUNT, image_size=SIZE)
    folder = tmp_path / f"metal-{SIZE}px-n{COUNT}-s3"
    assert index.root == folder
    assert sorted(os.listdir(folder / "images")) == [f"{i:04d}.png" for i in range(COUNT)]
    assert index.classes == FAMILIES["metal"]
    assert index.format == "synthetic-metal"
    assert index.native_channels == 1 and index.default_size == (SIZE, SIZE)
    assert len(index.samples) == COUNT
    for i in (0, 7, COUNT - 1):
        image, mask = generate_sample("metal", i, seed=3, size=SIZE)
        assert np.array_equal(read_image(folder / "images" / f"{i:04d}.png"), image)
        assert np.array_equal(read_label_image(folder / "masks" / f"{i:04d}.png"), mask)
    assert sum(index.split_counts().values()) == COUNT
    assert index.split_counts()["val"] >= 2 and index.split_counts()["test"] >= 2


def test_second_build_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build(tmp_path, family="steel", num_images=COUNT, image_size=SIZE)
    first = tmp_path / f"steel-{SIZE}px-n{COUNT}-s0" / "images" / "0000.png"
    mtime = first.stat().st_mtime_ns

    def fail(*_args, **_kwargs):
        raise AssertionError("regenerated although the cache was complete")

    monkeypatch.setattr(synthetic, "generate_sample", fail)
    index = build(tmp_path, family="steel", num_images=COUNT, image_size=SIZE)
    assert len(index.samples) == COUNT
    assert first.stat().st_mtime_ns == mtime


def test_incomplete_or_stale_cache_is_regenerated(tmp_path: Path) -> None:
    build(tmp_path, family="fabric", num_images=COUNT, image_size=SIZE)
    folder = tmp_path / f"fabric-{SIZE}px-n{COUNT}-s0"
    (folder / "masks" / "0005.png").unlink()
    index = build(tmp_path, family="fabric", num_images=COUNT, image_size=SIZE)
    assert (folder / "masks" / "0005.png").is_file() and len(index.samples) == COUNT
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temp or trash left


def test_interrupted_generation_leaves_no_partial_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synthetic.generate_sample
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > COUNT // 2:
            raise KeyboardInterrupt  # as from Ctrl-C, not only ordinary errors
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, family="tile", num_images=COUNT, image_size=SIZE)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "generate_sample", real)
    index = build(tmp_path, family="tile", num_images=COUNT, image_size=SIZE)
    assert len(index.samples) == COUNT


def test_a_copy_another_process_finished_first_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes generating the same set at once: the one finishing second keeps the first's
    folder (a reader of it would see its files vanish if it were swapped) and drops its own."""
    real = synthetic._generate_into
    folder = tmp_path / f"steel-{SIZE}px-n{COUNT}-s0"
    theirs = {}

    def racing(temp: Path, *args) -> None:
        real(folder, *args)  # the other process, done while this one generates
        theirs["inode"] = (folder / "images" / "0000.png").stat().st_ino
        real(temp, *args)

    monkeypatch.setattr(synthetic, "_generate_into", racing)
    index = build(tmp_path, family="steel", num_images=COUNT, image_size=SIZE)
    assert len(index.samples) == COUNT
    assert (folder / "images" / "0000.png").stat().st_ino == theirs["inode"]
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # ours removed, no trash


def test_registry_loads_synthetic_tile_with_deterministic_splits(tmp_path: Path) -> None:
    first = load_index("synthetic-tile", tmp_path, seed=0, num_images=COUNT, image_size=SIZE)
    second = load_index("synthetic-tile", tmp_path, seed=0, num_images=COUNT, image_size=SIZE)
    assert first.classes == ["background", "blowhole", "crack", "fray", "uneven"]
    assert list(first.samples["split"]) == list(second.samples["split"])
    assert list(first.samples["pixel_counts"]) == list(second.samples["pixel_counts"])
    assert set(first.samples["split"]) == {"train", "val", "test"}
    assert first.split_counts()["train"] > first.split_counts()["val"]
    other = load_index("synthetic-tile", tmp_path, seed=1, num_images=COUNT, image_size=SIZE)
    assert other.root != first.root  # another seed is another dataset, in its own folder


def test_default_root_is_the_workspace_cache() -> None:
    index = load_index("synthetic-fabric", None, num_images=8, image_size=32)
    assert index.root == config.synthetic_cache_dir() / "fabric-32px-n8-s0"
    assert len(index.samples) == 8


@pytest.mark.parametrize(
    "options", [{"num_images": 0}, {"image_size": 48}, {"image_size": 16}, {"num_images": "many"}],
)
def test_invalid_options_are_named_errors(tmp_path: Path, options: dict) -> None:
    with pytest.raises(SyntheticOptionError):
        build(tmp_path, family="steel", **options)
    assert list(tmp_path.iterdir()) == []


def test_unknown_family_is_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(UnknownFormatError, match="synthetic-steel"):
        build(tmp_path, family="wood")
    with pytest.raises(UnknownFormatError):
        generate_sample("wood", 0)
