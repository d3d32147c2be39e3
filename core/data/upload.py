"""A dataset uploaded as a zip: unpacked safely into the workspace, then read as the `folder`
format (``images/`` and ``masks/`` with matching stems, anywhere inside the zip).

Nothing in the zip is trusted: members with absolute paths or ``..`` are refused (they could
write outside the target), the uncompressed total is capped (a small zip can unpack to
gigabytes), only image files are extracted, and the unpacking happens in a temporary folder
that is renamed into place only when complete."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from core.data.base import IMAGE_SUFFIXES, DatasetError

MAX_UNPACKED_BYTES = 2 * 1024**3
MAX_FILES = 50_000


class UploadError(DatasetError):
    pass


def extract_dataset_zip(source: str | Path | BinaryIO, uploads_dir: Path, name: str = "upload",
                        max_unpacked_bytes: int = MAX_UNPACKED_BYTES, max_files: int = MAX_FILES) -> Path:
    """Unpack the images and masks of a zip into ``uploads_dir/<name>-<hash>`` and return the
    folder holding ``images/`` and ``masks/`` (ready for the `folder` format)."""
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UploadError(f"{name} is not a readable zip file ({exc}); upload a .zip of images/ and masks/") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        for member in members:
            path = PurePosixPath(member.filename)
            if path.is_absolute() or ".." in path.parts:
                raise UploadError(f"{name} holds an unsafe path {member.filename!r}; refusing the whole zip")
        images = [m for m in members if PurePosixPath(m.filename).suffix.lower() in IMAGE_SUFFIXES
                  and not PurePosixPath(m.filename).name.startswith(".")]
        if len(images) > max_files:
            raise UploadError(f"{name} holds {len(images)} images, more than the limit of {max_files}")
        total = sum(m.file_size for m in images)
        if total > max_unpacked_bytes:
            raise UploadError(f"{name} unpacks to {total / 2**20:.0f} MiB, more than the limit of "
                              f"{max_unpacked_bytes / 2**20:.0f} MiB")
        roots = {PurePosixPath(m.filename).parent.parent for m in images
                 if PurePosixPath(m.filename).parent.name == "images"}
        with_masks = [r for r in roots if any(PurePosixPath(m.filename).parent == r / "masks" for m in images)]
        if len(with_masks) != 1:
            raise UploadError(f"{name} must hold one folder with images/ and masks/ side by side "
                              f"(found {len(with_masks)}); zip the folder that contains both")
        base = with_masks[0]
        digest = hashlib.sha256("".join(f"{m.filename}:{m.CRC}" for m in images).encode()).hexdigest()[:10]
        target = uploads_dir / f"{Path(name).stem}-{digest}"
        if target.is_dir():
            return target
        uploads_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=uploads_dir, prefix=".unpacking-"))
        try:
            for member in images:
                relative = PurePosixPath(member.filename).relative_to(base)
                if relative.parts[0] not in ("images", "masks"):
                    continue
                out = staging.joinpath(*relative.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target
