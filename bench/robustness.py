"""The robustness probe table of issue 14: bad datasets, tampered checkpoints, bad arguments,
path tricks, resource bombs, damaged run records, each run through the command line
(`core.cli.main`, in this process) or the engine call a user's action reaches, and judged.

    .venv/bin/python bench/robustness.py [--out bench/results/robustness.md]

Every probe states what must happen (a named one-line error with exit 2, a warning, the
data read as its format says) and what did; a probe fails on a traceback (an exception that is
not a `DefectPruneError`), a wrong exit code, more than one line on stderr, or a file changed
outside the folder it was asked to write. Everything happens in a temporary folder; no probe
trains (outputs are refused before that), nothing is forked, nothing reaches a network. Each
probe runs under a 60 s alarm. Prints the table and writes it with the counts to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import scipy.io  # noqa: E402

PROBE_SECONDS = 60


@dataclass
class Probe:
    area: str
    case: str
    expected: str
    run: Callable[[], tuple[bool, str]]  # (ok, observed)


# ---------------------------------------------------------------- fixtures on disk
def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(path.suffix, array)
    assert ok
    data.tofile(str(path))
    return path


def make_folder(root: Path, count: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        write_image(root / "images" / f"item_{i}.png", rng.integers(60, 200, (32, 64), dtype=np.uint8))
        mask = np.zeros((32, 64), np.uint8)
        mask[4:12, 4:20] = 1 + i % 2
        write_image(root / "masks" / f"item_{i}.png", mask)
    return root


def make_neu(root: Path) -> Path:
    rng = np.random.default_rng(1)
    number = 0
    for split, count in (("train", 3), ("val", 1), ("test", 1)):
        for _ in range(count):
            for cls in (1, 2, 3):
                number += 1
                write_image(root / "img_dir" / split / f"{number:06d}.jpg", rng.normal(128, 8, (64, 64)).clip(0, 255).astype(np.uint8))
                mask = np.zeros((64, 64), np.uint8)
                mask[20:40, 20:40] = cls
                write_image(root / "ann_dir" / split / f"{number:06d}.png", mask)
    return root


def make_mvtec(root: Path) -> Path:
    rng = np.random.default_rng(2)
    for part, defect, count in (("train", "good", 2), ("test", "good", 2), ("test", "crack", 3)):
        for i in range(count):
            write_image(root / "bottle" / part / defect / f"{i:03d}.png", rng.integers(60, 200, (64, 64), dtype=np.uint8))
            if defect != "good":
                mask = np.zeros((64, 64), np.uint8)
                mask[10:30, 10:30] = 255
                write_image(root / "bottle" / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return root


def make_crackforest(root: Path, enclosed: bool = True) -> Path:
    rng = np.random.default_rng(3)
    for i in range(1, 7):
        write_image(root / "image" / f"{i:03d}.jpg", rng.integers(60, 200, (32, 48, 3), dtype=np.uint8))
        seg = np.ones((32, 48), np.uint8)
        seg[10:12, 5:40] = 2
        if enclosed and i in (2, 3):
            seg[20:30, 0:10] = 1 + i  # 3 and 4: areas enclosed by cracks
        struct = np.empty((1, 1), dtype=[("Segmentation", object), ("Boundaries", object)])
        struct[0, 0]["Segmentation"] = seg
        struct[0, 0]["Boundaries"] = (seg == 2).astype(np.uint8)
        (root / "groundTruth").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(str(root / "groundTruth" / f"{i:03d}.mat"), {"groundTruth": struct})
    return root


def tree(folder: Path) -> dict[str, tuple[int, float]]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- running and judging
def cli(*args: str) -> tuple[int, str, str]:
    """`core.cli.main` in this process: exit code, stdout, stderr; an exception that escapes
    is a traceback (returned as exit 1 with the traceback on stderr)."""
    from core.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException:  # noqa: BLE001 - what a user would see as a traceback
            traceback.print_exc(file=err)
            code = 1
    return int(code or 0), out.getvalue(), err.getvalue()


def one_line_error(args: list[str], *needles: str, untouched: tuple[Path, ...] = ()) -> Callable[[], tuple[bool, str]]:
    def run() -> tuple[bool, str]:
        before = {folder: tree(folder) for folder in untouched}
        code, _, err = cli(*args)
        lines = [line for line in err.splitlines() if line.strip()]
        first = lines[0] if lines else "(nothing on stderr)"
        problems = []
        if "Traceback" in err:
            problems.append("traceback: " + lines[-1][:120])
        if code != 2:
            problems.append(f"exit {code}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines on stderr")
        missing = [n for n in needles if n not in err]
        if missing:
            problems.append(f"message lacks {missing}")
        changed = [str(folder) for folder in untouched if tree(folder) != before[folder]]
        if changed:
            problems.append(f"changed {changed}")
        observed = f"exit {code}: {first[:150]}" + (f" [{'; '.join(problems)}]" if problems else "")
        return not problems, observed
    return run


def engine(call: Callable[[], object], check: Callable[[object], tuple[bool, str]] | None = None,
           raises: str | None = None, needle: str = "") -> Callable[[], tuple[bool, str]]:
    """An engine call: it must raise the named error ``raises`` (message holding ``needle``),
    or return a value ``check`` accepts."""
    from core.errors import DefectPruneError

    def run() -> tuple[bool, str]:
        try:
            value = call()
        except DefectPruneError as exc:
            name = type(exc).__name__
            ok = raises is not None and (raises in [c.__name__ for c in type(exc).__mro__]) and needle in str(exc)
            return ok, f"{name}: {str(exc)[:150]}"
        except Exception as exc:  # noqa: BLE001
            return False, f"traceback: {type(exc).__name__}: {str(exc)[:120]}"
        if raises is not None:
            return False, f"returned {str(value)[:100]} instead of raising {raises}"
        return check(value) if check else (True, "ok")
    return run


# ---------------------------------------------------------------- the table
def probes(tmp: Path) -> list[Probe]:
    from core.data.registry import load_index
    from core.models.checkpoint import load_checkpoint, save_checkpoint
    from core.models.zoo import ModelSpec, build_model
    from core.runs.store import Store

    data = tmp / "data"
    folder = make_folder(data / "own")
    private = make_folder(tmp / "private")
    (folder / "link").symlink_to(private / "images")
    neu = make_neu(data / "neu")
    mvtec = make_mvtec(data / "mvtec")
    make_mvtec(tmp / "elsewhere")
    crack = make_crackforest(data / "crackforest")
    spec = ModelSpec(classes=["background", "inclusion", "patches", "scratches"], in_channels=1,
                     input_size=(64, 64), dataset_format="neu-seg", dataset_root=str(neu))
    checkpoint = save_checkpoint(tmp / "models" / "unet", build_model(spec), spec)

    def tampered(name: str, edit: Callable[[str], str]) -> Path:
        target = tmp / "tampered" / f"{name}-{len(list((tmp / 'tampered').glob('*'))) if (tmp / 'tampered').exists() else 0}"
        shutil.copytree(checkpoint, target)
        file = target / name.split("-")[0]
        file.write_text(edit(file.read_text()))
        return target

    def spec_with(**changes):
        return lambda text: json.dumps({**json.loads(text), **changes})

    out = str(tmp / "out")
    table: list[Probe] = []
    add = lambda area, case, expected, run: table.append(Probe(area, case, expected, run))  # noqa: E731
    info = ["data", "info", "--format"]
    options = ["--option", 'class_names=["background","a","b"]']

    # path confinement through format options (item 1)
    for option, value in (("images", str(private / "images")), ("masks", "../../private/masks"),
                          ("images", "link"), ("masks", "images/../../../private/masks")):
        add("paths", f"folder option {option}={value}", "error: outside the dataset folder; nothing listed",
            one_line_error([*info, "folder", "--root", str(folder), *options, "--option", f"{option}={value}"],
                           "outside the dataset folder"))
    for category in ("../../elsewhere/bottle", str(tmp / "elsewhere" / "bottle"), "bottle/../.."):
        add("paths", f"mvtec category={category}", "error naming the category",
            one_line_error([*info, "mvtec", "--root", str(mvtec), "--option", f"category={category}"], "category"))
    add("paths", "dashboard root outside the data roots", "PathOutsideDataRootsError",
        engine(lambda: __import__("core.config", fromlist=["x"]).confine_to_data_roots(private, roots=[data]),
               raises="PathOutsideDataRootsError"))

    # nothing earlier overwritten (items 2-4)
    def reused_id() -> tuple[bool, str]:
        store = Store(tmp / "ws" / "defectprune.sqlite")
        first = store.create_job("train", {})
        (store.job_dir(first) / "checkpoint").mkdir(parents=True)
        (store.job_dir(first) / "checkpoint" / "spec.json").write_text("{}")
        store.close()
        for file in (tmp / "ws").glob("defectprune.sqlite*"):
            file.rename(file.with_name("aside-" + file.name))
        again = Store(tmp / "ws" / "defectprune.sqlite").create_job("train", {})
        ok = again != first and (store.job_dir(first) / "checkpoint" / "spec.json").read_text() == "{}"
        return ok, f"first job {first}, after moving the store aside: job {again}"
    add("no overwrite", "store moved aside, new job", "a fresh id and folder; job 1's files intact", reused_id)
    for name, target in (("the source checkpoint", checkpoint), ("a dataset folder", neu),
                         ("a folder of notes", private)):
        add("no overwrite", f"prune --out = {name}", "error before any work; folder unchanged",
            one_line_error(["prune", "--checkpoint", str(checkpoint), "--out", str(target), "--device", "cpu"],
                           "--out", untouched=(checkpoint, neu, private)))
    prune_run = tmp / "mixed"
    shutil.copytree(checkpoint, prune_run)
    (prune_run / "round_01").mkdir()
    (prune_run / "rounds.json").write_text("{}")
    add("no overwrite", "train --out = a checkpoint holding a prune run", "error; round_01/ and rounds.json kept",
        one_line_error(["train", "--format", "neu-seg", "--root", str(neu), "--out", str(prune_run), "--epochs", "1"],
                       "--out", untouched=(prune_run,)))
    for where in ("/proc/defectprune-out", str(checkpoint / "spec.json" / "sub")):
        add("no overwrite", f"train --out {where}", "error before the first step",
            one_line_error(["train", "--format", "neu-seg", "--root", str(tmp / "absent"), "--out", where], "--out"))

    # full disk and the run store's advice (items 5-6)
    def full_disk() -> tuple[bool, str]:
        import core.commands.data as data_command
        from safetensors import SafetensorError

        original = data_command.run_info

        def full(_args):
            raise SafetensorError("I/O error: No space left on device (os error 28)")

        data_command.run_info = full
        try:
            return one_line_error([*info, "synthetic-steel"], "no space left")()
        finally:
            data_command.run_info = original
    add("disk", "a full disk while saving (SafetensorError)", "error: no space left ..., exit 2", full_disk)

    def store_advice(message: str, moving: bool) -> Callable[[], tuple[bool, str]]:
        def run() -> tuple[bool, str]:
            import sqlite3

            from core.runs.store import StoreError

            store = Store(tmp / "advice" / "defectprune.sqlite")
            error = sqlite3.DatabaseError(message) if moving else sqlite3.OperationalError(message)
            text = store.problem(error)
            store.close()
            ok = ("move it aside" in text) is moving and isinstance(StoreError(text), Exception)
            return ok, text[:150]
        return run
    add("disk", "run store read-only", "says read-only, no 'move it aside'", store_advice("attempt to write a readonly database", False))
    add("disk", "run store on a full disk", "says no space, no 'move it aside'", store_advice("database or disk is full", False))
    add("disk", "run store damaged", "says damaged: move it aside", store_advice("file is not a database", True))
    corrupt_ws = tmp / "corrupt-ws"
    corrupt_ws.mkdir()
    (corrupt_ws / "defectprune.sqlite").write_bytes(b"not sqlite at all" * 100)
    add("disk", "jobs list on a corrupt store file", "error; the file left untouched",
        one_line_error(["jobs", "--db", str(corrupt_ws / "defectprune.sqlite"), "list"], "move it aside",
                       untouched=(corrupt_ws,)))

    # values a format does not define (item 7) and masks read wrong (11-12)
    def crackforest_reads() -> tuple[bool, str]:
        index = load_index("crackforest", crack)
        named = " ".join(index.warnings)
        ok = len(index.samples) == 6 and "002.mat" in named and "003.mat" in named
        return ok, f"{len(index.samples)} images; warning: {named[:110]}"
    add("values", "CrackForest with Segmentation 3/4", "loads; 3/4 read as background; warning names the files",
        crackforest_reads)
    bad_neu = make_neu(tmp / "bad-neu")
    bad_mask = sorted((bad_neu / "ann_dir" / "train").glob("*.png"))[0]
    write_image(bad_mask, np.full((64, 64), 7, np.uint8))
    add("values", "NEU-Seg mask with value 7", "that file skipped with a warning",
        engine(lambda: load_index("neu-seg", bad_neu),
               check=lambda index: (bad_mask.name in str(index.skipped) and len(index.samples) == 14,
                                    f"{len(index.samples)} images, skipped {len(index.skipped)}")))
    add("values", "NEU-Seg mask with value 7, --strict", "error naming the file",
        one_line_error([*info, "neu-seg", "--root", str(bad_neu), "--strict"], bad_mask.name))
    colour_neu = make_neu(tmp / "colour-neu")
    colour_mask = sorted((colour_neu / "ann_dir" / "train").glob("*.png"))[0]
    painted = np.zeros((64, 64, 3), np.uint8)
    painted[20:40, 20:40] = (0, 0, 255)  # red in OpenCV's BGR
    write_image(colour_mask, painted)
    add("values", "NEU-Seg mask painted red, --strict", "error: painted in colour, naming the file",
        one_line_error([*info, "neu-seg", "--root", str(colour_neu), "--strict"], "painted in colour", colour_mask.name))
    float_folder = make_folder(tmp / "float")
    (float_folder / "masks" / "item_1.png").unlink()
    cv2.imwrite(str(float_folder / "masks" / "item_1.tif"), np.full((32, 64), 0.7, np.float32))
    add("values", "float TIFF mask (0.7), --strict", "error: float32 values",
        one_line_error([*info, "folder", "--root", str(float_folder), *options, "--strict"], "float32"))
    add("values", "class_names=[0,1]", "error before training: class names must be text",
        one_line_error([*info, "folder", "--root", str(folder), "--option", "class_names=[0,1]"], "class_names"))

    # resource caps (8-10)
    for command in (["train", "--format", "synthetic-steel", "--out", out], ["evaluate", "--checkpoint", str(checkpoint)]):
        add("caps", f"{command[0]} --workers 1000000", "error: more than the limit; nothing forked",
            one_line_error([*command, "--workers", "1000000"], "more than the limit"))

    def job_workers() -> tuple[bool, str]:
        from core.runs.kinds import job_request
        from core.services.request import ParameterError

        try:
            job_request("train", {"format": "synthetic-steel", "workers": 1_000_000})
        except ParameterError as exc:
            return "more than the limit" in str(exc), str(exc)[:150]
        return False, "accepted"
    add("caps", "jobs submit train workers=1000000", "refused at submission", job_workers)
    bomb = make_folder(tmp / "bomb")
    ok, encoded = cv2.imencode(".png", np.zeros((20000, 20000), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    encoded.tofile(str(bomb / "images" / "item_2.png"))

    def bomb_probe() -> tuple[bool, str]:
        start = time.perf_counter()
        ok, observed = one_line_error([*info, "folder", "--root", str(bomb), *options], "item_2.png", "20000x20000")()
        seconds = time.perf_counter() - start
        return ok and seconds < 5, f"{observed} ({seconds:.2f} s, file {encoded.size // 1024} KB)"
    add("caps", "20000x20000 PNG decompression bomb", "error from the header, naming the file, in well under 5 s",
        bomb_probe)
    add("caps", "--size 1048576", "error: limit of 4096",
        one_line_error([*info, "synthetic-steel", "--root", str(tmp / "synthetic"), "--option", "num_images=6",
                        "--size", "1048576"], "limit of 4096"))
    add("caps", "checkpoint input_size 16384x16384", "error: limit of 4096",
        one_line_error(["profile", "--checkpoint", str(tampered("spec.json", spec_with(input_size=[16384, 16384])))],
                       "limit of 4096"))

    # tampered checkpoints and damaged records (12-14)
    for label, edit, needle in (
        ('arch ["unet"]', spec_with(arch=["unet"]), "architecture"),
        ("dataset_root 7", spec_with(dataset_root=7), "dataset_root"),
        ('split_seed "zero"', spec_with(split_seed="zero"), "split_seed"),
        ("format_version 99", spec_with(format_version=99), "format_version"),
        ("100k-deep JSON", lambda text: "[" * 100_000 + "]" * 100_000, "nests deeper"),
    ):
        add("checkpoint", f"spec.json {label}", "error naming the field",
            one_line_error(["profile", "--checkpoint", str(tampered("spec.json", edit))], needle))
    for label, text, needle in (("Infinity", '[["encoder.conv1", true, [Infinity]]]', "Infinity"),
                                ("10**400", f'[["encoder.conv1", true, [{10**400}]]]', "digits")):
        add("checkpoint", f"pruning_history.json with {label}", "error naming the file",
            one_line_error(["profile", "--checkpoint", str(tampered("pruning_history.json", lambda _t, t=text: t))], needle))

    def nan_weights() -> Path:
        import torch

        loaded = load_checkpoint(checkpoint)
        with torch.no_grad():
            next(loaded.model.parameters()).fill_(float("nan"))
        return save_checkpoint(tmp / "nan-weights", loaded.model, loaded.spec)
    nan_checkpoint = nan_weights()
    add("checkpoint", "NaN weights", "error: NaN or infinite values",
        one_line_error(["profile", "--checkpoint", str(nan_checkpoint)], "NaN"))
    for number, damage in enumerate(('{"rounds": [', "[1, 2]", '{"base": {}, "rounds": [{"round": 1}]}')):
        run_dir = tmp / f"damaged-{number}"
        run_dir.mkdir()
        (run_dir / "rounds.json").write_text(damage)
        add("records", f"rounds.json {damage[:30]}", "error: rounds.json is damaged",
            one_line_error(["prune", "--checkpoint", str(checkpoint), "--out", str(run_dir), "--device", "cpu"],
                           "rounds.json is damaged", untouched=(run_dir,)))

    # one-line errors for arguments (14)
    for args, needle in (
        ([*info, "folder", "--root", str(folder), "--option", "class_names=5"], "class_names"),
        ([*info, "folder", "--root", str(folder), "--option", "threshold=abc"], "threshold"),
        ([*info, "folder", "--root", str(folder), "--option", "images=5"], "images"),
        ([*info, "synthetic-steel", "--seed", "-1"], "--seed"),
        ([*info, "synthetic-steel", "--seed", str(2**70)], "--seed"),
        (["train", "--format", "synthetic-steel", "--out", out, "--weight-decay", "nan"], "--weight-decay"),
        (["train", "--format", "synthetic-steel", "--out", out, "--lr", "1e400"], "--lr"),
        (["prune", "--checkpoint", str(checkpoint), "--out", out, "--beta", "nan"], "--beta"),
        (["prune", "--checkpoint", str(checkpoint), "--out", out, "--tolerance", "nan"], "--tolerance"),
        (["jobs", "--db", str(tmp / "ws2" / "defectprune.sqlite"), "submit", "train", "--params", "[1]"], "JSON object"),
        (["jobs", "--db", str(tmp / "ws2" / "defectprune.sqlite"), "submit", "train", "--params", '{"epochs": Infinity}'],
         "Infinity"),
    ):
        add("arguments", " ".join([args[0], *args[-2:]])[:60], "one error line, exit 2", one_line_error(args, needle))

    # a dead worker's job (15)
    def stale_job() -> tuple[bool, str]:
        os.environ["DEFECTPRUNE_HEARTBEAT_TIMEOUT"] = "30"
        store = Store(tmp / "ws3" / "defectprune.sqlite")
        job = store.create_job("train", {})
        store.claim_next_job(worker_pid=999_999)
        store.heartbeat(job, progress=0.4, message="epoch 2/5", eta_seconds=24)
        with store.write() as conn:
            conn.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ?", (time.time() - 60, job))
        code, stdout, err = cli("jobs", "--db", str(store.path), "list")
        line = next((line for line in stdout.splitlines() if line.split() and line.split()[0] == str(job)), stdout)
        return code == 0 and "running" not in line and "ETA" not in line, line.strip()[:150]
    add("jobs", "job whose worker was SIGKILLed, jobs list", "not 'running, ETA': marked failed", stale_job)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "robustness.md")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="defectprune-robustness-") as name:
        tmp = Path(name)
        os.environ["DEFECTPRUNE_WORKSPACE"] = str(tmp / "workspace")
        os.environ["DEFECTPRUNE_DATA_ROOTS"] = str(tmp / "data")
        outside_before = tree(REPO / "workspace")

        def alarm(_signum, _frame):
            raise TimeoutError(f"probe ran past {PROBE_SECONDS} s")

        signal.signal(signal.SIGALRM, alarm)
        for probe in probes(tmp):
            signal.alarm(PROBE_SECONDS)
            try:
                ok, observed = probe.run()
            except Exception as exc:  # noqa: BLE001 - the probe itself broke: a failure, shown
                ok, observed = False, f"probe error: {type(exc).__name__}: {str(exc)[:120]}"
            finally:
                signal.alarm(0)
            rows.append((probe.area, probe.case, probe.expected, observed, "ok" if ok else "FAIL"))
            print(f"{'ok  ' if ok else 'FAIL'} {probe.area}: {probe.case}: {observed}", flush=True)
        repo_untouched = tree(REPO / "workspace") == outside_before
    seconds = time.perf_counter() - start
    passed = sum(row[-1] == "ok" for row in rows)

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "# Robustness probes (issue 14)", "",
        f"Command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; {seconds:.1f} s in all.  ",
        f"**{passed} of {len(rows)} probes ok, {len(rows) - passed} failed**; the repository's workspace "
        f"{'untouched' if repo_untouched else 'CHANGED'} (every probe ran in a temporary folder).", "",
        "| area | case | expected | observed | verdict |", "|---|---|---|---|---|",
        *[f"| {' | '.join(cell(c) for c in row)} |" for row in rows], "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"{passed}/{len(rows)} ok in {seconds:.1f} s; wrote {args.out}")
    return 0 if passed == len(rows) and repo_untouched else 1


if __name__ == "__main__":
    sys.exit(main())
