"""Profiling and ONNX: parameter and MAC counts that can be checked by hand, latency numbers
that are sane, an ONNX export that ONNX Runtime runs with any batch size, and the `profile` and
`export-onnx` commands end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from core.models.checkpoint import save_checkpoint
from core.models.groups import classifier_layers
from core.models.runtime import example_input
from core.models.zoo import ModelSpec, build_model
from core.profile import (
    LatencyResult, OnnxExportError, ProfileError, checkpoint_size_bytes, count_macs, count_params,
    export_onnx, latency_in_turns, measure_latency, measure_onnx_latency, onnx_max_abs_diff, onnx_metadata,
    profile_model,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = (64, 64)


def tiny_spec() -> ModelSpec:
    return ModelSpec(classes=["background", "defect"], arch="unet", encoder="resnet18",
                     in_channels=1, input_size=SIZE)


def test_counts_on_a_model_small_enough_to_count_by_hand() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1))
    assert count_params(model) == 1 * 4 * 9 + 4 * 2 + (4 * 2 + 2)
    conv_macs = 4 * 9 * 32 * 32 + (4 * 2 * 32 * 32 + 2 * 32 * 32)  # second conv has a bias
    macs = count_macs(model, (32, 32), 1)
    assert conv_macs <= macs <= conv_macs + 4 * 4 * 32 * 32  # plus BatchNorm and ReLU


def test_subclassed_convs_are_counted() -> None:
    class SamePadConv(nn.Conv2d):  # as EfficientNet's encoder has them
        pass

    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    sub = nn.Sequential(SamePadConv(3, 8, 3, padding=1))
    assert count_macs(sub, (32, 32), 3) == count_macs(plain, (32, 32), 3) > 0


def test_pruning_reduces_macs_params_and_size(tmp_path: Path) -> None:
    spec = tiny_spec()
    torch.manual_seed(0)
    model = build_model(spec)
    macs0, params0 = count_macs(model, SIZE, 1), count_params(model)
    assert macs0 == tp.utils.count_ops_and_params(model, example_input(SIZE, 1))[0]
    assert count_macs(model, (64, 128), 1) == pytest.approx(2 * macs0, rel=0.01)
    size0 = checkpoint_size_bytes(save_checkpoint(tmp_path / "full", model, spec))
    pruner = tp.pruner.MetaPruner(model, example_input(SIZE, 1),
                                  importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=classifier_layers(model))
    pruner.step()
    macs1, params1 = count_macs(model, SIZE, 1), count_params(model)
    size1 = checkpoint_size_bytes(save_checkpoint(tmp_path / "half", model, spec, pruner.pruning_history()))
    # Halving channels on both sides of most convs leaves about a quarter.
    assert 0.15 < macs1 / macs0 < 0.4
    assert 0.15 < params1 / params0 < 0.4
    assert 0.15 < size1 / size0 < 0.4
    assert size0 > 4 * params0  # float32 weights plus BatchNorm buffers


def test_latency_is_measured_with_the_requested_threads_and_restored() -> None:
    model = build_model(tiny_spec())
    model.train()
    threads_before = torch.get_num_threads()
    result = measure_latency(model, SIZE, 1, runs=4, warmup=1, threads=1)
    assert isinstance(result, LatencyResult)
    assert result.runs == 4 and result.threads == 1 and result.engine == "torch"
    assert 0 < result.p10_ms <= result.median_ms <= result.p90_ms < 10_000
    assert torch.get_num_threads() == threads_before
    assert model.training  # the caller's mode is left as it was
    with pytest.raises(ProfileError, match="runs"):
        measure_latency(model, SIZE, 1, runs=0)
    with pytest.raises(ProfileError, match="threads"):
        measure_latency(model, SIZE, 1, threads=0)


def test_models_timed_in_turns_get_one_result_per_engine_each() -> None:
    torch.manual_seed(0)
    first, second = build_model(tiny_spec()).train(), build_model(tiny_spec()).eval()
    results = latency_in_turns([first, second], SIZE, 1, runs=3, warmup=1, threads=1)
    assert [sorted(r) for r in results] == [["onnxruntime", "torch"]] * 2
    for r in results:
        for engine, result in r.items():
            assert (result.engine, result.runs, result.warmup, result.threads) == (engine, 3, 1, 1)
            assert 0 < result.p10_ms <= result.median_ms <= result.p90_ms
    assert first.training and not second.training  # each model's mode is given back
    assert list(latency_in_turns([second], SIZE, 1, runs=1, warmup=0, onnx=False)[0]) == ["torch"]
    with pytest.raises(ProfileError, match="runs must be at least 1"):
        latency_in_turns([second], SIZE, 1, runs=0)


def test_each_timed_turn_follows_a_warm_run_of_the_same_call() -> None:
    """A timed run finds its own model in the caches (as on a device that runs only it), not the
    one timed before it."""
    from core.profile import time_in_turns

    order: list[str] = []
    calls = [lambda: order.append("a"), lambda: order.append("b")]
    times = time_in_turns(calls, runs=2, warmup=1)
    assert [len(t) for t in times] == [2, 2]
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 2  # warm-up turn, then (warm, timed) per call
    order.clear()
    time_in_turns(calls, runs=1, warmup=0, warm=0)
    assert order == ["a", "b"]
    with pytest.raises(ProfileError, match="warm"):
        time_in_turns(calls, warm=-1)


def test_sessions_timed_in_turns_do_not_spin(tmp_path: Path) -> None:
    """Idle threads of one ONNX Runtime session spinning while the next is timed took its cores
    (2 threads, 2 cores: twice the latency): sessions timed in turns sleep between runs."""
    from core.profile import onnx_session

    path = export_onnx(build_model(tiny_spec()), tmp_path / "model.onnx", SIZE, 1)
    entry = "session.intra_op.allow_spinning"
    assert onnx_session(path, 2, spinning=False).get_session_options().get_session_config_entry(entry) == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ONNX Runtime's default: spin
        onnx_session(path, 2).get_session_options().get_session_config_entry(entry)


def test_onnx_export_matches_pytorch_with_a_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_spec())
    path = export_onnx(model, tmp_path / "sub" / "model.onnx", SIZE, 1)
    assert path.is_file() and path.stat().st_size > 4 * count_params(model) * 0.9
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temporary left over
    for batch in (1, 3):
        diff = onnx_max_abs_diff(model, path, example_input(SIZE, 1, batch=batch))
        assert diff < 1e-4
    result = measure_onnx_latency(path, SIZE, 1, runs=3, warmup=1, threads=1)
    assert result.engine == "onnxruntime" and result.runs == 3 and result.median_ms > 0
    with pytest.raises(OnnxExportError, match="is a folder"):
        export_onnx(model, tmp_path, SIZE, 1)


def test_failed_export_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(tiny_spec())
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")

    def broken_export(*args, **_kwargs):
        Path(args[2]).write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(OnnxExportError, match="exporter crashed"):
        export_onnx(model, target, SIZE, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert target.read_bytes() == b"previous export"


def test_profile_model_reports_every_cost(tmp_path: Path) -> None:
    spec = tiny_spec()
    model = build_model(spec)
    path = save_checkpoint(tmp_path / "ck", model, spec)
    report = profile_model(model, spec, checkpoint_dir=path, runs=2, warmup=1, threads=1)
    assert report["params"] == count_params(model)
    assert report["macs"] == count_macs(model, SIZE, 1) and report["flops"] == 2 * report["macs"]
    assert report["size_bytes"] == checkpoint_size_bytes(path) and report["size_source"] == "checkpoint"
    assert set(report["latency_ms"]) == {"torch", "onnxruntime"}
    assert all(v > 0 for v in report["latency_ms"].values())
    assert report["latency"]["torch"]["runs"] == 2
    bare = profile_model(model, spec, runs=1, warmup=0, onnx=False)
    assert set(bare["latency_ms"]) == {"torch"} and bare["size_source"] == "state_dict"
    assert 0.95 < bare["size_bytes"] / report["size_bytes"] <= 1.0  # the file is the tensors + header


# ---------------------------------------------------------------- command line

def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = tiny_spec()
    torch.manual_seed(0)
    model = build_model(spec)
    pruner = tp.pruner.MetaPruner(model, example_input(SIZE, 1),
                                  importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=classifier_layers(model))
    pruner.step()
    return save_checkpoint(tmp_path_factory.mktemp("cli") / "tiny", model, spec, pruner.pruning_history())


def test_cli_profile_json(tiny_checkpoint: Path, tmp_path: Path) -> None:
    done = run_cli("profile", "--checkpoint", str(tiny_checkpoint), "--runs", "2", "--threads", "1",
                   "--size", "64", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {"params", "macs", "size_bytes", "latency_ms"} <= set(report)
    assert set(report["latency_ms"]) == {"torch", "onnxruntime"}
    assert all(v > 0 for v in report["latency_ms"].values())
    assert report["size_bytes"] == checkpoint_size_bytes(tiny_checkpoint)
    assert report["pruned"] is True and report["input_size"] == [64, 64]
    full = build_model(tiny_spec())
    assert report["macs"] < 0.4 * count_macs(full, SIZE, 1)
    assert report["params"] < 0.4 * count_params(full)


def test_cli_export_onnx_json(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "exports" / "tiny.onnx"
    done = run_cli("export-onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--json",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert Path(report["path"]) == out.resolve() and out.is_file()
    assert 0 <= report["max_abs_diff"] < 1e-4
    assert report["size_bytes"] == out.stat().st_size
    # what a program running the file needs, read back with onnx (ONNX Runtime ran it above: max_abs_diff)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta == onnx_metadata(out)
    assert json.loads(meta["classes"]) == ["background", "defect"]
    assert json.loads(meta["input_size"]) == [64, 64] and meta["in_channels"] == "1"
    assert (float(meta["mean"]), float(meta["std"])) == (0.5, 0.25) and "/ 255" in meta["normalisation"]
    assert meta["arch"] == "unet-resnet18" and json.loads(meta["pruned"]) is True


def test_export_without_metadata_writes_none(tmp_path: Path) -> None:
    path = export_onnx(build_model(tiny_spec()), tmp_path / "plain.onnx", SIZE, 1)
    assert onnx_metadata(path) == {}


def test_cli_bad_checkpoint_is_one_line(tmp_path: Path) -> None:
    done = run_cli("profile", "--checkpoint", str(tmp_path / "missing"), "--json", cwd=tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error:") and "does not exist" in lines[0]
    assert done.stdout == ""


@pytest.mark.parametrize("args,message", [
    (["profile", "--checkpoint", "{ck}", "--runs", "0"], "--runs: 0 must be at least 1"),
    (["profile", "--checkpoint", "{ck}", "--size", "50"], "multiples of 32"),
    (["export-onnx", "--checkpoint", "{notck}", "--out", "x.onnx"], "spec.json is missing"),
    (["export-onnx", "--checkpoint", "{ck}", "--out", "{folder}"], "is a folder"),
])
def test_cli_bad_arguments_are_one_line(tiny_checkpoint: Path, tmp_path: Path, args: list[str],
                                        message: str, capsys: pytest.CaptureFixture) -> None:
    """The same entry point as ``python -m core``, in-process (the subprocess path is above)."""
    from core.cli import main

    (tmp_path / "notck").mkdir()
    values = {"ck": str(tiny_checkpoint), "notck": str(tmp_path / "notck"), "folder": str(tmp_path)}
    try:
        code = main([a.format(**values) for a in args])
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error:") and message in lines[0]
    assert captured.out == ""
