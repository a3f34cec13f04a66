"""Error paths no other test reaches: each bad input gets its own case, so one failure hides no other."""

from __future__ import annotations

import subprocess
import sys

import datasets
import pytest
import torch
from torch import nn

from vaccine_trainer.config import parse_layer_spec
from vaccine_trainer.data import load_records
from vaccine_trainer.evaluation import parse_number
from vaccine_trainer.perturbation import HiddenStateHooks, hidden_output


class ReturnsADict(nn.Module):
    def forward(self, x):
        return {"hidden": x}


def test_hidden_output_refuses_a_module_returning_neither_tensor_nor_tuple():
    with pytest.raises(TypeError, match="tensor or a tuple starting with one, got dict"):
        hidden_output({"hidden": torch.ones(2)})
    hooks = HiddenStateHooks([ReturnsADict()])
    with hooks.installed_for(), hooks.capturing(), pytest.raises(TypeError, match="vaccine_modules"):
        hooks.modules[0](torch.ones(2))
    assert hidden_output((torch.ones(2), None)).shape == (2,)


def test_perturbation_of_the_wrong_shape_is_an_error_not_a_broadcast():
    layer = nn.Linear(4, 4)
    hooks = HiddenStateHooks([layer])
    with hooks.installed_for(), hooks.perturbing([torch.ones(1, 4)]):
        with pytest.raises(RuntimeError, match="batch changed"):
            layer(torch.ones(3, 4))  # (1, 4) would broadcast silently onto (3, 4)


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


def test_gsm8k_hub_answers_with_hashes_parse():
    """The hub's GSM8K answers end with '#### 72' (the shared files carry final_answer instead)."""
    assert parse_number("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == "72"
    assert parse_number("So the total is 1,234 dollars.\n#### 1,234") == "1234"


@pytest.fixture
def saved_splits(tmp_path):
    rows = {"instruction": ["a", "b"], "output": ["x", "y"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dict"))
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "single"))
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "rows.parquet"))
    return tmp_path


def test_load_records_reads_parquet_and_save_to_disk(saved_splits):
    assert load_records(str(saved_splits / "rows.parquet"))["instruction"] == ["a", "b"]
    assert load_records(str(saved_splits / "dict"), "train")["output"] == ["x", "y"]
    assert len(load_records(str(saved_splits / "single"), "test")) == 2  # one split: taken whatever is asked


@pytest.mark.parametrize("source, error, message", [
    ("dict", ValueError, r"has splits \['train'\]; split 'test' is not one of them"),
    ("missing.parquet", FileNotFoundError, "does not exist"),
    ("rows.txt", ValueError, "Unsupported data file"),
])
def test_load_records_errors(saved_splits, source, error, message):
    if source == "rows.txt":
        (saved_splits / source).write_text("a\n")
    with pytest.raises(error, match=message):
        load_records(str(saved_splits / source), "test")


def test_python_dash_m_vaccine_trainer_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "vaccine_trainer", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    for name in ("align", "finetune", "evaluate", "judge-check", "pipeline", "grid"):
        assert f"  {name}" in done.stdout, name
    unknown = subprocess.run([sys.executable, "-m", "vaccine_trainer", "nope"], capture_output=True, text=True,
                             timeout=120)
    assert unknown.returncode == 2 and "unknown command 'nope'" in unknown.stderr
