"""``python -m core data info`` end to end, in a subprocess, on fixtures in the real layouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_data_formats import make_folder, make_kolektorsdd, make_magnetic_tile, snapshot

REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "core", "data", "info", *args], cwd=REPO, capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONWARNINGS": "default"},
    )


def test_info_json_on_magnetic_tile(tmp_path: Path) -> None:
    root = make_magnetic_tile(tmp_path / "mt", {"Blowhole": 3, "Fray": 2, "Free": 5})
    (root / "MT_Free" / "Imgs" / "desktop.ini").write_text("[.ShellClassInfo]")
    before = snapshot(root)
    result = run_cli("--format", "magnetic-tile", "--root", str(root), "--json")
    assert result.returncode == 0, result.stderr
    assert snapshot(root) == before
    assert result.stderr == ""  # skipped files are reported in the JSON, not as warnings
    payload = json.loads(result.stdout)
    assert {"format", "classes", "splits", "images_per_class", "skipped"} <= set(payload)
    assert payload["format"] == "magnetic-tile"
    assert payload["classes"] == ["background", "blowhole", "break", "crack", "fray", "uneven"]
    # slot centres (i + 0.5) / n against 0.70 / 0.85: blowhole 2/1/0, fray 1/1/0, free 3/1/1
    assert payload["splits"] == {"train": 6, "val": 3, "test": 1}
    assert payload["images_per_class"] == {
        "background": 10, "blowhole": 3, "break": 0, "crack": 0, "fray": 2, "uneven": 0}
    assert payload["skipped"] == [
        {"file": str(root / "MT_Free" / "Imgs" / "desktop.ini"), "reason": "not an image"}]
    assert payload["size"] == [256, 256]


def test_info_json_with_options_and_size(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "own", count=4)
    result = run_cli("--format", "folder", "--root", str(root), "--size", "64x128", "--seed", "1",
                     "--option", 'class_names=["background", "scratch", "dent"]', "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["classes"] == ["background", "scratch", "dent"]
    assert payload["images_per_class"] == {"background": 4, "scratch": 2, "dent": 2}
    assert sum(payload["splits"].values()) == 4
    assert payload["size"] == [64, 128]


def test_info_text_output(tmp_path: Path) -> None:
    root = make_kolektorsdd(tmp_path / "kolektor", folders=4, parts=2)
    result = run_cli("--format", "kolektorsdd", "--root", str(root))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"kolektorsdd at {root}: 8 images, input size 320x128"
    assert lines[1] == "classes: 0 background, 1 crack"
    assert lines[3] == "images per class: background 8, crack 2"


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_root_is_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = run_cli("--format", "neu-seg", "--root", str(missing), "--json")
    _assert_one_line_error(result, str(missing), "--root")


def test_bad_data_and_bad_option_are_one_line_errors(tmp_path: Path) -> None:
    root = make_magnetic_tile(tmp_path / "mt", {"Crack": 2})
    image = sorted(root.rglob("*.jpg"))[0]
    image.write_bytes(b"broken")
    _assert_one_line_error(run_cli("--format", "magnetic-tile", "--root", str(root)),
                           "1 file(s) could not be read", str(image))
    _assert_one_line_error(run_cli("--format", "magnetic-tile", "--root", str(root), "--option", "oops"),
                           "KEY=VALUE")
