"""A finished prune run's folder copied up to one of its rounds, for the loop to resume.

The prune loop resumes after the last finished round it finds in ``<out>/rounds.json``, and
with its target already reached it goes straight to its final recovery phase (`_finish`). So a
run's intermediate point gets the same recovery as its final one by resuming a copy of the
run's folder truncated to the rounds up to that point, with the point's reduction as the
target (`bench/recovery_check.py` does this for a whole run, `bench/compression.py` for every
target of a run). The rounds' checkpoint folders are hard-linked (copied where links are not
possible): the loop only reads them, and a save never writes into an existing folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ROUNDS_FILE = "rounds.json"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_matches(src: Path, dst: Path, upto_round: int) -> bool:
    """Whether ``dst`` is a copy of ``src``'s rounds up to ``upto_round`` (same starting model,
    same rounds): a copy made from an earlier version of the run is not."""
    try:
        source = json.loads((Path(src) / ROUNDS_FILE).read_text())
        copy = json.loads((Path(dst) / ROUNDS_FILE).read_text())
    except (OSError, ValueError):
        return False
    kept = [r for r in source["rounds"] if r["round"] <= upto_round]
    fingerprint = lambda state: state["base"].get("fingerprint")  # noqa: E731
    return (fingerprint(source) == fingerprint(copy) and len(copy["rounds"]) == len(kept)
            and all(a["macs"] == b["macs"] and a["params"] == b["params"] for a, b in zip(kept, copy["rounds"])))


def truncated_copy(src: str | Path, dst: str | Path, upto_round: int) -> Path:
    """``dst`` holding ``src``'s base record and its rounds 1..``upto_round`` (their checkpoint
    folders linked in, their paths pointing there), without the run's result or recovery.
    An existing copy of the same rounds is kept as it is (it may hold a finished or an
    interrupted recovery); one of other rounds is replaced. The copy is built beside ``dst``
    and renamed into place, so an interrupted copy is never mistaken for a finished one."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        if copy_matches(src, dst, upto_round):
            return dst
        shutil.rmtree(dst)
    saved = json.loads((src / ROUNDS_FILE).read_text())
    rounds = [dict(r) for r in saved["rounds"] if r["round"] <= upto_round]
    if len(rounds) != upto_round:
        raise ValueError(f"{src} has no round {upto_round} to copy up to")
    tmp = dst.parent / f".{dst.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for r in rounds:
        folder = Path(r["checkpoint"])
        if not folder.is_absolute() or not folder.is_dir():
            folder = src / folder.name
        shutil.copytree(folder, tmp / folder.name, copy_function=_link_or_copy)
        r["checkpoint"] = str(dst / folder.name)
    (tmp / ROUNDS_FILE).write_text(json.dumps({"base": saved["base"], "rounds": rounds}, default=float))
    os.replace(tmp, dst)
    return dst
