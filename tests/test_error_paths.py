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
from vaccine_harness.evaluation import parse_number
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


@pytest.mark.parametrize("flag, func", [("gradient_checkpointing", "_gradient_checkpointing_func"),
                                        ("activation_checkpointing", "_activation_checkpointing_func")])
@pytest.mark.parametrize("reentrant", [True, False])
def test_reentrant_checkpointing_is_seen_under_both_spellings(flag, func, reentrant):
    """transformers 5 names the module flags `gradient_checkpointing`; v6 renames them: both are read."""
    import functools

    from vaccine_trainer.perturbation import uses_reentrant_checkpointing

    layer = nn.Linear(2, 2)
    setattr(layer, flag, True)
    setattr(layer, func, functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=reentrant))
    model = nn.Sequential(layer).train()
    assert uses_reentrant_checkpointing(model) is reentrant
    setattr(layer, flag, False)
    assert uses_reentrant_checkpointing(model) is False


@pytest.mark.parametrize("settings, message", [
    ({"lora_r": 0}, "lora_r must be a positive integer"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"drift_target": "mlp"}, "drift_target must be 'layer' or 'attention'"),
])
def test_aligned_sft_config_validation(tmp_path, settings, message):
    from vaccine_trainer import AlignedSFTConfig

    with pytest.raises(ValueError, match=message):
        AlignedSFTConfig(output_dir=str(tmp_path), **settings)


@pytest.fixture
def aligned_peft_model():
    from testing_utils import tiny_lora_model

    return tiny_lora_model()


@pytest.mark.parametrize("misuse, message", [
    (lambda peft_model, folder: (tiny_base(), peft_model), "Both a model and an aligned PeftModel"),
    (lambda peft_model, folder: (None, folder), "No model given"),
    (lambda peft_model, folder: (peft_model, folder), "already carries a PEFT adapter"),
], ids=["model-and-peft", "no-model", "peft-and-path"])
def test_merge_alignment_adapter_misuse(aligned_peft_model, tmp_path, misuse, message):
    from vaccine_trainer import merge_alignment_adapter

    folder = tmp_path / "adapter"
    aligned_peft_model.save_pretrained(folder)
    model, adapter = misuse(aligned_peft_model, str(folder))
    with pytest.raises(ValueError, match=message):
        merge_alignment_adapter(model, adapter)


def tiny_base():
    from testing_utils import tiny_model

    return tiny_model()


def test_classifier_judge_multi_label_takes_the_largest_harmful_probability(tmp_path):
    import transformers
    from testing_utils import tiny_tokenizer

    from vaccine_harness.evaluation import ClassifierJudge

    tokenizer = tiny_tokenizer()
    labels = {0: "safe", 1: "violence", 2: "theft"}
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, num_labels=3, id2label=labels,
                                     label2id={v: k for k, v in labels.items()},
                                     problem_type="multi_label_classification", pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    judge = ClassifierJudge(str(tmp_path / "clf"), harmful_labels=["violence", "theft"])
    assert judge.multi_label
    answers = ["make a bomb", "steal a car", "hello world"]
    with torch.no_grad():
        probabilities = torch.sigmoid(model(**tokenizer(answers, return_tensors="pt", padding=True)).logits)
    expected = probabilities[:, 1:].max(dim=1).values  # the largest harmful label, not the sum
    assert judge.scores(["p"] * 3, answers) == pytest.approx(expected.tolist(), rel=1e-4)
    judge.threshold = float(expected.median()) + 1e-6
    assert judge(["p"] * 3, answers) == [bool(s >= judge.threshold) for s in expected.tolist()]
