"""The Layer importance page's predicted latency beside the MACs: absent until this machine's
table is measured (a button), then answering every slider move from the table."""

from __future__ import annotations

from page_helpers import open_page, tiny_steel_model


def metric(at, label: str):
    return next(m for m in at.metric if m.label == label)


def test_predicted_latency_appears_once_the_table_is_measured_and_follows_the_slider(tmp_path):
    from core.allocation.latency import LatencySettings

    LatencySettings().path().unlink(missing_ok=True)  # this worker's workspace: no table yet
    at = open_page("importance", tiny_steel_model(tmp_path))
    assert not at.error
    assert metric(at, "Predicted latency").value == "not measured"
    at.button(key="importance_latency_measure").click().run()
    assert not at.exception and not at.error
    assert LatencySettings().path().is_file()
    at.slider(key="importance_target").set_value(50).run()
    half = metric(at, "Predicted latency")
    assert half.value.endswith(" ms") and half.proto.delta.startswith("-")
    assert not [b for b in at.button if b.key == "importance_latency_measure"]  # measured: no button
    at.slider(key="importance_target").set_value(90).run()
    assert not at.exception and not at.error
    tight = metric(at, "Predicted latency")
    assert float(tight.value.split()[0]) < float(half.value.split()[0])
    assert metric(at, "MACs").value  # beside the MACs, which still answer
    # ONNX Runtime is another table: not measured yet
    at.radio(key="importance_latency_engine").set_value("ONNX Runtime").run()
    assert not at.exception and not at.error
    assert metric(at, "Predicted latency").value == "not measured"
    assert [b for b in at.button if b.key == "importance_latency_measure"]
