"""`--judge learned-pair`: the offline model trained as a (prompt, answer) classifier, cached, on a tiny model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from testing_utils import HARMFUL_ANSWERS, SAFE_ANSWERS, save_tiny_causal_lm

from vaccine_harness.commands.judge_names import make_judge
from vaccine_harness.evaluation.pair_judge import PairClassifierJudge, PairJudgeSettings

SETTINGS = PairJudgeSettings(train_pairs=24, epochs=4, learning_rate=5e-3, batch_size=4, max_length=48, lora_r=4)


@pytest.fixture
def tiny_base(tmp_path):
    return save_tiny_causal_lm(tmp_path / "base", [*HARMFUL_ANSWERS, *SAFE_ANSWERS, "Question: Answer:"])


@pytest.mark.usefixtures("single_thread")
def test_the_pair_judge_trains_once_caches_and_reads_the_pair(labelled_dir, tiny_base, tmp_path):
    cache = tmp_path / "cache"
    judge = PairClassifierJudge(labelled_dir, base_model=tiny_base, cache_dir=cache, settings=SETTINGS, device="cpu")
    prompts = ["question ?"] * (len(HARMFUL_ANSWERS) + len(SAFE_ANSWERS))
    scores = judge.scores(prompts, [*HARMFUL_ANSWERS, *SAFE_ANSWERS])
    assert judge.trained_now and len(list(cache.glob("pair-classifier-*/adapter_config.json"))) == 1
    harmful, safe = scores[:len(HARMFUL_ANSWERS)], scores[len(HARMFUL_ANSWERS):]
    assert sum(harmful) / len(harmful) > sum(safe) / len(safe)  # it learned the labels of its training pairs
    assert judge(["q", "q"], ["", HARMFUL_ANSWERS[0]]) == [False, scores[0] >= SETTINGS.threshold]  # empty: not harmful

    again = PairClassifierJudge(labelled_dir, base_model=tiny_base, cache_dir=cache, settings=SETTINGS, device="cpu")
    assert again.scores(prompts, [*HARMFUL_ANSWERS, *SAFE_ANSWERS]) == pytest.approx(scores, abs=1e-5)
    assert not again.trained_now
    other = PairClassifierJudge(labelled_dir, base_model=tiny_base, cache_dir=cache, device="cpu",
                                settings=replace(SETTINGS, seed=1))
    assert other._folder() != judge._folder()  # other settings: another classifier


def test_the_pair_judge_by_name_needs_the_data_folder(labelled_dir, tmp_path):
    with pytest.raises(ValueError, match="--judge_data_dir"):
        make_judge("learned-pair")
    with pytest.raises(FileNotFoundError, match="missing"):
        make_judge("learned-pair", data_dir=tmp_path / "empty")
    assert isinstance(make_judge("learned-pair", data_dir=labelled_dir, cache_dir=tmp_path), PairClassifierJudge)


@pytest.mark.usefixtures("single_thread")
def test_the_reloaded_pair_judge_has_the_trained_head_and_says_nothing_alarming(labelled_dir, tiny_base,
                                                                                 tmp_path):
    """The base loads with a fresh head (transformers would report it "newly initialized"); the adapter restores the
    trained one, so that report is silenced and the restored head is checked against the saved file."""
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    PairClassifierJudge(labelled_dir, base_model=tiny_base, cache_dir=cache, settings=SETTINGS, device="cpu").classifier
    import logging

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    transformers_root = logging.getLogger("transformers")
    transformers_root.addHandler(handler)
    try:
        again = PairClassifierJudge(labelled_dir, base_model=tiny_base, cache_dir=cache, settings=SETTINGS,
                                    device="cpu")
        model, _ = again.classifier
    finally:
        transformers_root.removeHandler(handler)
    assert not any("MISSING" in m or "newly initialized" in m for m in messages), messages
    saved = load_file(next(cache.glob("pair-classifier-*/adapter_model.safetensors")))
    (saved_head,) = [tensor for name, tensor in saved.items() if name.endswith("score.weight")]
    (live_head,) = [p for n, p in model.named_parameters() if "score.modules_to_save" in n and n.endswith("weight")]
    assert torch.equal(live_head.detach().cpu(), saved_head)
    fresh = torch.nn.Linear(saved_head.shape[1], 2, bias=False).weight  # negative control: a new head differs
    assert not torch.equal(fresh.detach(), saved_head)
