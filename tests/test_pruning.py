"""Physical pruning by every method on every architecture, and the prune-retrain loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import pytest
import torch
import torch_pruning as tp

from core.allocation.context import ScoringNetworkSettings, StepSettings
from core.data.dataset import SegmentationDataset
from core.data.registry import load_index
from core.models.checkpoint import load_checkpoint, save_checkpoint
from core.models.zoo import ARCHITECTURES, ModelSpec, build_model
from core.models.graph import PruningError
from core.pruning.loop import LoopInputs, LoopSettings, read_rounds, run_prune_loop
from core.pruning.methods import METHODS, resolve_method
from core.pruning.step import prune_step, pruning_context
from core.train import TrainConfig

SIZE = 64
CLASSES = ["background", "a", "b"]


def calibration(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, SIZE, SIZE, generator=g), torch.randint(0, 3, (2, SIZE, SIZE), generator=g))]


def macs_of(model) -> float:
    return tp.utils.count_ops_and_params(model, torch.zeros(1, 3, SIZE, SIZE))[0]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_method_prunes_every_architecture_to_half_the_macs(arch, tmp_path):
    x = torch.randn(1, 3, SIZE, SIZE)
    for method in METHODS:
        torch.manual_seed(0)
        spec = ModelSpec(classes=CLASSES, arch=arch, input_size=(SIZE, SIZE))
        model = build_model(spec).eval()
        before = macs_of(model)
        context = pruning_context(model, (SIZE, SIZE), 3, calibration(), CLASSES,
                                  settings=StepSettings(scoring=ScoringNetworkSettings(steps=2)))
        step = prune_step(context, resolve_method(method), 0.5)
        assert model(x).shape == (1, 3, SIZE, SIZE)
        assert 1 - macs_of(model) / before == pytest.approx(0.5, abs=0.03), method
        folder = save_checkpoint(tmp_path / f"{arch}-{method}", model, spec, step.history)
        loaded = load_checkpoint(folder)
        with torch.no_grad():
            assert torch.equal(loaded.model(x), model(x)), method


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    index = load_index("synthetic-steel", tmp_path_factory.mktemp("synthetic"), num_images=24, image_size=64)
    return (SegmentationDataset(index, "train", (SIZE, SIZE)), SegmentationDataset(index, "val", (SIZE, SIZE)),
            SegmentationDataset(index, "test", (SIZE, SIZE)), index.classes)


def loop_settings(**overrides) -> LoopSettings:
    base = dict(method="uniform-l1", target=0.8, step=0.5, tolerance=1.0, finetune_epochs=0, max_rounds=6,
                calibration_images=4, calibration_batch=2, latency_runs=2, seed=3,
                finetune=TrainConfig(epochs=1, batch_size=4, max_steps_per_epoch=1, patience=None))
    base.update(overrides)
    return LoopSettings(**base)


class ScriptedEvaluator:
    """Validation results in a fixed order: the loop's decisions are then known in advance."""

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def __call__(self, model):
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return {"defect_miou": value, "per_class_iou": {}}


def fresh(classes):
    torch.manual_seed(0)
    spec = ModelSpec(classes=classes, input_size=(SIZE, SIZE))
    return build_model(spec).eval(), spec


def test_loop_reverts_the_round_that_breaks_tolerance(tiny_data, tmp_path):
    train, val, test, classes = tiny_data
    model, spec = fresh(classes)
    # unpruned 50.0; round 1 drops 0.5 (kept), round 2 drops 3.0 (beyond 1.0): reverted
    result = run_prune_loop(LoopInputs(model, spec, [], train, val, test), tmp_path, loop_settings(),
                            evaluator=ScriptedEvaluator([50.0, 49.5, 47.0, 49.9]))
    assert result.stopped == "tolerance"
    assert [r.accepted for r in result.rounds] == [True, False]
    assert result.result["checkpoint"] == result.rounds[0].checkpoint
    assert result.result["drop"] == pytest.approx(0.5)
    assert result.result["test"] is not None  # the test split, once, at the end
    loaded = load_checkpoint(result.result["checkpoint"])
    assert macs_of(loaded.model) == result.rounds[0].macs
    # the start is timed as each round is (the Prune page's latency frontier starts there)
    base = json.loads((tmp_path / "rounds.json").read_text())["base"]
    assert base["latency_ms"] > 0 and all(r.latency_ms > 0 for r in result.rounds)


def test_loop_stops_at_the_target_and_is_deterministic(tiny_data, tmp_path):
    train, val, test, classes = tiny_data
    runs = []
    for name in ("a", "b"):
        model, spec = fresh(classes)
        result = run_prune_loop(LoopInputs(model, spec, [], train, val), tmp_path / name,
                                loop_settings(method="collaborative", finetune_epochs=1, step_settings=StepSettings(
                                    scoring=ScoringNetworkSettings(steps=2))),
                                evaluator=ScriptedEvaluator([50.0]))
        runs.append(result)
    first, second = runs
    assert first.stopped == "target"
    assert first.rounds[-1].macs_reduction >= 0.8 - 1e-3
    # step 0.5: 50% then 75% of the MACs gone, then the rest to the 80% target
    assert [round(r.macs_reduction, 2) for r in first.rounds][:2] == pytest.approx([0.5, 0.75], abs=0.02)
    assert [r.macs for r in first.rounds] == [r.macs for r in second.rounds]
    assert [r.step["allocation"]["kept"] for r in first.rounds] == [r.step["allocation"]["kept"] for r in second.rounds]
    a = load_checkpoint(first.result["checkpoint"]).model
    b = load_checkpoint(second.result["checkpoint"]).model
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


def test_a_stop_asked_through_the_progress_callback_records_no_half_scored_round(tiny_data, tmp_path):
    train, val, _, classes = tiny_data
    messages = []

    def stop_during_scoring(fraction, message):
        messages.append(message)
        return "round 2 prune" in message  # asked while the second round's allocation is trained

    model, spec = fresh(classes)
    result = run_prune_loop(LoopInputs(model, spec, [], train, val), tmp_path,
                            loop_settings(method="collaborative", max_rounds=3, finetune_epochs=1,
                                          step_settings=StepSettings(scoring=ScoringNetworkSettings(steps=50))),
                            progress=stop_during_scoring, evaluator=ScriptedEvaluator([50.0]))
    assert result.stopped == "user"
    assert [r.round for r in result.rounds] == [1]  # round 2 was cut but never recorded
    assert not (tmp_path / "round_02").exists()
    assert any("round 1 fine-tune" in m for m in messages)
    assert not any("round 2 fine-tune" in m for m in messages)  # nor fine-tuned
    assert result.result["checkpoint"] == result.rounds[0].checkpoint


def test_a_parameter_target_is_landed_on_not_overshot(tiny_data, tmp_path):
    train, val, _, classes = tiny_data
    model, spec = fresh(classes)
    # step 0.5 of the MACs cuts far more than 60% of the parameters in its second round (a
    # uniform MACs cut removes about the same share of parameters); the round is scaled back
    result = run_prune_loop(LoopInputs(model, spec, [], train, val), tmp_path,
                            loop_settings(target=0.6, target_kind="params", step=0.5),
                            evaluator=ScriptedEvaluator([50.0]))
    assert result.stopped == "target"
    reductions = [r.params_reduction for r in result.rounds]
    assert reductions[0] < 0.6 <= reductions[-1] + 1e-3
    assert reductions[-1] == pytest.approx(0.6, abs=0.01)
    assert result.result["params_reduction"] == pytest.approx(reductions[-1])
    loaded = load_checkpoint(result.result["checkpoint"])
    assert sum(p.numel() for p in loaded.model.parameters()) == result.rounds[-1].params


def test_rounds_land_on_the_milestones_on_their_way_to_the_target(tiny_data, tmp_path):
    from core.runs.kinds import job_request

    train, val, _, classes = tiny_data
    model, spec = fresh(classes)
    # step 0.45 alone would give 45%, 70%; the milestones stop rounds at 30% and 50% first
    result = run_prune_loop(LoopInputs(model, spec, [], train, val), tmp_path,
                            loop_settings(target=0.7, step=0.45, milestones=(0.5, 0.3)),
                            evaluator=ScriptedEvaluator([50.0]))
    assert result.stopped == "target"
    assert [round(r.macs_reduction, 2) for r in result.rounds] == pytest.approx([0.3, 0.5, 0.7], abs=0.01)
    with pytest.raises(PruningError, match="milestones"):
        loop_settings(milestones=(0.5, 1.2)).validate()
    # a round that lands a hair short of a milestone (rounded channels) counts as on it, as for
    # the target: no extra round of a few channels (and an extra fine-tune) to close the gap
    from core.pruning.loop import _milestone_macs

    settings = loop_settings(target=0.9, milestones=(0.7,))
    assert _milestone_macs(settings, 1000.0, 300.4) == []
    assert _milestone_macs(settings, 1000.0, 302.0) == pytest.approx([300.0])
    # the run store's prune job takes them as a JSON list
    assert job_request("prune", {"checkpoint": "c", "milestones": [0.5, 0.7]}).milestones == (0.5, 0.7)


def test_loop_resumes_after_its_last_finished_round(tiny_data, tmp_path):
    train, val, test, classes = tiny_data
    model, spec = fresh(classes)
    settings = loop_settings(max_rounds=1)
    run_prune_loop(LoopInputs(model, spec, [], train, val), tmp_path, settings, evaluator=ScriptedEvaluator([50.0]))
    assert len(read_rounds(tmp_path)) == 1
    model, spec = fresh(classes)
    resumed = run_prune_loop(LoopInputs(model, spec, [], train, val), tmp_path, loop_settings(max_rounds=6),
                             evaluator=ScriptedEvaluator([50.0]))
    assert [r.round for r in resumed.rounds] == [1, 2, 3]
    assert resumed.stopped == "target"
    state = json.loads((tmp_path / "rounds.json").read_text())
    assert state["result"]["checkpoint"].endswith("round_03")
    # the same folder handed another starting model (a retrained baseline, same shapes) is refused
    torch.manual_seed(1)
    other = build_model(spec).eval()
    with pytest.raises(PruningError, match="started from another model"):
        run_prune_loop(LoopInputs(other, spec, [], train, val), tmp_path, loop_settings(max_rounds=6),
                       evaluator=ScriptedEvaluator([50.0]))


def test_comparison_of_a_model_with_itself_and_with_a_pruned_copy(tiny_data, tmp_path):
    from core.compare import compare_models, cost_row

    train, val, test, classes = tiny_data
    model, spec = fresh(classes)
    before = save_checkpoint(tmp_path / "before", model, spec)
    same = compare_models(before, before, val, classes)
    assert (same.per_image["change"].fillna(0) == 0).all()
    assert np.array_equal(same.before, same.after) and same.truth.shape == same.before.shape
    step = prune_step(pruning_context(model, (SIZE, SIZE), 3, calibration(), classes), resolve_method("uniform-l1"), 0.5)
    after = save_checkpoint(tmp_path / "after", model, spec, step.history)
    diff = compare_models(before, after, val, classes)
    changes = diff.per_image["change"].dropna().tolist()
    assert changes == sorted(changes)  # worst first
    assert list(diff.per_class["class"]) == classes
    cost_before, cost_after = cost_row(before, runs=2), cost_row(after, runs=2)
    assert cost_after["macs"] < cost_before["macs"] and cost_after["params"] < cost_before["params"]
    assert cost_after["size_bytes"] < cost_before["size_bytes"] and cost_after["latency_ort_ms"] > 0


def test_pruned_copy_follows_the_allocation_and_leaves_the_original():
    from core.allocation.baselines import allocate_uniform
    from core.allocation.cost import CostModel
    from core.models.graph import PruningGraph
    from core.pruning.step import pruned_copy

    torch.manual_seed(0)
    model = build_model(ModelSpec(classes=CLASSES, input_size=(SIZE, SIZE))).eval()
    before = macs_of(model)
    graph = PruningGraph(model, torch.zeros(1, 3, SIZE, SIZE))
    allocation = allocate_uniform(graph, CostModel(graph), 0.6)
    copy = pruned_copy(model, (SIZE, SIZE), 3, allocation.kept)
    assert macs_of(model) == before
    assert macs_of(copy) == pytest.approx(allocation.predicted["macs"], rel=0.02)
    assert copy(torch.zeros(1, 3, SIZE, SIZE)).shape == (1, 3, SIZE, SIZE)


def test_recovery_runs_on_the_last_accepted_round_and_becomes_the_result(tiny_data, tmp_path):
    train, val, test, classes = tiny_data
    model, spec = fresh(classes)
    # unpruned 50.0; round 1 keeps (49.5), round 2 breaks tolerance (47.0): recovery starts from round 1
    settings = loop_settings(finetune_epochs=1, recover_epochs=2, recover_lr=5e-4, recover_distill_weight=0.5)
    result = run_prune_loop(LoopInputs(model, spec, [], train, val, test), tmp_path, settings,
                            evaluator=ScriptedEvaluator([50.0, 49.5, 47.0, 49.8]))
    assert [r.accepted for r in result.rounds] == [True, False]
    recovery = result.recovery
    assert recovery["from_round"] == 1 and recovery["epochs"] == 2 and recovery["lr"] == 5e-4
    assert recovery["distill_weight"] == 0.5 and recovery["precision"] in ("bf16", "fp32")
    assert recovery["defect_miou"] == 49.8 and recovery["drop"] == pytest.approx(0.2)
    assert result.result["checkpoint"] == recovery["checkpoint"] and recovery["checkpoint"].endswith("recovered")
    assert result.result["pre_recovery"]["checkpoint"] == result.rounds[0].checkpoint
    assert result.result["pre_recovery"]["drop"] == pytest.approx(0.5)
    assert result.result["test"] is not None and result.result["pre_recovery"]["test"] is not None
    assert result.rounds[0].distill_weight == 0.0 and result.rounds[0].precision in ("bf16", "fp32")
    recovered = load_checkpoint(recovery["checkpoint"])
    assert macs_of(recovered.model) == result.rounds[0].macs
    before = load_checkpoint(result.rounds[0].checkpoint).model
    assert any(not torch.equal(a, b) for a, b in zip(recovered.model.state_dict().values(),
                                                     before.state_dict().values()))
    state = json.loads((tmp_path / "rounds.json").read_text())
    assert state["recovery"]["checkpoint"] == recovery["checkpoint"] and state["result"] == result.result


class Killed(Exception):
    pass


def test_a_recovery_killed_midway_is_run_again_on_resume_without_redoing_rounds(tiny_data, tmp_path):
    train, val, test, classes = tiny_data
    settings = loop_settings(max_rounds=2, recover_epochs=2)

    def kill_in_recovery(fraction: float, message: str) -> bool:
        if message.startswith("recovery"):
            raise Killed()
        return False

    model, spec = fresh(classes)
    with pytest.raises(Killed):
        run_prune_loop(LoopInputs(model, spec, [], train, val), tmp_path, settings, progress=kill_in_recovery,
                       evaluator=ScriptedEvaluator([50.0]))
    rounds_before = read_rounds(tmp_path)
    assert len(rounds_before) == 2 and "recovery" not in json.loads((tmp_path / "rounds.json").read_text())
    stamps = [Path(r.checkpoint).stat().st_mtime_ns for r in rounds_before]

    # a user's stop during the recovery: no recovery recorded, the rounds' result stands, no test
    model, spec = fresh(classes)
    stopped = run_prune_loop(LoopInputs(model, spec, [], train, val, test), tmp_path, settings,
                             progress=lambda f, m: m.startswith("recovery"), evaluator=ScriptedEvaluator([50.0]))
    assert stopped.stopped == "user" and stopped.recovery is None and "test_skipped" in stopped.result

    model, spec = fresh(classes)
    resumed = run_prune_loop(LoopInputs(model, spec, [], train, val), tmp_path, settings,
                             evaluator=ScriptedEvaluator([50.0]))
    assert [r.round for r in resumed.rounds] == [1, 2]
    assert [Path(r.checkpoint).stat().st_mtime_ns for r in resumed.rounds] == stamps  # rounds not redone
    assert resumed.recovery is not None and resumed.recovery["from_round"] == 2
    assert load_checkpoint(resumed.result["checkpoint"]).model is not None
    # run once more: the recorded recovery is reused, not repeated
    mtime = (Path(resumed.recovery["checkpoint"]) / "weights.safetensors").stat().st_mtime_ns
    model, spec = fresh(classes)
    again = run_prune_loop(LoopInputs(model, spec, [], train, val), tmp_path, settings,
                           evaluator=ScriptedEvaluator([50.0]))
    assert again.recovery == resumed.recovery
    assert (Path(again.recovery["checkpoint"]) / "weights.safetensors").stat().st_mtime_ns == mtime


def test_distilled_rounds_say_so_and_bad_recovery_settings_are_refused(tiny_data, tmp_path):
    train, val, test, classes = tiny_data
    model, spec = fresh(classes)
    finetune = TrainConfig(epochs=1, batch_size=4, max_steps_per_epoch=1, patience=None, distill_weight=0.5)
    result = run_prune_loop(LoopInputs(model, spec, [], train, val), tmp_path,
                            loop_settings(max_rounds=1, finetune_epochs=1, finetune=finetune),
                            evaluator=ScriptedEvaluator([50.0]))
    assert result.rounds[0].distill_weight == 0.5
    for bad, needle in ((dict(recover_epochs=-1), "recovery epochs"), (dict(recover_lr=float("nan")), "learning rate"),
                        (dict(recover_distill_weight=2.0), "distillation weight"),
                        (dict(finetune=TrainConfig(precision="fp16")), "precision")):
        with pytest.raises(PruningError, match=needle):
            loop_settings(**bad).validate()


@pytest.mark.parametrize("method", ["collaborative", "sensitivity"])
def test_allocators_run_their_forward_passes_in_the_asked_precision(method):
    torch.manual_seed(0)
    model = build_model(ModelSpec(classes=CLASSES, input_size=(SIZE, SIZE))).eval()
    seen: set[torch.dtype] = set()
    model.segmentation_head.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    spec = resolve_method("collaborative", allocator="sensitivity") if method == "sensitivity" else resolve_method(method)
    before = macs_of(model)
    prune_step(pruning_context(model, (SIZE, SIZE), 3, calibration(), CLASSES,
                               settings=StepSettings(scoring=ScoringNetworkSettings(steps=2), precision="bf16")),
               spec, 0.5)
    assert torch.bfloat16 in seen
    assert 1 - macs_of(model) / before == pytest.approx(0.5, abs=0.03)


def test_a_fixed_allocation_is_the_first_rounds_cut_exactly(tiny_data, tmp_path):
    from core.models.graph import PruningGraph

    train, val, _, classes = tiny_data
    model, spec = fresh(classes)
    graph = PruningGraph.traced(model, (SIZE, SIZE), 3)
    # an uneven allocation no allocator would make: every other group keeps a quarter
    kept = {g.name: g.channels if i % 2 else max(g.channels // 4, 1) for i, g in enumerate(graph.groups)}
    result = run_prune_loop(LoopInputs(model, spec, [], train, val), tmp_path,
                            loop_settings(allocation=kept, target=0.3, max_rounds=3),
                            evaluator=ScriptedEvaluator([50.0]))
    first = result.rounds[0]
    assert first.step["allocation"]["kept"] == kept and first.step["allocation"]["allocator"] == "fixed"
    after = PruningGraph.traced(load_checkpoint(first.checkpoint).model, (SIZE, SIZE), 3)
    assert {g.name: g.channels for g in after.groups} == kept


def test_a_fixed_allocation_for_another_model_is_refused_by_name():
    from core.models.graph import PruningGraph
    from core.pruning.step import AllocationFileError, FixedAllocation

    model, _ = fresh(CLASSES)
    graph = PruningGraph.traced(model, (SIZE, SIZE), 3)
    channels = {g.name: g.channels for g in graph.groups}
    first = graph.groups[0].name
    FixedAllocation(kept=channels, channels=channels, allocator="uniform", target=0.5).check(graph, "a.json")
    for wrong in ({**channels, first: channels[first] * 2}, {"encoder.other": 8, **channels}):
        with pytest.raises(AllocationFileError, match="a.json was made for another model"):
            FixedAllocation(kept=wrong, channels=wrong, allocator="uniform", target=0.5).check(graph, "a.json")
    with pytest.raises(AllocationFileError, match="is not an allocation file"):
        FixedAllocation.from_json({"kept": {first: 0}, "channels": {first: 4}, "target": 0.5}, "b.json")


def test_progress_counts_the_rounds_the_target_needs_not_the_round_limit(tiny_data, tmp_path):
    train, val, _, classes = tiny_data
    model, spec = fresh(classes)
    reports = []
    # step 0.3 to a 50% target: 70%, then 49% of the MACs left, two rounds of the ten allowed
    result = run_prune_loop(LoopInputs(model, spec, [], train, val), tmp_path,
                            loop_settings(target=0.5, step=0.3, max_rounds=10),
                            progress=lambda fraction, message: reports.append((fraction, message)) and False,
                            evaluator=ScriptedEvaluator([50.0]))
    assert [r.round for r in result.rounds] == [1, 2] and result.stopped == "target"
    done = {message: fraction for fraction, message in reports if message.endswith(" done")}
    assert done["round 1 done"] == pytest.approx(0.5, abs=0.01)
    assert done["round 2 done"] == pytest.approx(1.0, abs=0.01)
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions)  # never back


def test_rounds_needed_follows_the_step_the_milestones_and_the_round_limit():
    from core.pruning.loop import RunBase, rounds_needed

    base = RunBase(macs=1000.0, params=100.0, defect_miou=50.0)
    assert rounds_needed(loop_settings(target=0.5, step=0.3), base, 1000.0, 100.0) == 2
    # 700, 490, 343, 240, then 200 (the target): five; milestones at 10 and 20% land two rounds first
    assert rounds_needed(loop_settings(target=0.8, step=0.3), base, 1000.0, 100.0) == 5
    assert rounds_needed(loop_settings(target=0.8, step=0.3, milestones=(0.1, 0.2)), base, 1000.0, 100.0) == 6
    assert rounds_needed(loop_settings(target=0.8, step=0.3, max_rounds=3), base, 1000.0, 100.0) == 3
    assert rounds_needed(loop_settings(target=0.8, step=0.3), base, 300.0, 30.0) == 2  # from 70% fewer
    assert rounds_needed(loop_settings(target=0.5, step=0.3, target_kind="params"), base, 1000.0, 100.0) == 2
