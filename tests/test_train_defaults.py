"""Training defaults per dataset format (issue 16): a train request leaves epochs, learning
rate and schedule to its format unless it names them, the same on the command line, in a
job's JSON and in the Data page's sentence."""

from __future__ import annotations

import pytest

from core.cli import build_parser, request_from_args
from core.data.registry import DEFAULT_FORMAT
from core.services.train import (
    DEMO_MEASURED, REAL_DATA_TRAINING, SYNTHETIC_TRAINING, TrainRequest, describe_training_defaults,
    recommended_training,
)


def test_synthetic_families_train_with_the_demo_settings_and_real_data_with_the_long_ones():
    assert recommended_training("synthetic-steel") == recommended_training("synthetic-tile") == SYNTHETIC_TRAINING
    assert recommended_training("neu-seg") == recommended_training("folder") == REAL_DATA_TRAINING
    assert SYNTHETIC_TRAINING != REAL_DATA_TRAINING
    recommended_training("synthetic-steel")["epochs"] = 999  # a copy: the caller cannot change the defaults
    assert recommended_training("synthetic-steel") == SYNTHETIC_TRAINING


@pytest.mark.parametrize("fmt, expected", [("synthetic-steel", SYNTHETIC_TRAINING), ("neu-seg", REAL_DATA_TRAINING)])
def test_a_request_fills_what_it_leaves_unset_from_its_format(fmt, expected):
    request = TrainRequest(format=fmt, out="/o")
    assert {name: getattr(request, name) for name in expected} == expected
    # what a job stores says what was trained, and reads back the same
    assert {name: request.to_json()[name] for name in expected} == expected
    assert TrainRequest.from_json(request.to_json(), out="/o") == request


def test_settings_a_request_names_are_kept():
    request = TrainRequest(format="synthetic-steel", out="/o", epochs=3, lr=0.01, schedule="plateau")
    assert (request.epochs, request.lr, request.schedule) == (3, 0.01, "plateau")
    partial = TrainRequest.from_json({"format": "neu-seg", "epochs": 2}, out="/o")
    assert (partial.epochs, partial.lr, partial.schedule) == (2, REAL_DATA_TRAINING["lr"], REAL_DATA_TRAINING["schedule"])


@pytest.mark.parametrize("fmt, expected", [("synthetic-steel", SYNTHETIC_TRAINING), ("neu-seg", REAL_DATA_TRAINING)])
def test_the_command_line_uses_the_formats_defaults(fmt, expected):
    args = build_parser().parse_args(["train", "--format", fmt, "--out", "/o"])
    request = request_from_args(TrainRequest, args)
    assert {name: getattr(request, name) for name in expected} == expected
    args = build_parser().parse_args(["train", "--format", fmt, "--out", "/o", "--epochs", "5"])
    assert request_from_args(TrainRequest, args).epochs == 5


def test_bad_values_are_still_refused():
    from core.services.request import ParameterError

    with pytest.raises(ParameterError, match="--epochs"):
        TrainRequest(format="synthetic-steel", out="/o", epochs=0)
    with pytest.raises(ParameterError, match="--schedule"):
        TrainRequest(format="neu-seg", out="/o", schedule="linear")


def test_the_measured_figure_is_of_the_default_dataset_and_the_sentences_say_what_the_defaults_do():
    assert DEMO_MEASURED.format == DEFAULT_FORMAT
    demo = describe_training_defaults(DEFAULT_FORMAT, (128, 128))
    assert f"{SYNTHETIC_TRAINING['epochs']} epochs" in demo and "128x128" in demo
    assert DEMO_MEASURED.sentence() in demo
    other = describe_training_defaults("synthetic-tile", (128, 128))
    assert f"on {DEFAULT_FORMAT} the same settings" in other and DEMO_MEASURED.sentence() in other
    real = describe_training_defaults("neu-seg", (200, 200))
    assert f"{REAL_DATA_TRAINING['epochs']} epochs" in real and "200x200" in real
    assert DEMO_MEASURED.sentence() not in real
