"""bench/compression.py on a local Ray cluster (`ray.init(num_cpus=2)`): the tiny benchmark end
to end with every job and measurement a Ray task gives the thread pool's CSV rows, a rerun
submits nothing, the decision of what is cached already, and no Ray import without --ray."""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compression as bench

REPO = Path(__file__).resolve().parents[1]
TINY = ["--datasets", "--format", "synthetic-steel", "--size", "64", "--limit", "8", "--baseline-limit", "8",
        "--epochs", "1", "--methods", "uniform-l1", "--seeds", "0", "--seeded-methods", "--no-ablation",
        "--targets", "0.3", "--step", "0.3", "--scoring-steps", "2", "--latency-runs", "2", "--threads", "1",
        "--batch-size", "4", "--recover-epochs", "0"]
TIMING = ("latency_torch_ms", "latency_ort_ms", "wall_s")


def _rows(folder: Path) -> list[dict]:
    with open(folder / "compression.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.timeout(600)
def test_the_tiny_benchmark_on_a_local_ray_cluster_gives_the_thread_pools_rows(tmp_path, monkeypatch, capsys):
    submitted: list[tuple[str, str]] = []
    real_submit = bench.RayJobs.submit

    def submit(self, fn, *fn_args, **fn_kwargs):
        submitted.append((fn.__name__, fn_kwargs.get("name", "")))
        return real_submit(self, fn, *fn_args, **fn_kwargs)

    monkeypatch.setattr(bench.RayJobs, "submit", submit)
    ray_argv = [*TINY, "--work", str(tmp_path / "ray-work"), "--baseline-cache", str(tmp_path / "base"),
                "--out-dir", str(tmp_path / "ray-out"), "--ray", "local"]
    ray, started = bench.connect_ray("local", cpus=2)  # ray.init(num_cpus=2, no dashboard, no logs to here)
    try:
        assert started and ray.cluster_resources()["CPU"] == 2
        assert bench.main(ray_argv) == 0  # --ray local: the cluster this process runs already
        assert ray.is_initialized()  # not the benchmark's to end
        kinds = sorted(name for name, _ in submitted)
        # the baseline, the control and the prune run; the baseline's evaluation; three points measured
        assert kinds == sorted(["train_baseline", "fine_tune_copy", "prune", "benchmark_dataset"]
                               + ["measure_task"] * 3), submitted
        ray_rows = _rows(tmp_path / "ray-out")
        assert [(r["method"], r["phase"]) for r in ray_rows] == [("none", "round"), ("uniform-l1", "round")]
        assert float(ray_rows[1]["macs_reduction"]) == pytest.approx(0.3, abs=0.01)
        assert "as Ray tasks on `--ray local` (2 CPU(s), 0 GPU(s), 1 node(s))" in (
            tmp_path / "ray-out" / "compression.md").read_text()
        work = next(p for p in (tmp_path / "ray-work").iterdir() if p.name.startswith("synthetic-steel-"))
        assert (work / "baseline.log").is_file() and (work / "uniform-l1-s0.log").is_file()  # each task's output

        # a rerun: every job and point is cached, nothing is submitted, the same rows
        submitted.clear()
        capsys.readouterr()
        assert bench.main(ray_argv) == 0
        assert submitted == [] and "Ray tasks submitted: 0" in capsys.readouterr().out
        assert _rows(tmp_path / "ray-out") == ray_rows
    finally:
        ray.shutdown()

    # the thread pool on the same baseline (its cache is shared; the run, the control and their
    # measurements are made again in another --work): the same rows but for the timings
    thread_argv = [*TINY, "--work", str(tmp_path / "thread-work"), "--baseline-cache", str(tmp_path / "base"),
                   "--out-dir", str(tmp_path / "thread-out"), "--jobs", "2"]
    assert bench.main(thread_argv) == 0
    thread_rows = _rows(tmp_path / "thread-out")
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in thread_rows] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in ray_rows]
    assert all(float(r[k]) > 0 for r in thread_rows + ray_rows for k in TIMING)


def _args(**extra) -> argparse.Namespace:
    return argparse.Namespace(report_only=False, threads=3, device="cpu", **extra)


def test_a_ray_job_whose_output_is_there_is_not_submitted(tmp_path):
    runner = bench.RayJobs.__new__(bench.RayJobs)  # its decisions only: no cluster
    seen = []

    def job(result):
        def fn(*fn_args, **fn_kwargs):
            seen.append([getattr(a, "report_only", None) for a in (*fn_args, *fn_kwargs.values()) if isinstance(a, argparse.Namespace)])
            return result
        return fn

    args = _args()
    cases = [("control", (None, 0.0), False), ("control", (tmp_path / "checkpoint", 3.0), True),
             ("control-recovered", (tmp_path / "checkpoint", 3.0), True),
             ("run", ({"rounds": [{"round": 1}]}, "cmd"), False), ("run", (None, "cmd"), False),
             ("run", ({"rounds": [], "result": {}}, "cmd"), True),
             ("recovery", (None, None), True),  # the run never reached the target: nothing to do
             ("recovery", ({"rounds": [], "result": {}}, "cmd"), False),  # not recovered yet
             ("recovery", ({"rounds": [], "result": {}, "recovery": {"epochs": 1}}, "cmd"), True)]
    for kind, result, done in cases:
        assert (runner.finished(kind, job(result), (1, args), {"seed": 0}) is not None) == done, (kind, result)
        assert seen.pop() == [True]  # asked with --report-only: it runs nothing, only reads its files
    assert args.report_only is False  # the job's own arguments are untouched
    # a baseline counts as finished when its training history is there
    base_args = argparse.Namespace(epochs={None: 1}, arch="unet", encoder="resnet18", size=64, seed=0, limit=8,
                                   precision="fp32", schedule="cosine", patience=8, device="cpu")
    trained = job((tmp_path / "ckpt", [], True))
    assert runner.finished("baseline", trained, ("synthetic-steel", tmp_path, base_args, tmp_path / "cache"), {}) is None
    from bench.baseline import baseline_tag

    (tmp_path / "cache" / baseline_tag("synthetic-steel", base_args)).mkdir(parents=True)
    (tmp_path / "cache" / baseline_tag("synthetic-steel", base_args) / "training_history.json").write_text("{}")
    assert runner.finished("baseline", trained, ("synthetic-steel", tmp_path, base_args, tmp_path / "cache"), {}) == (
        (tmp_path / "ckpt", [], True),)


class _FakeRay:
    def __init__(self, gpus):
        self.gpus = gpus

    def cluster_resources(self):
        return {"CPU": 8.0, **({"GPU": float(self.gpus)} if self.gpus else {})}


def test_ray_tasks_ask_for_a_gpu_where_they_train_on_cuda():
    assert bench.ray_gpus(_FakeRay(0), _args()) == 0
    assert bench.ray_gpus(_FakeRay(2), argparse.Namespace(device="auto")) == 1
    assert bench.ray_gpus(_FakeRay(0), argparse.Namespace(device="auto")) == 0
    assert bench.ray_gpus(_FakeRay(2), argparse.Namespace(device="cpu")) == 0
    assert bench.ray_gpus(_FakeRay(0), argparse.Namespace(device="cuda")) == 1


def test_without_ray_nothing_imports_it(tmp_path):
    code = ("import sys\n"
            "from bench import compression\n"
            f"code = compression.main(['--datasets', '--report-only', '--work', {str(tmp_path / 'w')!r}, "
            f"'--baseline-cache', {str(tmp_path / 'b')!r}, '--out-dir', {str(tmp_path / 'o')!r}])\n"
            "assert code == 1, code  # nothing to report\n"
            "assert 'ray' not in sys.modules, [m for m in sys.modules if m.startswith('ray')]\n"
            "print('no ray')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "no ray" in done.stdout, done.stderr[-2000:]
    # --ray-cpus belongs to --ray local
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--datasets", "--ray-cpus", "2", "--report-only"])
    assert exit_info.value.code == 2


def test_a_bad_or_silent_ray_address_is_a_usage_error(capsys):
    import socket

    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address, message in ((f"127.0.0.1:{port}", f"--ray 127.0.0.1:{port}: nothing answers there"),
                             ("nonsense", "--ray takes auto, local or a cluster's HOST:PORT, not 'nonsense'")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--datasets", "--ray", address, "--report-only"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
