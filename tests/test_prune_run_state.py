"""`PruneRunState`: a prune run as the store mirrors it, in the loop's types (`RunBase`,
`RoundRecord`), and the model a page compares with the run's start (`best_kept`)."""

from __future__ import annotations

from core.pruning.loop import RoundRecord, RunBase
from core.runs.jobs import PruneRunState
from core.runs.store import DB_FILE, Store


def record(number: int, checkpoint: str, accepted: bool = True, **extra) -> dict:
    return {"round": number, "accepted": accepted, "macs": 100 - 10 * number, "params": 50, "macs_reduction": 0.1 * number,
            "params_reduction": 0.0, "defect_miou": 40.0 - number, "drop": float(number), "latency_ms": 2.0,
            "wall_s": 1.0, "checkpoint": checkpoint, **extra}


def stored(tmp_path, rounds: list[dict], base: dict | None = None, result: dict | None = None) -> PruneRunState:
    store = Store(tmp_path / DB_FILE)
    job_id = store.create_job("prune", {})
    run_id = store.upsert_prune_run(job_id, tmp_path / "start", tmp_path / "out", "uniform-l1", {})
    store.update_prune_run(run_id, base=base, result=result)
    store.save_rounds(run_id, rounds)
    return PruneRunState.of(store, job_id)


def test_the_run_reads_back_in_the_loops_types(tmp_path):
    first, second = str(tmp_path / "round_01"), str(tmp_path / "round_02")
    state = stored(tmp_path, [record(1, first, val={"defect_miou": 39.0}, precision="bf16", distill_weight=0.5),
                              record(2, second, accepted=False)],  # a record written before val and precision
                   base={"macs": 100, "params": 50, "defect_miou": 40.0, "latency_ms": 3.0, "unknown": 1})
    assert isinstance(state.base, RunBase) and (state.base.macs, state.base.latency_ms) == (100, 3.0)
    assert all(isinstance(r, RoundRecord) for r in state.rounds)
    one, two = state.rounds
    assert (one.round, one.precision, one.distill_weight, one.val) == (1, "bf16", 0.5, {"defect_miou": 39.0})
    assert (two.precision, two.val, two.accepted) == ("", {}, False)
    assert one.checkpoint == first and [r.round for r in state.kept] == [1]


def test_the_best_kept_model_is_the_result_else_the_last_kept_round(tmp_path):
    first, second = str(tmp_path / "round_01"), str(tmp_path / "round_02")
    rounds = [record(1, first), record(2, second), record(3, str(tmp_path / "round_03"), accepted=False)]
    assert stored(tmp_path / "a", []).base is None
    assert stored(tmp_path / "a", []).best_kept() == (None, "no kept round yet")
    assert stored(tmp_path / "b", rounds).best_kept() == (second, "its last kept round so far (round 2)")
    assert stored(tmp_path / "c", rounds, result={"checkpoint": first}).best_kept() == (first, "its result (round 1)")
    assert stored(tmp_path / "d", rounds, result={"checkpoint": None, "stopped": "tolerance"}).best_kept() == (
        None, "no kept round (its result is the unpruned model)")
    recovered = str(tmp_path / "recovered")
    state = stored(tmp_path / "e", rounds, result={"checkpoint": recovered,
                                                  "recovery": {"checkpoint": recovered, "from_round": 2}})
    assert state.recovery == {"checkpoint": recovered, "from_round": 2} and "recovery" not in state.result
    assert state.best_kept() == (recovered, "its result (round 2 after its recovery phase)")
