"""Checkpoints: JSON spec + Torch-Pruning history + safetensors, rebuilt without unpickling.
Round trips give identical outputs, also after real pruning; every damaged part is refused with
a named error saying which file; an interrupted save leaves the previous checkpoint intact;
saves to one path take turns, and a load never undoes a save that is still running."""

from __future__ import annotations

import fcntl
import json
import threading
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from safetensors.torch import load_file, save_file

from core.errors import DefectPruneError
from core.models import checkpoint as ckpt
from core.models.checkpoint import (
    CheckpointCorruptWeightsError, CheckpointError, CheckpointHistoryError,
    CheckpointMissingFileError, CheckpointSpecError, CheckpointWeightsError, is_checkpoint,
    load_checkpoint, read_spec, save_checkpoint,
)
from core.models.graph import prunable_groups
from core.models.groups import classifier_layers
from core.models.zoo import ModelSpec, build_model

SIZE = (64, 64)


def make_spec(arch: str = "unet", encoder: str = "resnet18", in_channels: int = 1) -> ModelSpec:
    return ModelSpec(
        classes=["background", "scratch", "patch"], arch=arch, encoder=encoder,
        in_channels=in_channels, input_size=SIZE, dataset_format="neu-seg", split_seed=7,
        metrics={"val_defect_miou": 61.5, "epochs": 3},
    )


def trained_like(spec: ModelSpec, seed: int = 0) -> torch.nn.Module:
    """A model whose BatchNorm statistics are not the defaults, so a lost buffer shows."""
    torch.manual_seed(seed)
    model = build_model(spec)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, spec.in_channels, *SIZE))
    return model.eval()


def prune_half(model: torch.nn.Module, spec: ModelSpec) -> list:
    example = torch.randn(1, spec.in_channels, *SIZE)
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
        ignored_layers=classifier_layers(model),
    )
    pruner.step()
    model.eval()
    return pruner.pruning_history()


def outputs(model: torch.nn.Module, in_channels: int) -> torch.Tensor:
    x = torch.randn(2, in_channels, *SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, ModelSpec, list]:
    spec = make_spec()
    model = trained_like(spec)
    history = prune_half(model, spec)
    path = save_checkpoint(tmp_path_factory.mktemp("ck") / "pruned", model, spec, history)
    return path, model, spec, history


def test_unpruned_round_trip_is_identical(tmp_path: Path) -> None:
    spec = make_spec(in_channels=3)
    model = trained_like(spec)
    path = save_checkpoint(tmp_path / "model", model, spec)
    assert sorted(p.name for p in path.iterdir()) == sorted(ckpt.CHECKPOINT_FILES)
    assert json.loads((path / ckpt.HISTORY_FILE).read_text()) == []
    stored = json.loads((path / ckpt.SPEC_FILE).read_text())
    assert stored["classes"] == spec.classes and stored["split_seed"] == 7
    assert stored["dataset_format"] == "neu-seg" and stored["metrics"]["val_defect_miou"] == 61.5
    loaded = load_checkpoint(path)
    assert loaded.spec == spec and loaded.history == []
    assert not loaded.model.training
    assert torch.equal(outputs(model, 3), outputs(loaded.model, 3))
    assert is_checkpoint(path)


def test_round_trip_after_torch_pruning_is_identical(pruned) -> None:
    path, model, spec, history = pruned
    assert history, "the pruner recorded no history"
    fresh = build_model(spec)
    assert sum(p.numel() for p in model.parameters()) < 0.4 * sum(p.numel() for p in fresh.parameters())
    loaded = load_checkpoint(path)
    assert loaded.history == json.loads(json.dumps(history))
    assert torch.equal(outputs(model, 1), outputs(loaded.model, 1))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in loaded.model.state_dict().items()}
    # The rebuilt model maps like the pruned one, with half the channels of a fresh model.
    rebuilt = {g.name: g.channels for g in prunable_groups(loaded.model, SIZE, 1)}
    original = {g.name: g.channels for g in prunable_groups(fresh, SIZE, 1)}
    assert rebuilt.keys() == original.keys()
    assert all(rebuilt[name] == -(-original[name] // 2) or rebuilt[name] == original[name] // 2
               for name in original)


# Depthwise convs (MobileNet) and the ASPP's separable convs and image pooling (DeepLabV3+).
@pytest.mark.parametrize("arch,encoder", [("deeplabv3plus", "mobilenet_v2")])
def test_pruned_round_trip_other_architectures(tmp_path: Path, arch: str, encoder: str) -> None:
    spec = make_spec(arch, encoder, in_channels=3)
    model = trained_like(spec, seed=1)
    history = prune_half(model, spec)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "m", model, spec, history))
    assert torch.equal(outputs(model, 3), outputs(loaded.model, 3))


def test_loading_does_not_disturb_the_global_rng(pruned) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_checkpoint(pruned[0])
    assert torch.equal(torch.rand(3), expected)


def test_loading_never_unpickles(pruned, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("torch.load must not be used")
    monkeypatch.setattr(torch, "load", refuse)
    import pickle
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    load_checkpoint(pruned[0])


# ---------------------------------------------------------------- named errors

def copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in ckpt.CHECKPOINT_FILES:
        (target / name).write_bytes((source / name).read_bytes())
    return target


def test_missing_folder_and_missing_files(pruned, tmp_path: Path) -> None:
    with pytest.raises(CheckpointMissingFileError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    for name in ckpt.CHECKPOINT_FILES:
        broken = copy_checkpoint(pruned[0], tmp_path / f"without-{name}")
        (broken / name).unlink()
        with pytest.raises(CheckpointMissingFileError, match=name.replace(".", r"\.")):
            load_checkpoint(broken)


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"classes": ["bg", "x"], "arch": "segformer"}), "unknown architecture 'segformer'"),
    (json.dumps({"classes": ["bg", "x"], "encoder": "vgg99"}), "unknown encoder 'vgg99'"),
    (json.dumps({"classes": ["bg", "x"], "in_channels": 4}), "in_channels"),
    (json.dumps({"classes": "bg"}), "classes"),
    (json.dumps({"classes": ["bg", "x"], "input_size": [64]}), "input_size"),
    (json.dumps({"classes": ["bg", "x"], "dataset_options": ["num_images=24"]}), "'dataset_options' must be an object"),
])
def test_bad_spec_is_refused(pruned, tmp_path: Path, content: str, message: str) -> None:
    broken = copy_checkpoint(pruned[0], tmp_path / "bad-spec")
    (broken / ckpt.SPEC_FILE).write_text(content)
    with pytest.raises(CheckpointSpecError, match=message) as info:
        load_checkpoint(broken)
    assert ckpt.SPEC_FILE in str(info.value)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, DefectPruneError)


def test_history_that_does_not_fit_is_refused(pruned, tmp_path: Path) -> None:
    path, _model, _spec, history = pruned
    cases = {
        "not-a-list": ({"a": 1}, "must be a list"),
        "bad-entry": ([["encoder.conv1", True]], "entry 0"),
        "negative": ([["encoder.conv1", True, [-1]]], "entry 0"),
        "unknown-layer": ([["encoder.layer9.0.conv1", True, [0]]], "does not have"),
        "out-of-range": ([["encoder.layer1.0.conv1", True, [64]]], "only 64"),
        "everything": ([["encoder.layer1.0.conv1", True, list(range(64))]], "all 64"),
        "classifier": ([["segmentation_head.0", True, [0]]], "prunes the classifier"),
        # The history of a pruned model replayed twice: the second pass no longer fits.
        "twice": (history + history, "does not fit|would remove all"),
    }
    for label, (content, message) in cases.items():
        broken = copy_checkpoint(path, tmp_path / label)
        (broken / ckpt.HISTORY_FILE).write_text(json.dumps(content))
        with pytest.raises(CheckpointHistoryError, match=message) as info:
            load_checkpoint(broken)
        assert ckpt.HISTORY_FILE in str(info.value), label
    broken = copy_checkpoint(path, tmp_path / "not-json")
    (broken / ckpt.HISTORY_FILE).write_text("[[")
    with pytest.raises(CheckpointHistoryError, match="not valid JSON"):
        load_checkpoint(broken)


def test_history_may_not_prune_the_image_channels(tmp_path: Path) -> None:
    spec = make_spec(in_channels=3)
    path = save_checkpoint(tmp_path / "rgb", build_model(spec), spec)
    (path / ckpt.HISTORY_FILE).write_text(json.dumps([["encoder.conv1", False, [0]]]))
    with pytest.raises(CheckpointHistoryError, match="input channels of the image"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_are_refused(pruned, tmp_path: Path) -> None:
    path, model, spec, _history = pruned
    # Weights of the pruned model with an empty history: shapes do not match the built model.
    broken = copy_checkpoint(path, tmp_path / "no-history")
    (broken / ckpt.HISTORY_FILE).write_text("[]")
    with pytest.raises(CheckpointWeightsError, match="wrong shape") as info:
        load_checkpoint(broken)
    assert ckpt.WEIGHTS_FILE in str(info.value)
    # A missing tensor.
    state = load_file(str(path / ckpt.WEIGHTS_FILE))
    state.pop("encoder.conv1.weight")
    broken = copy_checkpoint(path, tmp_path / "missing-key")
    save_file(state, str(broken / ckpt.WEIGHTS_FILE))
    with pytest.raises(CheckpointWeightsError, match="missing .*encoder.conv1.weight"):
        load_checkpoint(broken)
    # An extra tensor.
    state = load_file(str(path / ckpt.WEIGHTS_FILE))
    state["extra.weight"] = torch.zeros(2)
    broken = copy_checkpoint(path, tmp_path / "extra-key")
    save_file(state, str(broken / ckpt.WEIGHTS_FILE))
    with pytest.raises(CheckpointWeightsError, match="unexpected .*extra.weight"):
        load_checkpoint(broken)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "flipped-byte"])
def test_corrupted_weights_are_refused(pruned, tmp_path: Path, damage: str) -> None:
    broken = copy_checkpoint(pruned[0], tmp_path / damage)
    weights = broken / ckpt.WEIGHTS_FILE
    data = weights.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytes(range(256)) * 8
    elif damage == "empty":
        data = b""
    else:  # one bit in the last tensor's bytes: the header still parses
        data = data[:-10] + bytes([data[-10] ^ 0x01]) + data[-9:]
    weights.write_bytes(data)
    with pytest.raises(CheckpointCorruptWeightsError, match=r"weights\.safetensors") as info:
        load_checkpoint(broken)
    assert isinstance(info.value, CheckpointWeightsError)


# ---------------------------------------------------------------- atomic saving

def test_interrupted_save_keeps_the_previous_checkpoint(pruned, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec()
    first = trained_like(spec, seed=5)
    path = save_checkpoint(tmp_path / "model", first, spec)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def fail_midway(*_args, **_kwargs):
        raise OSError("disk full")  # after spec.json and the history, before the weights

    monkeypatch.setattr(ckpt, "save_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, pruned[1], pruned[2], pruned[3])
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]  # no partial or temporary folder
    assert torch.equal(outputs(first, 1), outputs(load_checkpoint(path).model, 1))

    # A failure in the final swap puts the old checkpoint back as well.
    real_replace = ckpt.os.replace
    calls = []

    def fail_second_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", fail_second_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(path, pruned[1], pruned[2], pruned[3])
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]

    # A complete save replaces it.
    save_checkpoint(path, pruned[1], pruned[2], pruned[3])
    assert read_spec(path) == pruned[2]
    assert torch.equal(outputs(pruned[1], 1), outputs(load_checkpoint(path).model, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


class PausedSave(threading.Thread):
    """A save in another thread that stops after the first step (``"replace"`` or
    ``"save_file"``, and the path it wrote) for which ``pause_at(step, target)`` holds, until
    `go_on`; flock treats the thread's lock file handle apart from any other, as it would
    another process's."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, pause_at, *save_args):
        super().__init__(daemon=True)
        self.args, self.error = save_args, None
        self.paused, self.resume = threading.Event(), threading.Event()
        real_replace, real_save = ckpt.os.replace, ckpt.save_file

        def pause_if(step: str, target) -> None:
            if threading.current_thread() is self and pause_at(step, Path(target)) and not self.paused.is_set():
                self.paused.set()
                assert self.resume.wait(60)

        def replace(src, dst):
            real_replace(src, dst)
            pause_if("replace", dst)

        def save_file(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            pause_if("save_file", filename)

        monkeypatch.setattr(ckpt.os, "replace", replace)
        monkeypatch.setattr(ckpt, "save_file", save_file)

    def run(self) -> None:
        try:
            save_checkpoint(*self.args)
        except BaseException as exc:  # noqa: BLE001 - reported by go_on
            self.error = exc

    def wait_paused(self) -> None:
        while not self.paused.wait(0.05):
            assert self.is_alive(), f"the save ended before its pause: {self.error!r}"

    def go_on(self) -> None:
        self.resume.set()
        self.join(60)
        assert not self.is_alive() and self.error is None, self.error


def test_a_load_while_a_save_is_between_its_renames_loses_neither_checkpoint(
        pruned, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec()
    first = trained_like(spec, seed=5)
    path = save_checkpoint(tmp_path / "model", first, spec)
    saver = PausedSave(monkeypatch, lambda step, target: step == "replace" and target.name.startswith(".model.old-"),
                       path, *pruned[1:])
    saver.start()
    saver.wait_paused()
    during = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())
    assert during == [".model.lock", ".model.old", ".model.tmp"]

    # A load (or the dashboard) sees no checkpoint but leaves the running save alone: it used to
    # put the old folder back, so the save's own rename failed and its rollback lost both.
    assert ckpt.restore_interrupted_save(path) is False
    with pytest.raises(CheckpointMissingFileError, match="does not exist"):
        load_checkpoint(path)
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == during

    saver.go_on()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]
    assert torch.equal(outputs(pruned[1], 1), outputs(load_checkpoint(path).model, 1))


def test_a_save_waits_for_another_save_to_the_same_path(pruned, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec()
    path = tmp_path / "model"
    first = PausedSave(monkeypatch, lambda step, _target: step == "save_file", path, trained_like(spec, seed=5), spec)
    first.start()
    first.wait_paused()  # its weights are written, not yet renamed into place
    [writing] = [p for p in tmp_path.iterdir() if p.name.startswith(".model.tmp-")]

    second = threading.Thread(target=save_checkpoint, args=(path, *pruned[1:]), daemon=True)
    second.start()
    second.join(0.5)
    assert second.is_alive() and writing.is_dir()  # it waits; it used to sweep away the first's folder
    first.go_on()
    second.join(60)
    assert not second.is_alive()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]
    assert read_spec(path) == pruned[2]  # the second save came last


def test_a_killed_save_is_put_back_only_once_no_save_holds_the_lock(tmp_path: Path) -> None:
    spec = make_spec()
    path = save_checkpoint(tmp_path / "model", trained_like(spec, seed=5), spec)
    aside = tmp_path / ".model.old-0000abcd"
    path.rename(aside)  # what a save killed between its renames leaves
    with open(tmp_path / ".model.lock", "a") as lock:  # as another process's running save holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert ckpt.restore_interrupted_save(path) is False
        with pytest.raises(CheckpointMissingFileError):
            load_checkpoint(path)
        assert aside.is_dir() and not path.exists()
    assert ckpt.restore_interrupted_save(path) is True
    assert is_checkpoint(path) and not aside.exists()
    assert ckpt.restore_interrupted_save(path) is False  # nothing to do: one stat


def test_save_refuses_to_replace_something_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    spec = make_spec()
    model = build_model(spec)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        save_checkpoint(folder, model, spec)
    assert (folder / "holiday.jpg").exists()
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        save_checkpoint(file, model, spec)


def test_history_to_save_is_validated(tmp_path: Path) -> None:
    spec = make_spec()
    with pytest.raises(CheckpointHistoryError):
        save_checkpoint(tmp_path / "m", build_model(spec), spec, history=[["encoder.conv1", "yes", [0]]])
    assert not (tmp_path / "m").exists()
