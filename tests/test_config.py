"""`config`: Vaccine's settings, checked when the arguments are built."""

from __future__ import annotations

import pytest

from vaccine_trainer import VaccineTrainingArguments
from vaccine_trainer.config import parse_layer_spec


@pytest.mark.parametrize("spec, layers, expected", [
    ("-1", 4, [3]),
    ("-2--1", 4, [2, 3]),
    ("0,-1", 4, [0, 3]),
    ([0, 2], 4, [0, 2]),
    ((1,), 4, [1]),
    ([-1, 0], 4, [0, 3]),
    (2, 4, [2]),
])
def test_parse_layer_spec_negative_and_list_forms(spec, layers, expected):
    assert parse_layer_spec(spec, layers) == expected


@pytest.mark.parametrize("spec, message", [
    ([], "non-empty list of ints"),
    ([1, "2"], "non-empty list of ints"),
    ([True], "non-empty list of ints"),
    (1.5, "string like '16-29' or a list of ints"),
    ([-5], "names layers"),
    ("0-4", "names layers"),
])
def test_parse_layer_spec_refusals(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_spec(spec, 4)


@pytest.mark.parametrize("settings, message", [
    ({"rho": -1.0}, "rho must be a finite number >= 0"),
    ({"rho": float("nan")}, "rho must be a finite number >= 0"),
    ({"rho": float("inf")}, "rho must be a finite number >= 0"),
    ({"vaccine_target": "mlp"}, "vaccine_target must be one of"),
    ({"vaccine_norm": "l1"}, "vaccine_norm must be one of"),
    ({"vaccine_norm": "relative"}, r"rho=2.0 would push it by 200%. Set rho to a small fraction"),  # the default rho
    ({"vaccine_perturbation": "uniform"}, "vaccine_perturbation must be one of"),
    ({"vaccine_layers": "1-x"}, "malformed"),
    ({"vaccine_layers": "3-1"}, "empty"),
    ({"vaccine_modules": "layers.(["}, "not a valid regular expression"),
])
def test_bad_settings_are_refused_when_the_arguments_are_built(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        VaccineTrainingArguments(output_dir=str(tmp_path), **settings)
