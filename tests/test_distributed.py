"""Data-parallel train and prune under torchrun (core.train.distributed): two gloo processes on
a tiny synthetic set, as a user launches them (`python -m torch.distributed.run -m core ...`).

The distributed run's validation metrics must equal a single-process evaluation of the model
it saved, a killed rank must fail the command without a half-written round, and the same
command run again resumes. The sharding and sampling arithmetic is checked in-process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.train import distributed

REPO = Path(__file__).resolve().parents[1]
DATA_OPTIONS = ["--option", "num_images=24", "--option", "image_size=32", "--size", "32"]
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(free_port()), "-m", "core", *args]


def child_env() -> dict[str, str]:
    # one thread per rank; a hung peer fails the run within a minute rather than the default half hour
    return dict(os.environ, OMP_NUM_THREADS="1", DEFECTPRUNE_DIST_TIMEOUT="60")


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*args), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=child_env())


def single_process_val(checkpoint: Path, root: Path) -> dict:
    """The checkpoint evaluated on the val split in this one process (`python -m core evaluate`'s service)."""
    from core.services.evaluate import EvaluateRequest, run_evaluate

    request = EvaluateRequest(checkpoint=str(checkpoint), split="val", root=str(root), device="cpu",
                              option={"num_images": 24, "image_size": 32})
    return run_evaluate(request).report


def assert_same_metrics(distributed_val: dict, single: dict) -> None:
    for key in ("defect_miou", "background_iou", "dice", "pixel_accuracy", "pixels", "per_class_iou"):
        assert distributed_val[key] == single[key], key  # the same confusion matrix: equal, not close


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("synthetic")
    out = tmp_path_factory.mktemp("ddp") / "unet"
    # batch 3: the 4 val images are one batch of 3 on rank 0 and one of 1 on rank 1
    proc = torchrun("train", "--format", "synthetic-steel", "--root", str(root), *DATA_OPTIONS, "--epochs", "2",
                    "--batch-size", "3", "--max-steps-per-epoch", "2", "--threads", "1", "--device", "cpu",
                    "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, out, json.loads(proc.stdout)


def prune_args(checkpoint: Path, root: Path, out: Path, target: str) -> list[str]:
    return ["prune", "--checkpoint", str(checkpoint), "--root", str(root), *DATA_OPTIONS, "--method", "collaborative",
            "--target-macs", target, "--step", "0.3", "--max-rounds", "2", "--finetune-epochs", "1",
            "--batch-size", "3", "--scoring-steps", "3", "--calibration-images", "6", "--no-tolerance-stop",
            "--threads", "1", "--device", "cpu", "--out", str(out)]


def test_train_under_two_gloo_ranks_saves_once_and_reports_single_process_metrics(trained):
    from core.models.checkpoint import load_checkpoint

    root, out, payload = trained
    assert payload["epochs_run"] == 2 and payload["device"] == "cpu"
    history = json.loads((out / "training_history.json").read_text())
    assert history["data_parallel"] == {"world_size": 2, "backend": "gloo", "batch_size_per_process": 3,
                                        "effective_batch_size": 6}
    assert len(history["history"]) == 2
    loaded = load_checkpoint(out)  # reloads in one process
    assert sum(p.numel() for p in loaded.model.parameters()) > 0
    assert_same_metrics(payload["val"], single_process_val(out, root))


def test_two_round_prune_under_two_gloo_ranks_matches_single_process_evaluation(trained, tmp_path):
    root, checkpoint, _ = trained
    out = tmp_path / "pruned"
    proc = torchrun(*prune_args(checkpoint, root, out, "0.5"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout)  # one report (rank 0's), not one per rank
    assert [r["round"] for r in payload["rounds"]] == [1, 2]
    state = json.loads((out / "rounds.json").read_text())
    for record in state["rounds"]:
        assert_same_metrics(record["val"], single_process_val(Path(record["checkpoint"]), root))
    assert state["rounds"][1]["macs"] < state["rounds"][0]["macs"] < state["base"]["macs"]
    assert payload["result"]["checkpoint"] == str(out / "round_02")


def _ranks_of(launcher: int) -> dict[int, int]:
    """RANK -> pid of the worker processes torchrun (pid ``launcher``) started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent != launcher:
                continue
            env = dict(item.split("=", 1) for item in (entry / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in item)
        except (OSError, IndexError, ValueError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def _rounds_recorded(out: Path) -> int:
    try:
        return len(json.loads((out / "rounds.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


def test_a_killed_rank_fails_the_run_cleanly_and_the_same_command_resumes(trained, tmp_path):
    from core.models.checkpoint import load_checkpoint
    from core.pruning.loop import read_state

    root, checkpoint, _ = trained
    out = tmp_path / "killed"
    args = prune_args(checkpoint, root, out, "0.5")
    launcher = subprocess.Popen(torchrun_command(*args), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while launcher.poll() is None and _rounds_recorded(out) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert launcher.poll() is None, "the run ended before rank 1 could be killed in round 2"
        os.kill(_ranks_of(launcher.pid)[1], signal.SIGKILL)  # rank 1 dies in round 2
        _, stderr = launcher.communicate(timeout=TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert "rank      : 1" in stderr and "SIGKILL" in stderr  # torchrun names the rank that died
    state = read_state(out)  # a whole record: round 1 only, its checkpoint complete
    assert [r["round"] for r in state["rounds"]] == [1]
    assert not (out / "round_02").exists()
    load_checkpoint(state["rounds"][0]["checkpoint"])
    first = state["rounds"][0]

    proc = torchrun(*args, "--json")  # the same command again: resumes after round 1
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = read_state(out)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]
    assert resumed["rounds"][0] == first  # round 1 was not redone
    assert_same_metrics(resumed["rounds"][1]["val"], single_process_val(out / "round_02", root))


# ---------------------------------------------------------------- the arithmetic, in one process
def test_evaluation_rows_deal_whole_batches_without_padding():
    for length, batch, world in ((10, 3, 2), (4, 3, 2), (1, 8, 3), (17, 4, 4), (0, 2, 2)):
        shards = [distributed.evaluation_rows(range(length), batch, world, r) for r in range(world)]
        assert sorted(i for shard in shards for i in shard) == list(range(length))  # each row once
        single_batches = [list(range(s, min(s + batch, length))) for s in range(0, length, batch)]
        for r, shard in enumerate(shards):  # a rank's batches are the single process's batches r, r + world, ...
            assert [shard[i:i + batch] for i in range(0, len(shard), batch)] == single_batches[r::world]


@pytest.mark.parametrize("weighted", [False, True])
def test_sharded_draw_splits_one_seeded_draw_per_epoch(weighted):
    weights = np.linspace(0.5, 2.0, 7) if weighted else None
    samplers = [distributed.ShardedDrawSampler(7, seed=3, weights=weights, replicas=2, rank_=r) for r in range(2)]
    first = [list(s) for s in samplers]
    assert [len(s) for s in samplers] == [4, 4] and all(len(f) == 4 for f in first)
    interleaved = [first[i % 2][i // 2] for i in range(8)]
    assert interleaved == samplers[0].draw()  # the ranks take turns through one draw
    if not weighted:
        assert set(interleaved) == set(range(7))  # a permutation, padded by one repeat
    for s in samplers:
        s.set_epoch(1)
    assert [list(s) for s in samplers] != first  # another epoch, another draw
    again = distributed.ShardedDrawSampler(7, seed=3, weights=weights, replicas=2, rank_=0)
    assert list(again) == first[0]  # seeded


def test_outside_torchrun_the_plumbing_does_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = torch.nn.Conv2d(1, 2, 3)
    with distributed.launched("cpu"):
        assert not distributed.active() and distributed.is_main() and distributed.world_size() == 1
        assert distributed.wrap(model, torch.device("cpu")) is model
        assert distributed.training_sampler(5, 0, None) is None
        assert distributed.on_main(lambda: 7) == 7 and distributed.broadcast_object("x") == "x"
        values = np.arange(4)
        assert distributed.reduce_sum(values) is values
        assert distributed.describe(8) == {}


def test_world_size_without_torchrun_is_one_named_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(distributed.DistributedRunError, match="launch with torchrun, or unset WORLD_SIZE"):
        with distributed.launched("cpu"):
            pass
    assert not distributed.active()
