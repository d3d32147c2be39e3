"""Writes that a crash, a kill or a full disk cannot leave half done.

Everything the engine stores (checkpoints, round records, predictions, ONNX files, the run
store's artifacts) is written to a temporary file beside its destination, flushed to disk,
then renamed over it: a reader sees the old file or the whole new one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from core.errors import DefectPruneError


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed over ``path`` when the block ends
    without an error, removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a binary handle of a temporary file, then put it at ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)
    return Path(path)


def json_default(value: Any) -> Any:
    """JSON for what engine records hold besides plain types: numpy and torch scalars and
    arrays (metrics), and paths."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} cannot be stored as JSON")


def write_json_atomic(path: str | Path, payload: Any, default: Callable[[Any], Any] = json_default) -> Path:
    text = json.dumps(payload, indent=2, default=default)
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


class OutputFolderError(DefectPruneError):
    """An output folder that a command must not write to (or cannot)."""


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output_folder(out: str | Path, what: str, is_own: Callable[[Path], bool],
                        protected: Sequence[tuple[str, str | Path]] = ()) -> Path:
    """Refuse, before any work is done, an output folder that is a file, overlaps a folder the
    command reads (``protected``: (what it is, path)), is not empty and not an earlier output
    of the same kind (``is_own``), or cannot be written (read-only, missing permissions); a
    check after hours of training would lose the run. Creates nothing: the probe file it
    writes to test writability is removed again."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out} is a file; give a folder for the {what}")
    resolved = out.resolve()
    for name, path in protected:
        if path and _overlaps(resolved, Path(path).expanduser().resolve()):
            raise OutputFolderError(f"--out {out} is (or contains, or lies inside) {name} {path}; "
                                    f"give a folder of its own for the {what}")
    if out.is_dir() and any(out.iterdir()) and not is_own(out):
        raise OutputFolderError(f"--out {out} is a non-empty folder that is not a {what}; "
                                "choose another folder or empty it")
    probe_in = resolved
    while not probe_in.exists():
        probe_in = probe_in.parent
    try:
        fd, name = tempfile.mkstemp(dir=probe_in, prefix=".defectprune-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise OutputFolderError(f"--out {out} cannot be written ({exc.strerror} in {probe_in}); "
                                "choose a writable folder") from None
    return out


def disk_full(exc: BaseException | None) -> tuple[bool, str | None]:
    """Whether ``exc``, or an exception it was raised from, says the disk is full (an
    ``OSError`` with ENOSPC, or a library's own error quoting it, e.g. safetensors'
    "I/O error: No space left on device (os error 28)"); and the file, when known."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True, exc.filename
        text = str(exc)
        if f"os error {errno.ENOSPC})" in text or os.strerror(errno.ENOSPC) in text:
            return True, None
        # as a traceback shows it: the context is not followed past ``raise ... from None``
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return False, None


def disk_full_message(exc: BaseException, where: str, advice: str) -> str | None:
    """The one line for a full disk (None when ``exc`` is not one): the same words wherever
    it happens, on the command line and in a job's error."""
    full, filename = disk_full(exc)
    if not full:
        return None
    at = f" while writing {filename}" if filename else ""
    return f"no space left on the device{at}; earlier results are intact: free space under {where} and {advice}"


def file_stamp(path: Path) -> tuple[int, int] | None:
    """The file's (modification time in ns, size), or None when it cannot be read: what a
    watcher compares to see that a file another process rewrites (atomically) has changed."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size
