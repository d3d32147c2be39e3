"""The prune request's target: 0.8 fewer MACs by default (a real default of ``target_macs``,
which the Prune page's form and the loop read), yielding to any other target given."""

from __future__ import annotations

import pytest

from core.services.prune import PruneRequest
from core.services.request import ParameterError


def test_the_macs_target_is_the_default_and_yields_to_another_target():
    assert PruneRequest(checkpoint="/c").target_macs == 0.8
    assert PruneRequest(checkpoint="/c").loop_settings("cpu").target == 0.8
    by_params = PruneRequest(checkpoint="/c", target_params=0.5)
    assert (by_params.target_macs, by_params.target_params) == (None, 0.5)
    assert "target_macs" not in by_params.to_json()  # what a job stores names one target
    assert PruneRequest.from_json(by_params.to_json()) == by_params
    assert by_params.loop_settings("cpu").target_kind == "params"
    assert PruneRequest(checkpoint="/c", target_latency=5.0).target_macs is None
    # a target other than the default beside another is refused, as on the command line
    with pytest.raises(ParameterError, match="--target-params: not allowed with argument --target-macs"):
        PruneRequest(checkpoint="/c", target_macs=0.5, target_params=0.5)
    with pytest.raises(ParameterError, match="--target-latency: not allowed with argument --target-params"):
        PruneRequest(checkpoint="/c", target_params=0.5, target_latency=5.0)
