"""`--judge learned-pair`: the offline model trained as a (prompt, answer) classifier, cached, on a tiny model."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import save_tiny_causal_lm
from test_judges import HARMFUL, SAFE, labelled_dir  # noqa: F401  (a tiny stand-in for the labelled pairs)

from vaccine_trainer.commands.judge_names import make_judge
from vaccine_trainer.evaluation.pair_judge import PairClassifierJudge, PairJudgeSettings

SETTINGS = PairJudgeSettings(train_pairs=24, epochs=4, learning_rate=5e-3, batch_size=4, max_length=48, lora_r=4)


@pytest.fixture
def tiny_base(tmp_path):
    return save_tiny_causal_lm(tmp_path / "base", [*HARMFUL, *SAFE, "Question: Answer:"])


@pytest.mark.usefixtures("single_thread")
def test_the_pair_judge_trains_once_caches_and_reads_the_pair(labelled_dir, tiny_base, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    judge = PairClassifierJudge(labelled_dir, base_model=tiny_base, cache_dir=cache, settings=SETTINGS, device="cpu")
    prompts = ["question ?"] * (len(HARMFUL) + len(SAFE))
    scores = judge.scores(prompts, [*HARMFUL, *SAFE])
    assert judge.trained_now and len(list(cache.glob("pair-classifier-*/adapter_config.json"))) == 1
    harmful, safe = scores[:len(HARMFUL)], scores[len(HARMFUL):]
    assert sum(harmful) / len(harmful) > sum(safe) / len(safe)  # it learned the labels of its training pairs
    assert judge(["q", "q"], ["", HARMFUL[0]]) == [False, scores[0] >= SETTINGS.threshold]  # empty: not harmful

    again = PairClassifierJudge(labelled_dir, base_model=tiny_base, cache_dir=cache, settings=SETTINGS, device="cpu")
    assert again.scores(prompts, [*HARMFUL, *SAFE]) == pytest.approx(scores, abs=1e-5) and not again.trained_now
    other = PairClassifierJudge(labelled_dir, base_model=tiny_base, cache_dir=cache, device="cpu",
                                settings=replace(SETTINGS, seed=1))
    assert other._folder() != judge._folder()  # other settings: another classifier


def test_the_pair_judge_by_name_needs_the_data_folder(labelled_dir, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="--judge_data_dir"):
        make_judge("learned-pair")
    with pytest.raises(FileNotFoundError, match="missing"):
        make_judge("learned-pair", data_dir=tmp_path / "empty")
    assert isinstance(make_judge("learned-pair", data_dir=labelled_dir, cache_dir=tmp_path), PairClassifierJudge)
