"""Each real-dataset format read from a tiny fixture written in its exact published layout
(real .jpg/.png/.bmp files, a real MATLAB .mat), then the real datasets when present.

The fixture writers here are shared with tests/test_data_errors.py and tests/test_cli_data.py."""

from __future__ import annotations

import hashlib
import importlib
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import torch

from core.data.registry import FORMAT_MODULES, load_index

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
REAL_FORMATS = ["neu-seg", "magnetic-tile", "kolektorsdd", "crackforest", "mvtec", "folder"]


# ---------------------------------------------------------------- writing real files
def write_image(path: Path, array: np.ndarray) -> Path:
    """Encode with OpenCV by the suffix (.jpg, .png, .bmp); colour arrays are given as RGB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(path.suffix, array)
    assert ok, path
    data.tofile(str(path))
    return path


def texture(height: int, width: int, seed: int, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(60, 200, size=shape, dtype=np.uint8)


def rect_mask(height: int, width: int, box: tuple[int, int, int, int], value: int = 255) -> np.ndarray:
    y0, x0, y1, x1 = box
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = value
    return mask


def anti_aliased(mask: np.ndarray) -> np.ndarray:
    """Blur a hard 0/255 mask like the magnetic-tile annotations (edges of 1..254)."""
    return cv2.GaussianBlur(mask, (7, 7), 2.0)


def write_mat(path: Path, segmentation: np.ndarray) -> Path:
    """A CrackForest ground truth as published: a 1x1 struct array ``groundTruth`` with fields
    Segmentation (1 background, 2 crack) and Boundaries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    struct = np.empty((1, 1), dtype=[("Segmentation", object), ("Boundaries", object)])
    struct[0, 0]["Segmentation"] = segmentation.astype(np.uint8)
    struct[0, 0]["Boundaries"] = np.zeros(segmentation.shape, np.uint8)
    scipy.io.savemat(str(path), {"groundTruth": struct})
    return path


# ---------------------------------------------------------------- fixtures in each layout
def make_neu_seg(root: Path, per_split: dict[str, int] | None = None) -> Path:
    per_split = per_split or {"train": 4, "val": 2, "test": 2}
    n = 0
    for split, count in per_split.items():
        for _ in range(count):
            name = f"{n:06d}"
            write_image(root / "img_dir" / split / f"{name}.jpg", texture(40, 40, n, channels=3))
            write_image(root / "ann_dir" / split / f"{name}.png", rect_mask(40, 40, (5, 5, 20, 20), 1 + n % 3))
            n += 1
    return root


MT_FIXTURE = {"Blowhole": 3, "Break": 2, "Crack": 2, "Fray": 2, "Uneven": 2, "Free": 4}


def make_magnetic_tile(root: Path, counts: dict[str, int] | None = None) -> Path:
    """MT_<Class>/Imgs/<name>.jpg + <name>.png (anti-aliased masks; Free all zero)."""
    n = 0
    for name, count in (counts or MT_FIXTURE).items():
        for i in range(count):
            h, w = (48, 64) if i % 2 else (64, 40)
            stem = f"exp{i % 3}_num_{1000 + n}"
            imgs = root / f"MT_{name}" / "Imgs"
            write_image(imgs / f"{stem}.jpg", texture(h, w, n))
            hard = np.zeros((h, w), np.uint8) if name == "Free" else rect_mask(h, w, (8, 8, 30, 30))
            write_image(imgs / f"{stem}.png", anti_aliased(hard))
            n += 1
    return root


def make_kolektorsdd(root: Path, folders: int = 8, parts: int = 3) -> Path:
    """kosNN/PartK.jpg + kosNN/PartK_label.bmp; every other commutator has a crack in Part1."""
    for f in range(1, folders + 1):
        for k in range(parts):
            folder = root / f"kos{f:02d}"
            write_image(folder / f"Part{k}.jpg", texture(80, 32, f * 10 + k))
            label = np.zeros((80, 32), np.uint8)
            if f % 2 == 0 and k == 1:
                label[20:60, 14:17] = 255 if f % 4 else 1  # non-zero = crack, whatever the value
            write_image(folder / f"Part{k}_label.bmp", label)
    return root


def make_crackforest(root: Path, labelled: int = 6, unlabelled: int = 1) -> Path:
    """image/NNN.jpg (48 wide, 32 high, colour) + groundTruth/NNN.mat; the last images have
    no ground truth."""
    for i in range(1, labelled + unlabelled + 1):
        write_image(root / "image" / f"{i:03d}.jpg", texture(32, 48, i, channels=3))
        if i <= labelled:
            seg = np.ones((32, 48), np.uint8)
            seg[10:12, 5:40] = 2
            write_mat(root / "groundTruth" / f"{i:03d}.mat", seg)
    return root


def make_mvtec(root: Path, category: str = "bottle") -> Path:
    """<category>/{train,test}/... + ground_truth/<defect>/NNN_mask.png; returns the category."""
    folder = root / category
    n = 0
    for part, defect, count in [("train", "good", 3), ("test", "good", 2), ("test", "broken_large", 3),
                                ("test", "contamination", 2)]:
        for i in range(count):
            write_image(folder / part / defect / f"{i:03d}.png", texture(64, 64, n, channels=3))
            if defect != "good":
                write_image(folder / "ground_truth" / defect / f"{i:03d}_mask.png",
                            rect_mask(64, 64, (10, 10, 30, 40)))
            n += 1
    return folder


def make_folder(root: Path, colours: list[tuple[int, int, int]] | None = None, count: int = 6) -> Path:
    """images/<stem>.jpg + masks/<stem>.png, class ids 0..2 (or painted in ``colours``)."""
    for i in range(count):
        write_image(root / "images" / f"item_{i}.jpg", texture(32, 64, i))
        ids = np.zeros((32, 64), np.uint8)
        ids[4:12, 4:20] = 1 + i % 2
        if colours is None:
            write_image(root / "masks" / f"item_{i}.png", ids)
        else:
            write_image(root / "masks" / f"item_{i}.png", np.array(colours, np.uint8)[ids])
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under root with its size, mtime and content hash (folders too)."""
    out = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(root))] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns, digest)
    return out


# ---------------------------------------------------------------- module contract
@pytest.mark.parametrize("format_name", REAL_FORMATS)
def test_format_module_contract(format_name: str) -> None:
    module = importlib.import_module(FORMAT_MODULES[format_name])
    doc = module.__doc__ or ""
    assert "Licence" in doc and ("Reference" in doc or "reference" in doc), format_name
    assert module.FORMAT == format_name
    assert module.CLASSES[0] == "background"
    h, w = module.DEFAULT_SIZE
    assert h % 32 == 0 and w % 32 == 0 and min(h, w) >= 32
    assert callable(module.build)


def test_default_sizes_follow_the_aspect_of_each_dataset() -> None:
    kolektor = importlib.import_module(FORMAT_MODULES["kolektorsdd"]).DEFAULT_SIZE
    crack = importlib.import_module(FORMAT_MODULES["crackforest"]).DEFAULT_SIZE
    assert kolektor[0] / kolektor[1] == pytest.approx(2.5, rel=0.15)  # ~500 wide x 1250 high
    assert crack[1] / crack[0] == pytest.approx(1.5, rel=0.1)  # 480 wide x 320 high


# ---------------------------------------------------------------- magnetic tile
def test_neu_seg_official_split_and_class_ids(tmp_path: Path) -> None:
    root = make_neu_seg(tmp_path / "neu")  # 4 train, 2 val, 2 test; image n holds class 1 + n % 3
    before = snapshot(root)
    index = load_index("neu-seg", root, seed=0)
    assert snapshot(root) == before
    assert index.classes == ["background", "inclusion", "patches", "scratches"]
    # the published split, whatever the seed (no seeded re-split)
    assert index.split_counts() == {"train": 4, "val": 2, "test": 2}
    for seed in (1, 7):
        assert list(load_index("neu-seg", root, seed=seed).samples["split"]) == list(index.samples["split"])
    for _, row in index.samples.iterrows():
        split = Path(row["image"]).parent.name
        assert row["split"] == split and Path(row["mask"]) == root / "ann_dir" / split / f"{Path(row['image']).stem}.png"
        expected = 1 + int(Path(row["image"]).stem) % 3
        mask = index.mask_of(row)
        assert set(np.unique(mask)) == {0, expected}  # class ids read as stored, background 0
        assert int((mask == expected).sum()) == 15 * 15
    assert index.images_per_class() == {"background": 8, "inclusion": 3, "patches": 3, "scratches": 2}
    assert index.native_channels == 1


def test_magnetic_tile_classes_counts_and_threshold(tmp_path: Path) -> None:
    root = make_magnetic_tile(tmp_path / "mt")
    (root / "MT_Crack" / "Imgs" / "Thumbs.db").write_bytes(b"not an image")
    before = snapshot(root)
    with pytest.warns(UserWarning, match="Thumbs.db"):
        index = load_index("magnetic-tile", root, seed=0)
    assert snapshot(root) == before
    assert index.classes == ["background", "blowhole", "break", "crack", "fray", "uneven"]
    assert len(index.samples) == sum(MT_FIXTURE.values()) == 15
    assert index.images_per_class() == {
        "background": 15, "blowhole": 3, "break": 2, "crack": 2, "fray": 2, "uneven": 2,
    }
    assert (index.samples["label"] == 0).sum() == 4  # MT_Free
    assert [s["reason"] for s in index.skipped] == ["not an image"]
    assert sum(index.split_counts().values()) == 15
    assert index.native_channels == 1

    row = index.samples[index.samples["image"].str.contains("MT_Blowhole")].iloc[0]
    raw = cv2.imread(row["mask"], cv2.IMREAD_GRAYSCALE)
    soft = (raw > 0) & (raw < 128)
    assert soft.any() and ((raw >= 128) & (raw < 255)).any()  # really anti-aliased
    decoded = index.mask_of(row)
    assert decoded.dtype == np.uint8 and decoded.shape == raw.shape
    np.testing.assert_array_equal(decoded, np.where(raw >= 128, 1, 0))
    assert set(np.unique(decoded)) == {0, 1}  # blowhole = class 1, soft edges are background
    free = index.samples[index.samples["label"] == 0].iloc[0]
    assert not index.mask_of(free).any()


def test_magnetic_tile_defect_mask_empty_at_threshold_is_warned(tmp_path: Path) -> None:
    root = make_magnetic_tile(tmp_path / "mt", {"Uneven": 3, "Free": 2})
    blank = sorted((root / "MT_Uneven" / "Imgs").glob("*.png"))[0]
    write_image(blank, np.full(cv2.imread(str(blank), 0).shape, 127, np.uint8))  # all below 128
    index = load_index("magnetic-tile", root)
    assert len(index.warnings) == 1 and blank.stem in index.warnings[0]
    assert index.images_per_class()["uneven"] == 2
    assert (index.samples["label"] == 5).sum() == 3


# ---------------------------------------------------------------- KolektorSDD
def test_kolektorsdd_groups_commutators_into_one_split(tmp_path: Path) -> None:
    root = make_kolektorsdd(tmp_path / "kolektor", folders=12, parts=3)
    before = snapshot(root)
    index = load_index("kolektorsdd", root, seed=0)
    assert snapshot(root) == before
    assert index.classes == ["background", "crack"]
    assert len(index.samples) == 36
    assert index.images_per_class() == {"background": 36, "crack": 6}
    assert index.default_size == (320, 128)
    splits_per_group = index.samples.groupby("group")["split"].nunique()
    assert len(splits_per_group) == 12 and (splits_per_group == 1).all()
    assert set(index.samples["split"]) == {"train", "val", "test"}
    for seed in range(6):  # grouping holds for any seed, not by luck
        other = load_index("kolektorsdd", root, seed=seed)
        assert (other.samples.groupby("group")["split"].nunique() == 1).all()
    cracked = index.samples[index.samples["classes"].map(lambda c: 1 in c)]
    for _, row in cracked.iterrows():
        mask = index.mask_of(row)
        assert set(np.unique(mask)) == {0, 1} and int((mask == 1).sum()) == 40 * 3  # 255 and 1 alike


# ---------------------------------------------------------------- CrackForest
def test_crackforest_reads_mat_ground_truth_and_skips_unlabelled(tmp_path: Path) -> None:
    root = make_crackforest(tmp_path / "cfd", labelled=6, unlabelled=2)
    before = snapshot(root)
    with pytest.warns(UserWarning, match="unlabeled"):
        index = load_index("crackforest", root, seed=0)
    assert snapshot(root) == before
    assert index.classes == ["background", "crack"]
    assert len(index.samples) == 6
    assert sorted(Path(s["file"]).name for s in index.skipped) == ["007.jpg", "008.jpg"]
    assert all("unlabeled" in s["reason"] for s in index.skipped)
    assert index.native_channels == 3 and index.default_size == (128, 192)
    row = index.samples.iloc[0]
    mask = index.mask_of(row)
    assert mask.dtype == np.uint8 and mask.shape == (32, 48)
    assert int((mask == 1).sum()) == 2 * 35 and int((mask == 0).sum()) == 32 * 48 - 70
    assert index.images_per_class() == {"background": 6, "crack": 6}


def test_crackforest_mat_layout_is_the_published_one(tmp_path: Path) -> None:
    path = write_mat(tmp_path / "001.mat", np.ones((4, 5), np.uint8))
    mat = scipy.io.loadmat(str(path))
    assert mat["groundTruth"].shape == (1, 1) and "Segmentation" in mat["groundTruth"].dtype.names
    # the same struct inside a 1x1 cell (BSDS style) reads too
    from core.data.crackforest import find_segmentation

    cell = np.empty((1, 1), object)
    cell[0, 0] = mat["groundTruth"]
    seg = find_segmentation({"groundTruth": cell})
    assert seg is not None and seg.shape == (4, 5)


# ---------------------------------------------------------------- MVTec
def test_mvtec_one_category(tmp_path: Path) -> None:
    category = make_mvtec(tmp_path / "mvtec", "bottle")
    make_mvtec(tmp_path / "mvtec", "screw")
    before = snapshot(tmp_path / "mvtec")
    by_option = load_index("mvtec", tmp_path / "mvtec", category="bottle")
    by_root = load_index("mvtec", category)
    assert snapshot(tmp_path / "mvtec") == before
    for index in (by_option, by_root):
        assert index.classes == ["background", "broken_large", "contamination"]
        assert len(index.samples) == 10
        assert index.images_per_class() == {"background": 10, "broken_large": 3, "contamination": 2}
        assert index.native_channels == 3 and index.default_size == (256, 256)
    assert list(by_option.samples["split"]) == list(by_root.samples["split"])
    good = by_root.samples[by_root.samples["mask"].isna()]
    assert len(good) == 5 and all(not by_root.mask_of(r).any() for _, r in good.iterrows())
    row = by_root.samples[by_root.samples["image"].str.contains("contamination")].iloc[0]
    mask = by_root.mask_of(row)
    assert set(np.unique(mask)) == {0, 2} and int((mask == 2).sum()) == 20 * 30


def test_mvtec_defect_image_without_mask_is_skipped(tmp_path: Path) -> None:
    category = make_mvtec(tmp_path, "pill")
    (category / "ground_truth" / "contamination" / "001_mask.png").unlink()
    with pytest.warns(UserWarning):
        index = load_index("mvtec", category)
    assert len(index.samples) == 9
    assert [Path(s["file"]).name for s in index.skipped] == ["001.png"]


# ---------------------------------------------------------------- generic folder
def test_folder_values_mode(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "own")
    before = snapshot(root)
    index = load_index("folder", root, class_names=["background", "scratch", "dent"])
    assert snapshot(root) == before
    assert index.classes == ["background", "scratch", "dent"]
    assert index.images_per_class() == {"background": 6, "scratch": 3, "dent": 3}
    assert index.default_size == (256, 512)  # first image is 32x64: aspect kept
    assert index.native_channels == 1
    mask = index.mask_of(index.samples.iloc[1])
    assert set(np.unique(mask)) == {0, 2} and int((mask == 2).sum()) == 8 * 16


def test_folder_colour_mode(tmp_path: Path) -> None:
    colours = [(0, 0, 0), (255, 0, 0), (0, 128, 255)]
    root = make_folder(tmp_path / "painted", colours=colours)
    index = load_index("folder", root, class_names=["background", "scratch", "dent"], colours=colours)
    assert index.images_per_class() == {"background": 6, "scratch": 3, "dent": 3}
    for _, row in index.samples.iterrows():
        expected = 1 + int(Path(row["image"]).stem[-1]) % 2
        mask = index.mask_of(row)
        assert set(np.unique(mask)) == {0, expected} and int((mask == expected).sum()) == 8 * 16


def test_folder_custom_folders_and_binary_threshold(tmp_path: Path) -> None:
    for i in range(4):
        write_image(tmp_path / "pics" / f"{i}.png", texture(64, 64, i))
        write_image(tmp_path / "labels" / f"{i}.png", rect_mask(64, 64, (0, 0, 16, 16)) if i % 2 else
                    np.zeros((64, 64), np.uint8))
    index = load_index("folder", tmp_path, images="pics", masks=str(tmp_path / "labels"), threshold=128)
    assert index.classes == ["background", "defect"]
    assert index.images_per_class() == {"background": 4, "defect": 2}
    assert index.default_size == (256, 256)


# ---------------------------------------------------------------- splits
def test_same_seed_same_split_and_seeds_differ(tmp_path: Path) -> None:
    root = make_magnetic_tile(tmp_path / "mt", {"Blowhole": 10, "Free": 10})
    first = load_index("magnetic-tile", root, seed=3).samples
    again = load_index("magnetic-tile", root, seed=3).samples
    assert list(first["split"]) == list(again["split"])
    others = [list(load_index("magnetic-tile", root, seed=s).samples["split"]) for s in (4, 5)]
    assert any(o != list(first["split"]) for o in others)
    # stratified: each class spread 7/1/2 over train/val/test (slot centres of 70/15/15)
    for label in (0, 1):
        counts = first[first["label"] == label]["split"].value_counts().to_dict()
        assert counts == {"train": 7, "val": 1, "test": 2}


# ---------------------------------------------------------------- real datasets
def real_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name} not found at {path} (../shared/datasets beside the repo)")
    return path


def test_real_neu_seg() -> None:
    root = real_dataset("neu-seg")
    start = time.perf_counter()
    index = load_index("neu-seg", root)
    print(f"neu-seg: indexed {len(index.samples)} images in {time.perf_counter() - start:.1f} s")
    assert index.classes == ["background", "inclusion", "patches", "scratches"]
    assert index.split_counts() == {"train": 3129, "val": 894, "test": 447}
    test = index.split("test")
    assert len(test) == 447
    present = {c for classes in test["classes"] for c in classes if c}
    assert present == {1, 2, 3}  # inclusion, patches and scratches all occur in the test split
    # every image shows a defect; 927 of them show two or three classes (the README's "one
    # defect class each" is the image-level label of the NEU classification set)
    defects = index.samples["classes"].map(lambda cls: len([c for c in cls if c]))
    assert (defects >= 1).all() and int((defects > 1).sum()) == 927
    assert index.images_per_class() == {
        "background": 4470, "inclusion": 1824, "patches": 1808, "scratches": 1782}


def test_real_magnetic_tile() -> None:
    root = real_dataset("magnetic-tile")
    start = time.perf_counter()
    index = load_index("magnetic-tile", root, seed=0)
    print(f"magnetic-tile: indexed {len(index.samples)} images in {time.perf_counter() - start:.1f} s")
    assert len(index.samples) == 1344
    assert index.classes == ["background", "blowhole", "break", "crack", "fray", "uneven"]
    labels = index.samples["label"].value_counts().to_dict()
    assert labels == {0: 952, 1: 115, 2: 85, 3: 57, 4: 32, 5: 103}
    per_class = index.images_per_class()
    assert per_class["background"] == 1344
    assert {k: per_class[k] for k in ("blowhole", "break", "crack", "fray")} == {
        "blowhole": 115, "break": 85, "crack": 57, "fray": 32}
    # four Uneven masks mark nothing at the 128 threshold: counted, warned, kept as uneven
    assert per_class["uneven"] == 103 - len(index.warnings) and len(index.warnings) == 4
    counts = index.split_counts()
    assert sum(counts.values()) == 1344 and counts["train"] == pytest.approx(0.7 * 1344, abs=10)
    for label in range(6):  # stratified: every class in every split
        assert set(index.samples[index.samples["label"] == label]["split"]) == {"train", "val", "test"}


# ---------------------------------------------------------------- into the torch dataset
def test_new_formats_feed_the_segmentation_dataset(tmp_path: Path) -> None:
    from core.data.dataset import SegmentationDataset

    cfd = load_index("crackforest", make_crackforest(tmp_path / "cfd", labelled=6, unlabelled=0))
    mvtec = load_index("mvtec", make_mvtec(tmp_path / "mvtec"))
    for index in (cfd, mvtec):
        data = SegmentationDataset(index, "train", size=(64, 96), in_channels=3)
        image, mask = data[0]
        assert tuple(image.shape) == (3, 64, 96) and tuple(mask.shape) == (64, 96)
        assert int(mask.max()) < index.num_classes
    good = SegmentationDataset(mvtec, "train", size=(64, 64))
    masks = [good[i][1] for i in range(len(good))]
    assert any(int(m.sum()) == 0 for m in masks) and any(int(m.sum()) > 0 for m in masks)


def test_segmentation_dataset_channels_masks_and_seeded_augmentation(tmp_path: Path) -> None:
    from core.data.dataset import SegmentationDataset

    index = load_index("neu-seg", make_neu_seg(tmp_path / "neu"))
    grey3 = SegmentationDataset(index, "train", size=(64, 96), in_channels=3)
    grey1 = SegmentationDataset(index, "train", size=(64, 96), in_channels=1)
    scratches = next(i for i, classes in enumerate(grey3.samples["classes"]) if 3 in classes)
    image3, mask = grey3[scratches]
    image1, _ = grey1[scratches]
    assert image3.dtype == torch.float32 and tuple(image3.shape) == (3, 64, 96)
    assert tuple(image1.shape) == (1, 64, 96)
    torch.testing.assert_close(image3, image1.expand(3, -1, -1))  # grey repeated, not three different channels
    # nearest neighbour: the 40 px mask stretched to 64x96 keeps exactly {0, 3}; a smoothing
    # resize would leave 1s and 2s (other classes) along the edges
    assert mask.dtype == torch.int64 and set(mask.unique().tolist()) == {0, 3}

    augmented = SegmentationDataset(index, "train", size=(64, 64), augment=True, seed=3)
    same = SegmentationDataset(index, "train", size=(64, 64), augment=True, seed=3)
    other = SegmentationDataset(index, "train", size=(64, 64), augment=True, seed=4)
    pairs = [augmented[i] for i in range(len(augmented))]
    for i, (image, mask) in enumerate(pairs):
        again = same[i]
        torch.testing.assert_close(image, again[0])
        assert torch.equal(mask, again[1])
    assert any(not torch.equal(image, other[i][0]) for i, (image, _) in enumerate(pairs))  # the seed matters
    augmented.set_epoch(1)
    assert any(not torch.equal(image, augmented[i][0]) for i, (image, _) in enumerate(pairs))  # and the epoch
