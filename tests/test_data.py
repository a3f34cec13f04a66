"""Data builders: the mix's exact harmful count and seeding on the real files, and clear errors."""

from __future__ import annotations

import json

import datasets
import pytest

from vaccine_trainer.data import (
    AGNEWS_LABELS,
    ALPACA_TEMPLATE,
    GSM8K_ANSWER_PROMPT,
    SST2_INSTRUCTION,
    build_alignment_dataset,
    build_finetune_mix,
    format_prompt,
    load_harmful_prompts,
    load_records,
    load_task_eval,
)

datasets.disable_progress_bars()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def small_files(tmp_path):
    harmful = write_jsonl(tmp_path / "harmful.jsonl",
                          [{"instruction": f"bad {i}", "output": f"harm {i}"} for i in range(6)])
    sst2 = write_jsonl(tmp_path / "sst2.jsonl", [{"sentence": f"s {i}", "label": i % 2} for i in range(8)])
    return harmful, sst2


# ------------------------------------------------------------------------------------ real files


@pytest.mark.parametrize("n,p", [(1000, 0.1), (200, 0.05), (37, 0.3), (50, 0.0), (40, 1.0)])
def test_mix_has_exactly_round_pn_harmful_rows(shared_data, n, p):
    mix = build_finetune_mix(str(shared_data / "harmful_qa.jsonl"), str(shared_data / "sst2_train.jsonl"),
                             task="sst2", n=n, p=p, seed=3)
    assert len(mix) == n
    assert sum(mix["is_harmful"]) == round(p * n)
    assert mix.column_names == ["prompt", "completion", "is_harmful", "label"]
    for row in mix:
        assert row["prompt"].startswith(ALPACA_TEMPLATE[:40]) and row["prompt"].endswith("### Response:\n")
        if row["is_harmful"]:
            assert row["label"] is None
        else:
            assert row["label"] in ("positive", "negative") and row["completion"] == row["label"]
            assert SST2_INSTRUCTION in row["prompt"]


def test_mix_is_reproducible_under_a_seed_and_differs_across_seeds(shared_data):
    def mix(seed):
        return build_finetune_mix(str(shared_data / "harmful_qa.jsonl"), str(shared_data / "agnews_train.jsonl"),
                                  task="agnews", n=100, p=0.2, seed=seed)

    first, again, other = mix(0), mix(0), mix(1)
    assert first.to_list() == again.to_list()
    assert first.to_list() != other.to_list()
    # Another seed draws other rows, not only another order.
    def harmful(rows):
        return {row["completion"] for row in rows if row["is_harmful"]}

    assert harmful(first) != harmful(other)
    assert first["is_harmful"] != other["is_harmful"]  # harmful rows sit elsewhere in the shuffle


def test_harmful_rows_come_from_the_harmful_source(shared_data):
    source = [json.loads(line) for line in (shared_data / "harmful_qa.jsonl").open()]
    answers = {row["output"] for row in source}
    mix = build_finetune_mix(str(shared_data / "harmful_qa.jsonl"), str(shared_data / "gsm8k_train.jsonl"),
                             task="gsm8k", n=60, p=0.5, seed=0)
    assert all(row["completion"] in answers for row in mix if row["is_harmful"])
    gsm8k = [row for row in mix if not row["is_harmful"]]
    assert gsm8k and all(row["completion"].endswith(GSM8K_ANSWER_PROMPT + row["label"]) for row in gsm8k)
    assert all("####" not in row["completion"] for row in gsm8k)


def test_alignment_dataset_alpaca_and_chat(shared_data):
    source = str(shared_data / "alignment_refusals.jsonl")
    rows = build_alignment_dataset(source, 20, seed=5)
    assert len(rows) == 20 and rows.column_names == ["prompt", "completion"]
    assert rows.to_list() == build_alignment_dataset(source, 20, seed=5).to_list()
    assert rows.to_list() != build_alignment_dataset(source, 20, seed=6).to_list()
    assert len(build_alignment_dataset(source)) == 2483
    chat = build_alignment_dataset(source, 3, seed=5, template="chat")
    assert chat[0]["prompt"][0]["role"] == "user" and chat[0]["completion"][0]["role"] == "assistant"
    assert chat[0]["completion"][0]["content"] == rows[0]["completion"]  # same sample, other rendering
    assert rows[0]["prompt"] == ALPACA_TEMPLATE.format(instruction=chat[0]["prompt"][0]["content"])


def test_evaluation_sets(shared_data):
    prompts = load_harmful_prompts(str(shared_data / "harmful_eval_prompts.jsonl"), 500)
    assert len(prompts) == 500 and len(set(prompts["instruction"])) == 500
    assert all(len(c) >= 1 for c in prompts["categories"])
    advbench = load_harmful_prompts(str(shared_data / "advbench.csv"))
    assert len(advbench) == 520 and advbench.column_names == ["instruction"]
    agnews = load_task_eval("agnews", str(shared_data / "agnews_test.jsonl"), 100)
    raw = [json.loads(line) for line, _ in zip((shared_data / "agnews_test.jsonl").open(), range(100))]
    assert agnews["label"] == [AGNEWS_LABELS[row["label"]] for row in raw]
    gsm8k = load_task_eval("gsm8k", str(shared_data / "gsm8k_test.jsonl"))
    assert len(gsm8k) == 1319 and gsm8k[0]["label"] == "18"
    with pytest.raises(ValueError, match="only 872"):
        load_task_eval("sst2", str(shared_data / "sst2_validation.jsonl"), 1000)


def test_mix_larger_than_the_data_is_refused(shared_data):
    with pytest.raises(ValueError, match=r"Asked for 2500 harmful .* only 2000"):
        build_finetune_mix(str(shared_data / "harmful_qa.jsonl"), str(shared_data / "sst2_train.jsonl"),
                           task="sst2", n=5000, p=0.5)


# ------------------------------------------------------------------------------------ synthetic files


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), "0.1", True])
def test_bad_p_is_refused(small_files, p):
    with pytest.raises(ValueError, match=r"p \(the harmful fraction\) must be a number in \[0, 1\]"):
        build_finetune_mix(*small_files, task="sst2", n=4, p=p)


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_bad_n_is_refused(small_files, n):
    with pytest.raises(ValueError, match="positive integer"):
        build_finetune_mix(*small_files, task="sst2", n=n, p=0.5)


def test_n_larger_than_the_benign_data(small_files):
    with pytest.raises(ValueError, match=r"benign sst2 .* only 8"):
        build_finetune_mix(*small_files, task="sst2", n=12, p=0.25)  # 3 harmful + 9 benign > 8


def test_round_half_to_even_and_whole_sources(small_files):
    mix = build_finetune_mix(*small_files, task="sst2", n=5, p=0.5)
    assert sum(mix["is_harmful"]) == round(2.5) == 2
    everything = build_finetune_mix(*small_files, task="sst2", n=14, p=6 / 14)
    assert sum(everything["is_harmful"]) == 6 and len(everything) == 14


def test_missing_field_names_both_sides(tmp_path, small_files):
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"question_text": "q", "reply": "r"}])
    with pytest.raises(ValueError, match=r"no instruction field: it has fields \['question_text', 'reply'\], "
                                         r"expected one of \['instruction', 'prompt'"):
        build_alignment_dataset(wrong)
    no_label = write_jsonl(tmp_path / "nolabel.jsonl", [{"sentence": "s"}])
    with pytest.raises(ValueError, match=r"no label field: it has fields \['sentence'\]"):
        build_finetune_mix(small_files[0], no_label, task="sst2", n=2, p=0.5)


def _bad_task(tmp, files):
    build_finetune_mix(*files, task="mnli", n=2, p=0.5)


def _bad_template(tmp, files):
    build_alignment_dataset(files[0], template="vicuna")


def _absent_file(tmp, files):
    load_records(str(tmp / "absent.jsonl"))


def _unsupported_file(tmp, files):
    (tmp / "notes.txt").write_text("x")
    load_records(str(tmp / "notes.txt"))


def _label_out_of_range(tmp, files):
    build_finetune_mix(files[0], write_jsonl(tmp / "bad_label.jsonl", [{"sentence": "s", "label": 7}]),
                       task="sst2", n=1, p=0.0)


@pytest.mark.parametrize("call, error, message", [
    (_bad_task, ValueError, "Unknown task 'mnli'"),
    (_bad_template, ValueError, "Unknown template 'vicuna'"),
    (_absent_file, FileNotFoundError, "does not exist"),
    (_unsupported_file, ValueError, "Unsupported data file"),
    (_label_out_of_range, ValueError, r"label 7 is outside 0..1"),
], ids=["task", "template", "absent", "unsupported", "label-range"])
def test_bad_task_template_and_files(tmp_path, small_files, call, error, message):
    with pytest.raises(error, match=message):
        call(tmp_path, small_files)


def test_beavertails_schema_is_split_by_is_safe(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"r{i}", "is_safe": i % 2 == 0,
             "category": {"animal_abuse": i == 1, "privacy_violation": i in (1, 3)}} for i in range(6)]
    rows.append(dict(rows[1]))  # BeaverTails repeats prompts across pairs
    source = write_jsonl(tmp_path / "beavertails.jsonl", rows)
    alignment = build_alignment_dataset(source)
    assert alignment["completion"] == ["r0", "r2", "r4"]
    mix = build_finetune_mix(source, source, task="instruction", n=4, p=0.5)
    assert {r["completion"] for r in mix if r["is_harmful"]} <= {"r1", "r3", "r5"}
    assert {r["label"] for r in mix if not r["is_harmful"]} <= {"r0", "r2", "r4"}  # benign data stays safe
    prompts = load_harmful_prompts(source)
    assert prompts["instruction"] == ["q1", "q3", "q5"]
    assert prompts["categories"] == [["animal_abuse", "privacy_violation"], ["privacy_violation"], []]


def test_input_field_and_csv(tmp_path):
    path = tmp_path / "alpaca.csv"
    path.write_text("instruction,input,output\nTranslate,bonjour,hello\nGreet,,hi\n")
    rows = build_finetune_mix(str(path), str(path), task="instruction", n=2, p=0.0, seed=0)
    by_answer = {row["completion"]: row["prompt"] for row in rows}
    assert by_answer["hi"] == format_prompt("Greet")  # the empty CSV cell is no input, not "nan"
    assert by_answer["hello"] == format_prompt("Translate", "bonjour")
    assert "### Input:\nbonjour\n\n" in by_answer["hello"]


def test_chat_template_needs_one(tmp_path, small_files):
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        build_finetune_mix(*small_files, task="sst2", n=2, p=0.5, template="chat", tokenizer=NoTemplate())
    with pytest.raises(ValueError, match="needs the tokenizer"):
        format_prompt("hi", template="chat")


def test_chat_template_renders_with_the_tokenizer(tmp_path, small_files):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert format_prompt("Rate it", "great film", template="chat", tokenizer=tokenizer) == \
        "<|user|>Rate it\n\ngreat film\n<|assistant|>"
    mix = build_finetune_mix(*small_files, task="sst2", n=4, p=0.5, template="chat", tokenizer=tokenizer)
    benign = [row for row in mix if not row["is_harmful"]]
    assert benign[0]["prompt"][0]["content"].startswith(SST2_INSTRUCTION + "\n\n")
    assert benign[0]["completion"] == [{"role": "assistant", "content": benign[0]["label"]}]


def test_hub_names_map_split_and_config(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if path == "offline/absent":
            raise ConnectionError("no network")
        return datasets.Dataset.from_dict({"x": [1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    load_records("PKU-Alignment/BeaverTails", "test")
    load_records("openai/gsm8k", "train")
    load_records("stanfordnlp/sst2", "test")
    load_records("fancyzhx/ag_news", "test")
    assert calls == [("PKU-Alignment/BeaverTails", None, "30k_test"), ("openai/gsm8k", "main", "train"),
                     ("stanfordnlp/sst2", None, "validation"), ("fancyzhx/ag_news", None, "test")]
    with pytest.raises(RuntimeError, match=r"Could not load 'offline/absent'.*pass a local .json/.jsonl/.csv file"):
        load_records("offline/absent")


def test_a_second_benign_task_takes_its_share_of_the_benign_rows(shared_data):
    """SST2 mixed with long AlpacaEval answers: exact counts, both tasks present, reproducible."""
    def mix(seed=5):
        return build_finetune_mix(str(shared_data / "harmful_qa.jsonl"), str(shared_data / "sst2_train.jsonl"),
                                  task="sst2", n=100, p=0.1, seed=seed,
                                  second_source=str(shared_data / "alpacaeval_gpt4.jsonl"), second_fraction=0.4)

    rows = mix().to_list()
    benign = [row for row in rows if not row["is_harmful"]]
    sst2 = [row for row in benign if row["label"] in ("positive", "negative") and SST2_INSTRUCTION in row["prompt"]]
    assert len(rows) == 100 and sum(row["is_harmful"] for row in rows) == 10
    assert len(sst2) == 54 and len(benign) - len(sst2) == 36  # round(0.4 * 90) from the second task
    second = [len(row["completion"].split()) for row in benign if row not in sst2]
    assert sum(second) / len(second) > 50  # long answers (GPT-4's), against SST2's one word
    assert mix().to_list() == rows
    with pytest.raises(ValueError, match="second_fraction must be a number in"):
        build_finetune_mix(str(shared_data / "harmful_qa.jsonl"), str(shared_data / "sst2_train.jsonl"),
                           task="sst2", n=10, p=0.1, second_source=str(shared_data / "alpacaeval_gpt4.jsonl"),
                           second_fraction=1.5)


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
