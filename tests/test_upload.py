"""Datasets uploaded as zips: unpacked safely and read as the folder format."""

from __future__ import annotations

import io
import zipfile

import cv2
import numpy as np
import pytest

from core.data.registry import load_index
from core.data.upload import UploadError, extract_dataset_zip


def png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


def dataset_zip(prefix: str = "mydata/", extra: dict[str, bytes] | None = None) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(8):
            mask = np.zeros((32, 32), np.uint8)
            mask[4:10, 4:10] = 1 if i % 2 else 0
            archive.writestr(f"{prefix}images/{i:03d}.png", png(np.full((32, 32), 100 + i, np.uint8)))
            archive.writestr(f"{prefix}masks/{i:03d}.png", png(mask))
        archive.writestr(f"{prefix}README.txt", b"not an image")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    buffer.seek(0)
    return buffer


def test_a_zip_unpacks_into_the_folder_format(tmp_path):
    folder = extract_dataset_zip(dataset_zip(), tmp_path / "uploads", "mydata.zip")
    assert sorted(p.name for p in folder.iterdir()) == ["images", "masks"]
    index = load_index("folder", folder)
    assert len(index.samples) == 8 and index.classes == ["background", "defect"]
    assert extract_dataset_zip(dataset_zip(), tmp_path / "uploads", "mydata.zip") == folder  # same zip, same folder


@pytest.mark.parametrize("bad", ["../evil.png", "/abs/evil.png"])
def test_unsafe_paths_refuse_the_whole_zip(tmp_path, bad):
    with pytest.raises(UploadError, match="unsafe path"):
        extract_dataset_zip(dataset_zip(extra={bad: b"x"}), tmp_path / "uploads")
    assert not any((tmp_path / "uploads").glob("*")) if (tmp_path / "uploads").exists() else True


def test_limits_and_layout_are_checked(tmp_path):
    with pytest.raises(UploadError, match="more than the limit"):
        extract_dataset_zip(dataset_zip(), tmp_path / "u", max_unpacked_bytes=100)
    with pytest.raises(UploadError, match="images/ and masks/"):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("pictures/a.png", png(np.zeros((8, 8), np.uint8)))
        buffer.seek(0)
        extract_dataset_zip(buffer, tmp_path / "u")
    with pytest.raises(UploadError, match="not a readable zip"):
        extract_dataset_zip(io.BytesIO(b"definitely not a zip"), tmp_path / "u")
