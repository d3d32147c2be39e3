"""Every named dataset error, provoked on a tiny fixture of each format: the error type, and a
message that names the file and says what to do. The dataset folder is never modified."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from core.data.base import (
    CorruptImageError, DatasetRootMissingError, InvalidOptionError, MaskSizeMismatchError,
    MaskValueError, MissingMaskError, NoImagesFoundError, read_image,
)
from core.data.registry import format_module, load_index
from core.errors import DefectPruneError
from test_data_formats import (
    make_crackforest, make_folder, make_kolektorsdd, make_magnetic_tile, make_mvtec, make_neu_seg,
    rect_mask, snapshot, texture, write_image, write_mat,
)

SMALL_MT = {"Blowhole": 2, "Crack": 1, "Free": 2}
MAKERS = {
    "neu-seg": lambda root: make_neu_seg(root, {"train": 2, "val": 1, "test": 1}),
    "magnetic-tile": lambda root: make_magnetic_tile(root, SMALL_MT),
    "kolektorsdd": lambda root: make_kolektorsdd(root, folders=2, parts=2),
    "crackforest": lambda root: make_crackforest(root, labelled=3, unlabelled=0),
    "mvtec": lambda root: make_mvtec(root, "bottle"),
    "folder": lambda root: make_folder(root, count=3),
}
FORMATS = list(MAKERS)
OPTIONS = {"folder": {"class_names": ["background", "scratch", "dent"]}}  # make_folder's ids 0..2


def load(format_name: str, root: Path | None, **options):
    return load_index(format_name, root, **{**OPTIONS.get(format_name, {}), **options})


def first(root: Path, pattern: str) -> Path:
    return sorted(root.rglob(pattern))[0]


# ---------------------------------------------------------------- root and emptiness
@pytest.mark.parametrize("format_name", FORMATS)
def test_missing_root(tmp_path: Path, format_name: str) -> None:
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(DatasetRootMissingError, match="--root") as info:
        load(format_name, missing)
    assert str(missing) in str(info.value)
    assert not missing.exists()


def test_no_root_given() -> None:
    with pytest.raises(DatasetRootMissingError, match="--root"):
        load_index("magnetic-tile", None)


@pytest.mark.parametrize("format_name", FORMATS)
def test_empty_folder(tmp_path: Path, format_name: str) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    if format_name == "folder":  # its folders exist but hold nothing
        (root / "images").mkdir()
        (root / "masks").mkdir()
    with pytest.raises(NoImagesFoundError) as info:
        load(format_name, root)
    assert str(root) in str(info.value)
    # the fix, not a vague hint (MVTec says which of its two layouts it looked for)
    hint = {"mvtec": "<category>/test/<defect>/"}.get(format_name, f"it should hold {format_module(format_name).LAYOUT}")
    assert hint in str(info.value)


def test_folder_without_its_masks_folder(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "own", count=2)
    shutil.rmtree(root / "masks")
    with pytest.raises(DatasetRootMissingError, match="masks=") as info:
        load_index("folder", root)
    assert str(root / "masks") in str(info.value)


def test_crackforest_without_any_ground_truth(tmp_path: Path) -> None:
    root = make_crackforest(tmp_path / "cfd", labelled=0, unlabelled=2)
    with pytest.raises(NoImagesFoundError, match="groundTruth"), pytest.warns(UserWarning, match="unlabeled"):
        load_index("crackforest", root)


# ---------------------------------------------------------------- missing masks
@pytest.mark.parametrize("format_name, mask_glob", [
    ("neu-seg", "ann_dir/*/*.png"),
    ("magnetic-tile", "MT_Crack/Imgs/*.png"),
    ("kolektorsdd", "*_label.bmp"),
    ("folder", "masks/*.png"),
])
def test_image_without_its_required_mask(tmp_path: Path, format_name: str, mask_glob: str) -> None:
    root = MAKERS[format_name](tmp_path / "data")
    mask = first(root, mask_glob)
    mask.unlink()
    with pytest.raises(MissingMaskError) as info:
        load(format_name, root)
    message = str(info.value)
    stem = mask.stem.removesuffix("_label")
    assert stem in message and ("add" in message or "restore" in message)


# ---------------------------------------------------------------- mask size
def _resize_mask(format_name: str, root: Path) -> Path:
    if format_name == "crackforest":
        target = first(root, "groundTruth/*.mat")
        write_mat(target, np.ones((20, 20), np.uint8))
        return target
    if format_name == "mvtec":
        target = first(root, "ground_truth/*/*_mask.png")
    else:
        target = first(root, {"neu-seg": "ann_dir/*/*.png", "magnetic-tile": "MT_Blowhole/Imgs/*.png",
                              "kolektorsdd": "*_label.bmp", "folder": "masks/*.png"}[format_name])
    write_image(target, np.zeros((20, 20), np.uint8))
    return target


@pytest.mark.parametrize("format_name", FORMATS)
def test_mask_size_differs_from_its_image(tmp_path: Path, format_name: str) -> None:
    root = MAKERS[format_name](tmp_path / "data")
    target = _resize_mask(format_name, root)
    with pytest.raises(MaskSizeMismatchError, match="20x20") as info:
        load(format_name, root)
    assert str(target) in str(info.value) and "re-export" in str(info.value)


# ---------------------------------------------------------------- mask values
def test_neu_seg_mask_value_outside_class_map(tmp_path: Path) -> None:
    root = MAKERS["neu-seg"](tmp_path / "neu")
    bad = first(root, "ann_dir/test/*.png")
    write_image(bad, rect_mask(40, 40, (0, 0, 5, 5), 7))
    with pytest.raises(MaskValueError, match="value 7") as info:
        load_index("neu-seg", root, strict=True)
    assert str(bad) in str(info.value) and "class map 0..3" in str(info.value)


def test_folder_values_outside_class_names(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "own", count=3)  # masks hold 0, 1 and 2
    with pytest.raises(MaskValueError, match="value 2") as info:
        load_index("folder", root, class_names=["background", "scratch"], strict=True)
    assert "class_names" in str(info.value) and "masks" in str(info.value)


def test_folder_binary_masks_suggest_threshold(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "a.png", texture(32, 32, 0))
    write_image(tmp_path / "masks" / "a.png", rect_mask(32, 32, (0, 0, 8, 8)))
    with pytest.raises(MaskValueError, match="threshold=128"):
        load_index("folder", tmp_path)


def test_folder_unknown_colour(tmp_path: Path) -> None:
    colours = [(0, 0, 0), (255, 0, 0), (0, 128, 255)]
    root = make_folder(tmp_path / "painted", colours=colours, count=3)
    bad = root / "masks" / "item_2.png"
    painted = np.zeros((32, 64, 3), np.uint8)
    painted[3, 5] = (10, 200, 30)
    write_image(bad, painted)
    with pytest.raises(MaskValueError, match=r"\(10, 200, 30\)") as info:
        load_index("folder", root, class_names=["background", "scratch", "dent"], colours=colours, strict=True)
    message = str(info.value)
    assert str(bad) in message and "x=5, y=3" in message and "colours" in message


def test_crackforest_segmentation_value_outside_1_and_2(tmp_path: Path) -> None:
    root = make_crackforest(tmp_path / "cfd", labelled=2, unlabelled=0)
    bad = root / "groundTruth" / "002.mat"
    seg = np.ones((32, 48), np.uint8)
    seg[0, 0] = 7  # 3 and 4 are defined (areas enclosed by cracks): tests/test_reliability.py
    write_mat(bad, seg)
    with pytest.raises(MaskValueError, match="value 7") as info:
        load_index("crackforest", root, strict=True)
    assert str(bad) in str(info.value) and "1 = background, 2 = crack" in str(info.value)


# ---------------------------------------------------------------- corrupt files
def test_corrupt_files_are_all_reported_at_once(tmp_path: Path) -> None:
    root = make_magnetic_tile(tmp_path / "mt", SMALL_MT)
    images = sorted(root.rglob("*.jpg"))
    images[0].write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    images[-1].write_bytes(b"")  # empty file
    broken_mask = images[2].with_suffix(".png")
    broken_mask.write_text("this is not a png")
    before = snapshot(root)
    with pytest.raises(CorruptImageError) as info:
        load_index("magnetic-tile", root)
    assert snapshot(root) == before
    failed = [path for path, _ in info.value.failures]
    assert failed == [str(images[0]), str(broken_mask), str(images[-1])]
    message = str(info.value)
    assert message.startswith("3 file(s) could not be read")
    assert all(path in message for path in failed) and "Re-export or remove them" in message


def test_corrupt_mat_and_corrupt_image_together(tmp_path: Path) -> None:
    root = make_crackforest(tmp_path / "cfd", labelled=3, unlabelled=0)
    (root / "groundTruth" / "001.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    (root / "image" / "003.jpg").write_bytes(b"\xff\xd8\xff not really")
    with pytest.raises(CorruptImageError) as info:
        load_index("crackforest", root)
    assert [Path(p).name for p, _ in info.value.failures] == ["001.mat", "003.jpg"]


def test_mat_without_the_struct_is_reported(tmp_path: Path) -> None:
    import scipy.io

    root = make_crackforest(tmp_path / "cfd", labelled=2, unlabelled=0)
    scipy.io.savemat(str(root / "groundTruth" / "002.mat"), {"other": np.ones((3, 3))})
    with pytest.raises(CorruptImageError, match="groundTruth with a 2-D field Segmentation"):
        load_index("crackforest", root)


def test_read_image_raises_named_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.jpg"
    bad.write_text("no")
    with pytest.raises(CorruptImageError, match="x.jpg"):
        read_image(bad)


# ---------------------------------------------------------------- files that are not images
@pytest.mark.parametrize("format_name, folder", [
    ("neu-seg", "img_dir/train"),
    ("magnetic-tile", "MT_Free/Imgs"),
    ("kolektorsdd", "kos01"),
    ("crackforest", "image"),
    ("mvtec", "test/broken_large"),
    ("folder", "images"),
])
def test_non_image_file_is_skipped_with_a_warning(tmp_path: Path, format_name: str, folder: str) -> None:
    root = MAKERS[format_name](tmp_path / "data")
    clean = load(format_name, root)
    note = root / folder / "README.txt"
    note.write_text("notes about the data")
    before = snapshot(root)
    with pytest.warns(UserWarning, match="README.txt"):
        index = load(format_name, root)
    assert snapshot(root) == before
    assert {"file": str(note), "reason": "not an image"} in index.skipped
    assert len(index.samples) == len(clean.samples)
    assert list(index.samples["split"]) == list(clean.samples["split"])


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("format_name", FORMATS)
def test_unknown_option_is_refused(tmp_path: Path, format_name: str) -> None:
    root = MAKERS[format_name](tmp_path / "data")
    with pytest.raises(InvalidOptionError, match="no option categroy"):
        load(format_name, root, categroy="bottle")


def test_unknown_option_of_a_synthetic_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="synthetic-steel has no option num_imags; its options: num_images"):
        load_index("synthetic-steel", tmp_path, num_imags=10)
    assert not any(tmp_path.iterdir())  # refused before generating anything


def test_mvtec_category_choice(tmp_path: Path) -> None:
    make_mvtec(tmp_path, "bottle")
    make_mvtec(tmp_path, "screw")
    with pytest.raises(InvalidOptionError, match="2 MVTec categories \\(bottle, screw\\)"):
        load_index("mvtec", tmp_path)
    with pytest.raises(InvalidOptionError, match="choose one of bottle, screw"):
        load_index("mvtec", tmp_path, category="cable")


@pytest.mark.parametrize("options, match", [
    ({"class_names": ["background"]}, "1 entries"),
    ({"class_names": ["background", "a", "a"]}, "repeats a name"),
    ({"class_names": ["background", "a"], "colours": [[0, 0, 0]]}, "1 colours for 2 class names"),
    ({"class_names": ["background", "a"], "colours": [[0, 0, 0], [0, 0, 300]]}, "not an RGB triple"),
    ({"class_names": ["background", "a"], "colours": [[0, 0, 0], [0, 0, 0]]}, "repeat a colour"),
    ({"class_names": ["background", "a", "b"], "threshold": 128}, "exactly two class names"),
])
def test_folder_bad_options(tmp_path: Path, options: dict, match: str) -> None:
    root = make_folder(tmp_path / "own", count=2)
    with pytest.raises(InvalidOptionError, match=match):
        load_index("folder", root, **options)


def test_every_dataset_error_is_user_facing() -> None:
    for error in (DatasetRootMissingError, NoImagesFoundError, MissingMaskError, MaskSizeMismatchError,
                  MaskValueError, CorruptImageError, InvalidOptionError):
        assert issubclass(error, DefectPruneError)
