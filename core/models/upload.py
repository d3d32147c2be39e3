"""A model file uploaded to the dashboard, kept under the workspace for the import job: a
state dict as it came, or the one smp ``save_pretrained`` folder of a zip, unpacked as safely
as a dataset zip (core/data/upload.py)."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from core.atomic import write_atomic
from core.data.upload import MAX_UNPACKED_BYTES
from core.errors import DefectPruneError
from core.models.importer import SMP_CONFIG, SMP_WEIGHTS, STATE_SUFFIXES


class ModelUploadError(DefectPruneError):
    """An uploaded model file or zip that cannot be kept for an import."""


def save_model_upload(name: str | None, data: bytes, folder: Path, max_bytes: int) -> Path:
    """An uploaded state dict (``.safetensors``, ``.pt``, ``.pth`` ...) kept as
    ``folder/<name>-<hash>/weights<suffix>``, or an uploaded zip of an smp ``save_pretrained``
    folder unpacked into ``folder/<name>-<hash>/``; the path the import reads."""
    name = Path(name or "model").name
    suffix = Path(name).suffix.lower()
    if suffix != ".zip" and suffix not in STATE_SUFFIXES:
        raise ModelUploadError(f"{name}: upload a state dict ({', '.join(STATE_SUFFIXES)}) or a .zip of an smp "
                               f"save_pretrained folder, not {suffix or 'a file without a suffix'}")
    if len(data) > max_bytes:
        raise ModelUploadError(f"{name} is {len(data) / 2**20:.0f} MiB, more than the limit of "
                               f"{max_bytes / 2**20:.0f} MiB (server.maxUploadSize)")
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem).strip("._")[:60] or "model"
    target = folder / f"{stem}-{hashlib.sha256(data).hexdigest()[:12]}"
    if suffix == ".zip":
        return extract_smp_zip(data, target, name)
    file = target / f"weights{suffix}"
    if not file.is_file():
        target.mkdir(parents=True, exist_ok=True)
        write_atomic(file, lambda handle: handle.write(data))
    return file


def extract_smp_zip(data: bytes, target: Path, name: str, max_unpacked_bytes: int = MAX_UNPACKED_BYTES) -> Path:
    """Unpack the one smp ``save_pretrained`` folder of a zip (its ``config.json`` and weights
    file, nothing else) into ``target``. As a dataset zip (core/data/upload.py): members with an
    absolute path or ``..`` refuse the whole zip, the unpacked size is capped, and the files are
    unpacked in a temporary folder renamed into place only when complete."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelUploadError(f"{name} is not a readable zip file ({exc}); zip the folder smp's "
                               "model.save_pretrained(folder) wrote") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        for member in members:
            path = PurePosixPath(member.filename)
            if path.is_absolute() or ".." in path.parts or "\\" in member.filename:
                raise ModelUploadError(f"{name} holds an unsafe path {member.filename!r}; refusing the whole zip")
        visible = [m for m in members if not any(p.startswith((".", "__MACOSX")) for p in PurePosixPath(m.filename).parts)]
        configs = [m for m in visible if PurePosixPath(m.filename).name == SMP_CONFIG]
        if len(configs) != 1:
            raise ModelUploadError(f"{name} must hold one smp save_pretrained folder ({SMP_CONFIG} beside "
                                   f"{' or '.join(SMP_WEIGHTS)}); found {len(configs)} {SMP_CONFIG}")
        base = PurePosixPath(configs[0].filename).parent
        by_path = {PurePosixPath(m.filename): m for m in visible}
        weights = next((by_path[base / w] for w in SMP_WEIGHTS if base / w in by_path), None)
        if weights is None:
            raise ModelUploadError(f"{name} has {SMP_CONFIG} but no {' or '.join(SMP_WEIGHTS)} beside it")
        picked = [configs[0], weights]
        total = sum(m.file_size for m in picked)
        if total > max_unpacked_bytes:
            raise ModelUploadError(f"{name} unpacks to {total / 2**20:.0f} MiB, more than the limit of "
                                   f"{max_unpacked_bytes / 2**20:.0f} MiB")
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpacking-"))
        try:
            for member in picked:  # a member reads at most its declared size
                with archive.open(member) as src, open(staging / PurePosixPath(member.filename).name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            staging.rename(target)
        except (zipfile.BadZipFile, OSError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ModelUploadError(f"{name} could not be unpacked ({exc})") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target
