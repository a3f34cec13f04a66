"""AlignmentDriftCallback on its own, with a plain transformers Trainer."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from testing_utils import LAYER_PATHS, tiny_lora_model, tiny_model, token_rows, training_args
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.data.data_collator import default_data_collator

from vaccine_trainer import AlignmentDriftCallback
from vaccine_trainer.callbacks import (
    DRIFT_EXCLUDING_FIRST_TOKEN_KEY,
    DRIFT_FRACTION_KEY,
    DRIFT_KEY,
    LOSS_KEY,
    MEDIAN_TOKEN_DRIFT_KEY,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def layer_outputs(model, rows, arch="llama", attention=False) -> list[torch.Tensor]:
    """Hidden states of each decoder layer (or its attention block), by hand-written module paths."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    path, attention_name = LAYER_PATHS[arch]
    modules = [layer.get_submodule(attention_name) if attention else layer for layer in base.get_submodule(path)]
    outputs = []
    handles = [m.register_forward_hook(lambda mod, args, out: outputs.append(out[0] if isinstance(out, tuple) else out))
               for m in modules]
    try:
        with torch.no_grad():
            model.eval()(**{k: v for k, v in default_data_collator(rows).items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    return outputs


class Recorder(TrainerCallback):
    """Stands in for a report_to integration: what does a logger placed after the callback see?"""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


@pytest.mark.parametrize("target", ["layer", "attention"])
def test_drift_and_loss_match_an_independent_computation(tmp_path, target):
    rows = token_rows(4)
    model = tiny_lora_model()
    aligned = copy.deepcopy(model)
    recorder = Recorder()
    args = TrainingArguments(**training_args(tmp_path, max_steps=3, per_device_train_batch_size=2,
                                             optim="adamw_torch", learning_rate=1e-2))
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[recorder])
    callback = AlignmentDriftCallback(rows[:3], target=target, batch_size=2).attach(trainer)
    trainer.train()

    logged = [log for log in trainer.state.log_history if DRIFT_KEY in log]
    assert [log["step"] for log in logged] == [0, 1, 2, 3]
    assert logged[0][DRIFT_KEY] == 0.0
    attention = target == "attention"
    expected_drift = sum(((now - then) ** 2).sum().item() for now, then in zip(
        layer_outputs(model, rows[:3], attention=attention), layer_outputs(aligned, rows[:3], attention=attention)))
    assert logged[-1][DRIFT_KEY] == pytest.approx(expected_drift, rel=1e-5)
    assert logged[-1][DRIFT_KEY] > 0
    energy = sum((then ** 2).sum().item() for then in layer_outputs(aligned, rows[:3], attention=attention))
    assert logged[-1][DRIFT_FRACTION_KEY] == pytest.approx(expected_drift / energy, rel=1e-5)
    assert logged[0][DRIFT_FRACTION_KEY] == 0.0
    per_token = [value for now, then in zip(layer_outputs(model, rows[:3], attention=attention),
                                            layer_outputs(aligned, rows[:3], attention=attention))
                 for value in (((now - then) ** 2).sum(-1) / (then ** 2).sum(-1)).flatten().tolist()]
    assert logged[-1][MEDIAN_TOKEN_DRIFT_KEY] == pytest.approx(statistics.median(per_token), rel=1e-5)
    assert logged[0][MEDIAN_TOKEN_DRIFT_KEY] == 0.0
    after_first = sum(((now - then)[:, 1:] ** 2).sum().item() for now, then in zip(
        layer_outputs(model, rows[:3], attention=attention), layer_outputs(aligned, rows[:3], attention=attention)))
    assert logged[-1][DRIFT_EXCLUDING_FIRST_TOKEN_KEY] == pytest.approx(after_first, rel=1e-5)
    assert 0 < after_first < expected_drift
    with torch.no_grad():
        expected_loss = model.eval()(**default_data_collator(rows[:3])).loss.item()  # equal lengths: token mean
    assert logged[-1][LOSS_KEY] == pytest.approx(expected_loss, rel=1e-5)
    # A logger that runs after the callback (as report_to integrations do) sees both values.
    assert [log[DRIFT_KEY] for log in recorder.seen if "loss" in log] == [log[DRIFT_KEY] for log in logged[1:]]
    assert callback.history[-1][DRIFT_KEY] == logged[-1][DRIFT_KEY]


def test_measure_leaves_training_state_alone(tmp_path):
    rows = token_rows(2)
    model = tiny_lora_model().train()
    callback = AlignmentDriftCallback(rows)
    callback.cache_reference(model)
    assert model.training  # train mode restored
    assert all(p.grad is None for p in model.parameters())
    assert callback.measure(model)[DRIFT_KEY] == 0.0
    model.eval()
    callback.measure(model)
    assert not model.training  # eval mode restored too
    assert not any(h for m in model.modules() for h in (m._forward_hooks,))  # hooks removed


def test_drift_counts_only_real_tokens_and_uses_the_labels(tmp_path):
    """Padding must not add drift; labels of -100 (e.g. the prompt) stay out of the loss."""
    model = tiny_model()
    short = {"input_ids": token_rows(1, length=5)[0]["input_ids"]}
    long = {"input_ids": token_rows(1, length=9, seed=1)[0]["input_ids"], "labels": [-100] * 4 + list(range(5, 10))}
    callback = AlignmentDriftCallback([short, long], batch_size=2)
    callback.cache_reference(model)
    assert callback.reference[0].shape == (5 + 9, 3, 32)  # valid tokens x layers x hidden
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([long["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(long["labels"][1:])
        nll_long = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        logits = model(input_ids=torch.tensor([short["input_ids"]])).logits[0, :-1]
        nll_short = torch.nn.functional.cross_entropy(logits, torch.tensor(short["input_ids"][1:]), reduction="sum")
    expected = (nll_long + nll_short).item() / (5 + 4)
    assert callback.measure(model)[LOSS_KEY] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_drift_excluding_first_token_leaves_out_each_rows_first_real_token(padding_side):
    """Rows of different lengths, padded on either side: the first token left out is each row's first real
    one, and the value is the sum of the rows measured one by one without padding."""
    model = tiny_model()
    rows = [{"input_ids": ids} for ids in (token_rows(1, length=5)[0]["input_ids"],
                                           token_rows(1, length=9, seed=1)[0]["input_ids"])]

    def collate(batch):
        width = max(len(row["input_ids"]) for row in batch)
        ids, mask = [], []
        for row in batch:
            pad = [0] * (width - len(row["input_ids"]))
            ids.append(pad + row["input_ids"] if padding_side == "left" else row["input_ids"] + pad)
            mask.append([0] * len(pad) + [1] * len(row["input_ids"]) if padding_side == "left"
                        else [1] * len(row["input_ids"]) + [0] * len(pad))
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}

    callback = AlignmentDriftCallback(rows, batch_size=2, data_collator=collate)
    callback.cache_reference(model)
    aligned = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    expected = sum(((now - then)[:, 1:] ** 2).sum().item()
                   for row in rows
                   for now, then in zip(layer_outputs(model, [row]), layer_outputs(aligned, [row])))
    assert callback.measure(model)[DRIFT_EXCLUDING_FIRST_TOKEN_KEY] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("build, error, message", [
    (lambda: AlignmentDriftCallback([]), ValueError, "empty"),
    (lambda: AlignmentDriftCallback([{"text": "hello"}]), ValueError, "must be tokenized"),
    (lambda: AlignmentDriftCallback(token_rows(1), target="mlp"), ValueError, "target"),
    (lambda: AlignmentDriftCallback(token_rows(1)).measure(tiny_model()), RuntimeError, "cache_reference"),
    (lambda: AlignmentDriftCallback(token_rows(1), reference_without_adapter=True).cache_reference(tiny_model()),
     ValueError, "needs a PEFT model"),
], ids=["empty", "untokenized", "target", "no-reference", "no-adapter"])
def test_bad_input_is_refused(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_logged_at_evaluation_steps_too(tmp_path):
    rows = token_rows(4)
    args = TrainingArguments(**training_args(tmp_path, max_steps=4, per_device_train_batch_size=2, logging_steps=100,
                                             eval_strategy="steps", eval_steps=2, optim="adamw_torch",
                                             learning_rate=1e-2))
    trainer = Trainer(model=tiny_lora_model(), args=args, train_dataset=rows, eval_dataset=rows[:2])
    AlignmentDriftCallback(rows[:2]).attach(trainer)
    trainer.train()
    evaluations = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert [log["step"] for log in evaluations] == [2, 4]
    assert all(log[DRIFT_KEY] > 0 and LOSS_KEY in log for log in evaluations)


def test_median_token_drift_ignores_nan_and_averages_the_middle_pair():
    from vaccine_trainer.callbacks import _median

    assert _median(torch.tensor([3.0, float("nan"), 1.0, 2.0])) == 2.0
    assert _median(torch.tensor([4.0, 1.0, 3.0, 2.0])) == 2.5
    assert math.isnan(_median(torch.tensor([float("nan")])))


def test_recomputing_the_reference_without_the_adapter_gives_the_cached_values():
    """Stage 2's drift keeps no reference on the host: it recomputes h_aligned with the adapter disabled, batch by
    batch, and must give exactly what the cached reference of the same base model gives."""
    model = tiny_lora_model()  # init_lora_weights=False: the adapter moves the hidden states
    rows = [{"input_ids": row["input_ids"]} for row in token_rows(5, length=7)] + [
        {"input_ids": token_rows(1, length=4, seed=2)[0]["input_ids"]}]
    recomputed = AlignmentDriftCallback(rows, batch_size=2, reference_without_adapter=True)
    recomputed.cache_reference(model)
    assert recomputed.reference is None  # nothing cached
    cached = AlignmentDriftCallback(rows, batch_size=2)
    with model.disable_adapter():
        cached.cache_reference(model)
    got, want = recomputed.measure(model), cached.measure(model)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    assert got[DRIFT_KEY] > 0
