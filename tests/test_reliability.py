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
from tests.test_data_formats import make_folder, make_mvtec, write_image


def in_process(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """`core.cli.main` in this process: its exit code and what it printed."""
    from core.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


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
    root = make_folder(tmp_path / "data" / "sub")
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
