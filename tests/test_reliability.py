"""Issue 14's probe table as tests: path confinement through every option, nothing earlier
overwritten, resource caps, values a format does not define, and one-line errors.

Each case is small (tiny fixtures on disk, in-process CLI calls where no training runs), so the
module runs in well under a minute; `bench/robustness.py` runs the same kind of probes as a
table and writes `bench/results/robustness.md`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from core.data.base import InvalidOptionError
from core.data.registry import load_index
from tests.test_cli_train import in_process
from tests.test_data_formats import make_folder, make_mvtec, write_image


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------- 1. confinement of options
@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the dataset (outside it) holding images and masks that must stay unread."""
    return make_folder(tmp_path / "private")


@pytest.mark.parametrize("option, value", [
    ("images", "ABS/images"), ("masks", "ABS/masks"), ("images", "../private/images"),
    ("masks", "images/../../private/masks"), ("images", "link"),
])
def test_folder_options_cannot_leave_the_dataset_root(tmp_path, outside, option, value):
    root = make_folder(tmp_path / "data")
    (root / "link").symlink_to(outside / "images")
    value = value.replace("ABS", str(outside))
    with pytest.raises(InvalidOptionError, match=f"option {option}=.*outside the dataset folder"):
        load_index("folder", root, **{option: value})


def test_folder_options_inside_the_root_still_work(tmp_path):
    make_folder(tmp_path / "data" / "sub")
    index = load_index("folder", tmp_path / "data", images="sub/images", masks="sub/masks",
                       class_names=["background", "a", "b"])
    assert len(index.samples) == 6


@pytest.mark.parametrize("category", ["../other", "ABS", "bottle/../../other", "."])
def test_mvtec_category_is_a_name_inside_the_root(tmp_path, category):
    make_mvtec(tmp_path / "mvtec", "bottle")
    make_mvtec(tmp_path / "other" / "x", "bottle")
    category = category.replace("ABS", str(tmp_path / "other" / "x" / "bottle"))
    with pytest.raises(InvalidOptionError, match="category"):
        load_index("mvtec", tmp_path / "mvtec", category=category)


# ---------------------------------------------------------------- 2. job ids never reuse a folder
@pytest.mark.parametrize("how", ["moved aside", "emptied"])
def test_a_new_store_never_reuses_an_earlier_jobs_folder(tmp_path, how):
    from core.runs.store import Store

    store = Store(tmp_path / "defectprune.sqlite")
    first = store.create_job("train", {})
    folder = store.job_dir(first)
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "spec.json").write_text("{}")
    store.close()
    if how == "moved aside":
        (tmp_path / "defectprune.sqlite").rename(tmp_path / "old.sqlite")
        for extra in tmp_path.glob("defectprune.sqlite-*"):
            extra.unlink()
        store = Store(tmp_path / "defectprune.sqlite")
    else:
        with store.write() as conn:
            conn.execute("DELETE FROM jobs")
    again = store.create_job("train", {})
    assert again > first and store.job_dir(again) != folder
    assert (folder / "checkpoint" / "spec.json").read_text() == "{}"


# ---------------------------------------------------------------- 3-4. output folders
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An untrained checkpoint saved in-process (no training) and its tiny NEU-Seg dataset."""
    from core.models.checkpoint import save_checkpoint
    from core.models.zoo import ModelSpec, build_model
    from tests.test_train import write_tiny_neu_seg

    root = write_tiny_neu_seg(tmp_path_factory.mktemp("neu"))
    spec = ModelSpec(classes=["background", "inclusion", "patches", "scratches"], in_channels=1,
                     input_size=(64, 64), dataset_format="neu-seg", dataset_root=str(root))
    out = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "unet", build_model(spec), spec)
    return out, root


def tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["checkpoint", "inside checkpoint", "dataset", "foreign folder"])
def test_prune_out_refuses_folders_that_are_not_its_own(tiny_checkpoint, tmp_path, capsys, where):
    checkpoint, root = tiny_checkpoint
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    out = {"checkpoint": checkpoint, "inside checkpoint": checkpoint / "rounds", "dataset": root,
           "foreign folder": foreign}[where]
    before = {folder: tree(folder) for folder in (checkpoint, root, foreign)}
    proc = in_process(capsys, "prune", "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu")
    assert_one_line_error(proc, "--out")
    assert {folder: tree(folder) for folder in (checkpoint, root, foreign)} == before


def test_train_out_never_deletes_a_prune_run_inside_a_checkpoint(tiny_checkpoint, tmp_path, capsys):
    import shutil

    checkpoint, root = tiny_checkpoint
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    (target / "round_01").mkdir()
    (target / "round_01" / "spec.json").write_text("{}")
    (target / "rounds.json").write_text("{}")
    proc = in_process(capsys, "train", "--format", "neu-seg", "--root", str(root), "--size", "64",
                      "--epochs", "1", "--out", str(target), "--device", "cpu")
    assert_one_line_error(proc, "--out")
    assert (target / "round_01" / "spec.json").is_file() and (target / "rounds.json").is_file()


def test_save_checkpoint_never_replaces_a_folder_holding_other_files(tiny_checkpoint, tmp_path):
    import shutil

    from core.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    checkpoint, _ = tiny_checkpoint
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    (target / "round_01").mkdir()
    loaded = load_checkpoint(target)
    with pytest.raises(CheckpointError, match="holds other files"):
        save_checkpoint(target, loaded.model, loaded.spec)
    assert (target / "round_01").is_dir()


@pytest.mark.parametrize("out", ["/proc/defectprune-out", "FILE/sub"])
def test_train_refuses_an_unwritable_out_before_reading_data(tmp_path, capsys, out):
    (tmp_path / "file").write_text("x")
    out = out.replace("FILE", str(tmp_path / "file"))
    # the dataset folder does not exist: the --out check must come first (before any work)
    proc = in_process(capsys, "train", "--format", "neu-seg", "--root", str(tmp_path / "absent"),
                      "--size", "64", "--epochs", "1", "--out", out, "--device", "cpu")
    assert_one_line_error(proc, "cannot be written")


# ---------------------------------------------------------------- 5. a full disk
def test_a_full_disk_on_the_command_line_is_one_line(monkeypatch, capsys):
    from safetensors import SafetensorError

    import core.commands.data as data_command

    def full(_args):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")

    monkeypatch.setattr(data_command, "run_info", full)
    proc = in_process(capsys, "data", "info", "--format", "synthetic-steel")
    assert_one_line_error(proc, "no space left on the device", "earlier results are intact")


def test_a_full_disk_leaves_no_partial_per_image_table(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import errno

    import core.atomic

    checkpoint, _ = tiny_checkpoint
    csv = tmp_path / "per_image.csv"
    real_fsync = core.atomic.fsync_file

    def fsync_full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(core.atomic, "fsync_file", fsync_full)
    proc = in_process(capsys, "evaluate", "--checkpoint", str(checkpoint), "--per-image", str(csv),
                      "--device", "cpu")
    monkeypatch.setattr(core.atomic, "fsync_file", real_fsync)
    assert_one_line_error(proc, "no space left on the device")
    assert not csv.exists() and not list(tmp_path.glob(".per_image*"))


# ---------------------------------------------------------------- 6. the run store says what is wrong
@pytest.mark.parametrize("message, says, advises_moving", [
    ("attempt to write a readonly database", "read-only", False),
    ("database or disk is full", "no space left", False),
    ("file is not a database", "damaged", True),
])
def test_the_run_store_error_names_the_real_problem(tmp_path, monkeypatch, message, says, advises_moving):
    import sqlite3

    import core.runs.store as store_module
    from core.runs.store import Store, StoreError

    Store(tmp_path / "defectprune.sqlite").close()
    real_connect = sqlite3.connect

    class Failing:
        def __init__(self, conn):
            self.conn = conn

        def execute(self, sql, *args):
            if sql.startswith("PRAGMA journal_mode"):
                raise (sqlite3.DatabaseError if advises_moving else sqlite3.OperationalError)(message)
            return self.conn.execute(sql, *args)

        def __setattr__(self, name, value):
            if name == "conn":
                object.__setattr__(self, name, value)
            else:
                setattr(self.conn, name, value)

    monkeypatch.setattr(store_module.sqlite3, "connect", lambda *a, **k: Failing(real_connect(*a, **k)))
    with pytest.raises(StoreError) as raised:
        Store(tmp_path / "defectprune.sqlite")
    assert says in str(raised.value)
    assert ("move it aside" in str(raised.value)) is advises_moving



# ---------------------------------------------------------------- 7. one file's values are one file's problem
def test_crackforest_values_3_and_4_are_background_with_a_warning_naming_the_files(tmp_path):
    from tests.test_data_formats import make_crackforest, write_mat

    root = make_crackforest(tmp_path / "cfd", labelled=4, unlabelled=0)
    for name, value in (("002.mat", 3), ("003.mat", 4)):
        seg = np.ones((32, 48), np.uint8)
        seg[10:12, 5:40] = 2
        seg[20:30, 0:10] = value
        write_mat(root / "groundTruth" / name, seg)
    for strict in (False, True):  # the format defines them: strict reads them too
        index = load_index("crackforest", root, strict=strict)
        assert len(index.samples) == 4
        warning = " ".join(index.warnings)
        assert "002.mat" in warning and "003.mat" in warning and "001.mat" not in warning
        row = index.samples[index.samples["mask"].str.endswith("002.mat")].iloc[0]
        mask = index.mask_of(row)
        assert set(np.unique(mask)) == {0, 1} and mask[20:30, 0:10].max() == 0


def test_the_real_crackforest_loads_when_present():
    from tests.conftest import shared_dataset

    index = load_index("crackforest", shared_dataset("crackforest"))
    assert len(index.samples) == 118 and any("3/4" in w for w in index.warnings)


def test_a_value_outside_the_class_map_skips_that_file_unless_strict(tmp_path, capsys):
    from core.data.base import MaskValueError
    from tests.test_data_formats import make_neu_seg, rect_mask

    root = make_neu_seg(tmp_path / "neu")
    bad = sorted((root / "ann_dir" / "train").glob("*.png"))[0]
    write_image(bad, rect_mask(40, 40, (0, 0, 5, 5), 7))
    index = load_index("neu-seg", root)
    assert str(bad) in [item["file"] for item in index.skipped]
    assert str(bad) not in set(index.samples["mask"]) and index.warnings
    with pytest.raises(MaskValueError, match="value 7"):
        load_index("neu-seg", root, strict=True)
    proc = in_process(capsys, "data", "info", "--format", "neu-seg", "--root", str(root), "--strict")
    assert_one_line_error(proc, "value 7", bad.name)
    proc = in_process(capsys, "data", "info", "--format", "neu-seg", "--root", str(root))
    assert proc.returncode == 0 and bad.name in proc.stdout


# ---------------------------------------------------------------- 8-10. resource caps
@pytest.mark.parametrize("command", [
    ["train", "--format", "synthetic-steel", "--out", "OUT", "--workers", "1000000"],
    ["evaluate", "--checkpoint", "OUT", "--workers", "1000000"],
    ["prune", "--checkpoint", "OUT", "--out", "OUT2", "--workers", "1000000"],
])
def test_workers_are_capped_before_anything_forks(tmp_path, capsys, command):
    command = [c.replace("OUT", str(tmp_path / "x")) for c in command]
    proc = in_process(capsys, *command)
    assert proc.returncode == 2 and "more than the limit" in proc.stderr and "DEFECTPRUNE_MAX_WORKERS" in proc.stderr


def test_a_job_with_too_many_workers_is_refused_at_submission(monkeypatch):
    from core.runs.kinds import job_request
    from core.services.request import ParameterError

    monkeypatch.setenv("DEFECTPRUNE_MAX_WORKERS", "3")
    job_request("train", {"format": "synthetic-steel", "workers": 3})
    with pytest.raises(ParameterError, match="more than the limit of 3"):
        job_request("train", {"format": "synthetic-steel", "workers": 4})


def write_bomb(path: Path, side: int) -> Path:
    """A PNG whose header says side x side: all zeros, so it compresses to a few hundred KB."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".png", np.zeros((side, side), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    data.tofile(str(path))
    return path


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, monkeypatch, capsys):
    import time

    root = make_folder(tmp_path / "data", count=3)
    write_bomb(root / "images" / "item_1.jpg", 4000)  # 16 MP in a few KB, over a 4 MP limit
    monkeypatch.setenv("DEFECTPRUNE_MAX_IMAGE_PIXELS", "4000000")
    start = time.perf_counter()
    proc = in_process(capsys, "data", "info", "--format", "folder", "--root", str(root),
                      "--option", 'class_names=["background","a","b"]')
    assert_one_line_error(proc, "item_1.jpg", "4000x4000", "DEFECTPRUNE_MAX_IMAGE_PIXELS")
    assert time.perf_counter() - start < 5  # refused before decoding


def test_the_pixel_limit_lets_real_images_through(tmp_path):
    root = make_folder(tmp_path / "data", count=3)
    assert len(load_index("folder", root, class_names=["background", "a", "b"]).samples) == 3


@pytest.mark.parametrize("size", ["1048576", "8192x64", "64x4128"])
def test_input_sizes_are_capped(capsys, tmp_path, size):
    proc = in_process(capsys, "data", "info", "--format", "synthetic-steel", "--root", str(tmp_path),
                      "--option", "num_images=6", "--size", size)
    assert_one_line_error(proc, "limit of 4096", "DEFECTPRUNE_MAX_INPUT_SIZE")


def test_a_checkpoint_asking_for_a_huge_input_is_refused(tiny_checkpoint, tmp_path):
    import json
    import shutil

    from core.models.checkpoint import CheckpointSpecError, read_spec

    checkpoint, _ = tiny_checkpoint
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    spec = json.loads((target / "spec.json").read_text())
    (target / "spec.json").write_text(json.dumps({**spec, "input_size": [16384, 16384]}))
    with pytest.raises(CheckpointSpecError, match="limit of 4096"):
        read_spec(target)


# ---------------------------------------------------------------- 11-12. masks that would be read wrong
def test_a_colour_mask_for_a_value_coded_format_is_refused_naming_the_file(tmp_path):
    from core.data.base import MaskValueError
    from tests.test_data_formats import make_neu_seg

    root = make_neu_seg(tmp_path / "neu")
    bad = sorted((root / "ann_dir" / "train").glob("*.png"))[0]
    painted = np.zeros((40, 40, 3), np.uint8)
    painted[5:15, 5:15] = (255, 0, 0)  # a red inclusion: its first channel would read as background
    write_image(bad, painted)
    with pytest.raises(MaskValueError, match="painted in colour") as raised:
        load_index("neu-seg", root, strict=True)
    assert str(bad) in str(raised.value)
    assert str(bad) in [item["file"] for item in load_index("neu-seg", root).skipped]


def test_a_grey_mask_stored_as_rgb_still_reads(tmp_path):
    from tests.test_data_formats import make_neu_seg

    root = make_neu_seg(tmp_path / "neu")
    target = sorted((root / "ann_dir" / "train").glob("*.png"))[0]
    import cv2

    grey = cv2.imread(str(target), cv2.IMREAD_UNCHANGED)
    write_image(target, np.repeat(grey[..., None], 3, axis=2))
    assert target.name not in str(load_index("neu-seg", root).skipped)


def test_a_float_mask_is_refused_not_cast_to_zero(tmp_path):
    import cv2

    from core.data.base import MaskValueError

    root = make_folder(tmp_path / "data", count=3)
    (root / "masks" / "item_1.png").unlink()
    cv2.imwrite(str(root / "masks" / "item_1.tif"), np.full((32, 64), 0.7, np.float32))
    with pytest.raises(MaskValueError, match="float32"):
        load_index("folder", root, class_names=["background", "a", "b"], strict=True)


# ---------------------------------------------------------------- 12-14. named errors, one line each
@pytest.fixture
def tampered(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint with one file's text replaced."""
    import shutil

    checkpoint, _ = tiny_checkpoint

    def make(name: str, edit) -> Path:
        target = tmp_path / "ckpt"
        shutil.copytree(checkpoint, target)
        file = target / name
        file.write_text(edit(file.read_text()))
        return target

    return make


def _spec_with(**changes):
    import json

    return lambda text: json.dumps({**json.loads(text), **changes})


@pytest.mark.parametrize("name, edit, needle", [
    ("spec.json", _spec_with(arch=["unet"]), "architecture"),
    ("spec.json", _spec_with(dataset_root=7), "dataset_root"),
    ("spec.json", _spec_with(split_seed="zero"), "split_seed"),
    ("spec.json", _spec_with(format_version=99), "format_version"),
    ("spec.json", _spec_with(classes=[0, 1]), "classes"),
    ("spec.json", lambda text: "[" * 100_000 + "]" * 100_000, "nests deeper"),
    ("pruning_history.json", lambda text: '[["encoder.conv1", true, [Infinity]]]', "Infinity"),
    ("pruning_history.json", lambda text: f'[["encoder.conv1", true, [{10**400}]]]', "digits"),
])
def test_a_tampered_checkpoint_is_one_named_error(tampered, capsys, name, edit, needle):
    from core.models.checkpoint import CheckpointError, load_checkpoint

    target = tampered(name, edit)
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(target)
    assert_one_line_error(in_process(capsys, "profile", "--checkpoint", str(target)), needle)


def test_nan_weights_in_a_checkpoint_are_refused(tiny_checkpoint, tmp_path):
    import torch

    from core.models.checkpoint import CheckpointWeightsError, load_checkpoint, save_checkpoint

    checkpoint, _ = tiny_checkpoint
    loaded = load_checkpoint(checkpoint)
    with torch.no_grad():
        next(loaded.model.parameters()).fill_(float("nan"))
    target = save_checkpoint(tmp_path / "nan", loaded.model, loaded.spec)
    with pytest.raises(CheckpointWeightsError, match="NaN"):
        load_checkpoint(target)


def test_diverged_weights_are_never_saved(tmp_path):
    import torch

    from core.models.zoo import ModelSpec, build_model
    from core.train import TrainConfig, TrainingDivergedError, fit
    from core.data.dataset import SegmentationDataset
    from tests.test_train import write_tiny_neu_seg

    index = load_index("neu-seg", write_tiny_neu_seg(tmp_path / "neu", {"train": 1, "val": 1}))
    train = SegmentationDataset(index, "train", (64, 64), 1)
    spec = ModelSpec(classes=index.classes, in_channels=1, input_size=(64, 64))
    model = build_model(spec)

    class Overflow(torch.optim.SGD):  # what --lr 1e30 does to the weights, in one step
        def step(self, closure=None):
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.mul_(float("inf"))

    config = TrainConfig(epochs=1, batch_size=3, patience=None, max_steps_per_epoch=1, precision="fp32")
    import core.train.loop as train_module

    original = train_module.torch.optim.AdamW
    train_module.torch.optim.AdamW = Overflow
    try:
        with pytest.raises(TrainingDivergedError):
            fit(model, train, None, config)
    finally:
        train_module.torch.optim.AdamW = original


@pytest.mark.parametrize("args, needle", [
    (["data", "info", "--format", "folder", "--root", "ROOT", "--option", "class_names=5"], "class_names"),
    (["data", "info", "--format", "folder", "--root", "ROOT", "--option", "threshold=abc"], "threshold"),
    (["data", "info", "--format", "folder", "--root", "ROOT", "--option", "images=5"], "images"),
    (["data", "info", "--format", "folder", "--root", "ROOT", "--option", "class_names=[0,1]"], "class_names"),
    (["data", "info", "--format", "folder", "--root", "ROOT", "--option", "colours=5"], "colours"),
    (["data", "info", "--format", "mvtec", "--root", "ROOT", "--option", "category=[1]"], "category"),
    (["data", "info", "--format", "folder", "--root", "ROOT", "--option", "class_names=" + "[" * 5000], "--option"),
    (["data", "info", "--format", "synthetic-steel", "--seed", "-1"], "--seed"),
    (["data", "info", "--format", "synthetic-steel", "--seed", str(2**70)], "--seed"),
    (["train", "--format", "synthetic-steel", "--out", "OUT", "--weight-decay", "nan"], "--weight-decay"),
    (["train", "--format", "synthetic-steel", "--out", "OUT", "--lr", "inf"], "--lr"),
    (["prune", "--checkpoint", "OUT", "--out", "OUT", "--beta", "nan"], "--beta"),
    (["prune", "--checkpoint", "OUT", "--out", "OUT", "--tolerance", "nan"], "--tolerance"),
    (["jobs", "submit", "train", "--params", "[1]"], "JSON object"),
    (["jobs", "submit", "train", "--params", '{"epochs": NaN}'], "NaN"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.setenv("DEFECTPRUNE_WORKSPACE", str(tmp_path / "ws"))
    root = make_folder(tmp_path / "data", count=2)
    make_mvtec(tmp_path / "data", "bottle")
    args = [a.replace("ROOT", str(root)).replace("OUT", str(tmp_path / "out")) for a in args]
    assert_one_line_error(in_process(capsys, *args), needle)


@pytest.mark.parametrize("damage", [
    "{\"rounds\": [", "[1, 2]", "{\"base\": {}, \"rounds\": [{\"round\": 1}]}", "{\"rounds\": [], \"base\": Infinity}",
])
def test_a_damaged_rounds_json_is_one_named_error(tiny_checkpoint, tmp_path, capsys, damage):
    checkpoint, _ = tiny_checkpoint
    out = tmp_path / "run"
    out.mkdir()
    (out / "rounds.json").write_text(damage)
    proc = in_process(capsys, "prune", "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
                      "--finetune-epochs", "0", "--max-rounds", "1")
    assert_one_line_error(proc, "rounds.json is damaged")


# ---------------------------------------------------------------- 15. a dead worker's job is not "running"
def test_a_job_whose_worker_died_is_not_listed_as_running(tmp_path, monkeypatch, capsys):
    import time

    from core.runs.store import Store

    monkeypatch.setenv("DEFECTPRUNE_WORKSPACE", str(tmp_path))
    monkeypatch.setenv("DEFECTPRUNE_HEARTBEAT_TIMEOUT", "30")
    store = Store(tmp_path / "defectprune.sqlite")
    job = store.create_job("train", {})
    store.claim_next_job(worker_pid=999_999)
    store.heartbeat(job, progress=0.4, message="epoch 2/5", eta_seconds=24)
    with store.write() as conn:  # its worker was SIGKILLed a minute ago
        conn.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ?", (time.time() - 60, job))
    proc = in_process(capsys, "jobs", "list")
    assert proc.returncode == 0
    line = next(line for line in proc.stdout.splitlines() if line.split()[0] == str(job))
    assert "running" not in line and "ETA" not in line and "failed" in line
