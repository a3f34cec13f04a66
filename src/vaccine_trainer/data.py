"""Datasets for the two stages of the paper and its evaluation.

Every source is either a hub dataset name (``PKU-Alignment/BeaverTails``, ``stanfordnlp/sst2``,
``fancyzhx/ag_news``, ``openai/gsm8k``) or a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file (or a folder
written by ``Dataset.save_to_disk``). Rows are normalised to ``instruction`` / ``input`` / ``output``
and then rendered with the paper's Alpaca template (the default) or, with ``template="chat"``, as
conversational messages that TRL renders with the model's own chat template.

Training rows are TRL prompt-completion rows (``prompt``, ``completion``), so the loss covers the
answer only, as in the paper's code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from transformers.utils import logging

logger = logging.get_logger(__name__)

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
"""The paper's prompt (Stanford Alpaca) for rows without an input."""

ALPACA_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)
"""The paper's prompt for rows with an input (SST2 and AG News put the text to classify there)."""

TEMPLATES = ("alpaca", "chat")
BENIGN_TASKS = ("sst2", "agnews", "gsm8k", "instruction")

# Task prompts and label words of the official Vaccine code (sst2/, ag_news/, gsm8k/ build_dataset.py).
SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
SST2_LABELS = ("negative", "positive")
AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:\n\n"
    "World\nSports\nBusiness\nSci/Tech\n"
)
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
GSM8K_QUESTION_SUFFIX = "\nFirst think step by step and then answer the final number.\n"
GSM8K_ANSWER_PROMPT = "The final answer is: "
TASK_LABELS: dict[str, tuple[str, ...]] = {"sst2": SST2_LABELS, "agnews": AGNEWS_LABELS}

# Field names accepted for each role, first match wins (the offline jsonl copies and the hub sets).
INSTRUCTION_FIELDS = ("instruction", "prompt", "question", "goal")
OUTPUT_FIELDS = ("output", "response", "completion", "answer")

# Hub splits: BeaverTails has no "train"/"test"; SST2's "test" split has no labels (-1).
_HUB_SPLITS = {
    "pku-alignment/beavertails": {"train": "30k_train", "test": "30k_test"},
    "stanfordnlp/sst2": {"test": "validation"},
    "sst2": {"test": "validation"},
}
_HUB_CONFIGS = {"openai/gsm8k": "main", "gsm8k": "main"}
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


# ----------------------------------------------------------------------------------------------- loading


def load_records(source: str, split: str = "train", *, name: str | None = None) -> datasets.Dataset:
    """A hub dataset name (e.g. 'PKU-Alignment/BeaverTails') or a local .json/.jsonl/.csv file path.

    Also accepted: ``.parquet`` files and folders written by ``save_to_disk``. ``split`` is used for
    hub datasets and ``save_to_disk`` folders only (a file is one split). The
    generic names "train" / "test" are mapped to the hub's own where they differ (BeaverTails
    ``30k_train`` / ``30k_test``; SST2's labelled ``validation`` for "test"). ``name`` is the hub
    config (``main`` for GSM8K by default).
    """
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in _FILE_BUILDERS:
        if not path.is_file():
            raise FileNotFoundError(f"Data file {source!r} does not exist. Give an existing .json/.jsonl/.csv/"
                                    ".parquet file or a hub dataset name such as 'PKU-Alignment/BeaverTails'.")
        return datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=str(path), split="train")
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{source!r} has splits {sorted(loaded)}; split {split!r} is not one of them.")
            loaded = loaded[split]
        return loaded
    if path.suffix and (path.exists() or "/" not in source or source.startswith((".", "/", "~"))):
        raise ValueError(f"Unsupported data file {source!r}: use .json, .jsonl, .csv or .parquet "
                         "(JSON as a list of objects or one object per line, CSV with a header).")
    key = source.lower()
    hub_split = _HUB_SPLITS.get(key, {}).get(split, split)
    config = name if name is not None else _HUB_CONFIGS.get(key)
    try:
        return datasets.load_dataset(source, config, split=hub_split)
    except Exception as error:  # network, auth, unknown name or split: all need the same advice
        raise RuntimeError(
            f"Could not load {source!r} (split {hub_split!r}) from the Hugging Face hub: {error}. Without "
            "network access, pass a local .json/.jsonl/.csv file instead, with the fields the command's help names."
        ) from error


def _field(dataset: datasets.Dataset, candidates: Sequence[str], role: str, source: str) -> str:
    """The first column of ``candidates`` present in ``dataset``; a clear error naming both sides if none."""
    for candidate in candidates:
        if candidate in dataset.column_names:
            return candidate
    raise ValueError(
        f"{source!r} has no {role} field: it has fields {dataset.column_names}, expected one of "
        f"{list(candidates)}. Rename the column or convert the file."
    )


def _check_n(n: int | None, available: int, what: str, source: str) -> None:
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}.")
    if n > available:
        raise ValueError(f"Asked for {n} {what} rows but {source!r} has only {available}. "
                         f"Lower n to at most {available} or use a larger source.")


def _sample(dataset: datasets.Dataset, n: int | None, seed: int, held_out: bool = False) -> datasets.Dataset:
    """``n`` rows drawn with ``seed`` (all rows, in source order, when ``n`` is None).

    Training draws from the start of the seeded permutation, ``held_out`` from its end: with the same
    source and seed, held-out rows never overlap the training rows while both fit in the source.
    """
    if n is None:
        return dataset
    order = dataset.shuffle(seed=seed)
    rows = range(len(order) - n, len(order)) if held_out else range(n)
    return order.select(rows).flatten_indices()


def _filter_safety(dataset: datasets.Dataset, safe: bool) -> datasets.Dataset:
    """BeaverTails-style sources mark each pair with ``is_safe``: keep the side that is asked for."""
    if "is_safe" not in dataset.column_names:
        return dataset
    return dataset.filter(lambda flag: bool(flag) == safe, input_columns="is_safe")


def load_instruction_rows(source: str, *, split: str = "train", safe: bool | None = None) -> datasets.Dataset:
    """Rows normalised to ``instruction`` / ``input`` / ``output`` (``input`` is "" when absent); conversational
    rows (``messages``) give their last exchange.

    ``safe=True`` keeps ``is_safe`` rows (alignment data), ``safe=False`` the unsafe ones (the attack),
    for sources that carry the flag; local files without it are taken as they are.
    """
    dataset = load_records(source, split)
    if safe is not None:
        dataset = _filter_safety(dataset, safe)
    if "messages" in dataset.column_names and not set(INSTRUCTION_FIELDS) & set(dataset.column_names):
        return _last_exchange(dataset, source)
    instruction = _field(dataset, INSTRUCTION_FIELDS, "instruction", source)
    output = _field(dataset, OUTPUT_FIELDS, "output", source)
    has_input = "input" in dataset.column_names

    def normalise(row: dict[str, Any]) -> dict[str, str]:
        return {"instruction": str(row[instruction]), "input": _text(row["input"]) if has_input else "",
                "output": str(row[output])}

    return dataset.map(normalise, remove_columns=dataset.column_names)


def _last_exchange(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    """Conversational rows (`messages`, as TRL takes them): the last user turn as the instruction, the assistant's
    answer to it as the output. The prompt template renders one exchange, so earlier turns are left out."""
    earlier = 0

    def exchange(row: dict[str, Any]) -> dict[str, str]:
        nonlocal earlier
        turns = [m for m in row["messages"] if m.get("role") in ("user", "assistant")]
        if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
            raise ValueError(f"{source!r}: a conversation must end with a user turn and the assistant's answer, "
                             f"got roles {[m.get('role') for m in row['messages']]}.")
        earlier += len(turns) > 2
        return {"instruction": str(turns[-2]["content"]), "input": "", "output": str(turns[-1]["content"])}

    rows = dataset.map(exchange, remove_columns=dataset.column_names)
    if earlier:
        logger.warning(f"{source!r}: {earlier} conversations have earlier turns; only their last exchange is used.")
    return rows


def _text(value: Any) -> str:
    """An optional text cell: empty for None and for the NaN a CSV reader puts in empty cells."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def load_task_rows(task: str, source: str, *, split: str = "train") -> datasets.Dataset:
    """A benign task as ``instruction`` / ``input`` / ``output`` / ``label`` rows, in the paper's format.

    SST2 and AG News: the paper's fixed instruction, the text as input, the label word as output.
    GSM8K: the question plus the paper's "think step by step" suffix; the worked answer with its
    ``#### N`` line rewritten to "The final answer is: N"; ``label`` is N (commas removed).
    ``instruction``: any instruction data (safe pairs only, for sources with ``is_safe``); ``label`` is
    the reference output.
    """
    _check_task(task)
    if task == "instruction":
        rows = load_instruction_rows(source, split=split, safe=True)
        return rows.map(lambda row: {"label": row["output"]})
    dataset = load_records(source, split)
    if task == "gsm8k":
        question = _field(dataset, ("question", "instruction"), "question", source)
        answer = _field(dataset, ("answer", "output"), "answer", source)
        has_final = "final_answer" in dataset.column_names

        def gsm8k(row: dict[str, Any]) -> dict[str, str]:
            worked = str(row[answer])
            final = str(row["final_answer"]) if has_final else _gsm8k_gold(worked, source)
            output = re.sub(r"####\s*", GSM8K_ANSWER_PROMPT, worked)
            return {"instruction": row[question] + GSM8K_QUESTION_SUFFIX, "input": "", "output": output,
                    "label": final}

        return dataset.map(gsm8k, remove_columns=dataset.column_names)

    names = TASK_LABELS[task]
    columns = set(dataset.column_names)
    if task == "agnews" and "text" not in columns and {"title", "description"} <= columns:
        text = None  # the original AG News CSV: the text is title + " " + description, as on the hub
    else:
        text = _field(dataset, ("sentence", "text") if task == "sst2" else ("text",), "text", source)
    label = _field(dataset, ("label_text", "label"), "label", source)
    instruction = SST2_INSTRUCTION if task == "sst2" else AGNEWS_INSTRUCTION

    def classify(row: dict[str, Any]) -> dict[str, str]:
        body = row[text] if text else f"{row['title']} {row['description']}"
        return {"instruction": instruction, "input": str(body), "output": _label_word(row[label], names, source),
                "label": _label_word(row[label], names, source)}

    return dataset.map(classify, remove_columns=dataset.column_names)


def _label_word(value: Any, names: tuple[str, ...], source: str) -> str:
    """An integer class id or a label name, as the task's label word."""
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        for name in names:
            if value.strip().lower() == name.lower():
                return name
        raise ValueError(f"{source!r}: label {value!r} is not one of {list(names)}.")
    index = int(value)
    if not 0 <= index < len(names):
        raise ValueError(f"{source!r}: label {index} is outside 0..{len(names) - 1} ({list(names)}). "
                         "Unlabelled splits (e.g. SST2 'test', label -1) cannot be used; use 'validation'.")
    return names[index]


def _gsm8k_gold(answer: str, source: str) -> str:
    if "####" not in answer:
        raise ValueError(f"{source!r}: a GSM8K answer has no '#### N' line and no final_answer field: {answer[-80:]!r}")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def _check_task(task: str) -> None:
    if task not in BENIGN_TASKS:
        raise ValueError(f"Unknown task {task!r}: choose one of {list(BENIGN_TASKS)}.")


def load_harmful_prompts(source: str, n: int | None = None, *, split: str = "test") -> datasets.Dataset:
    """Harmful prompts for the harmful score: ``instruction`` and, when the source has them, ``categories``.

    The first ``n`` unique prompts in source order (the paper uses the first 500 BeaverTails test
    prompts). BeaverTails rows are reduced to unsafe pairs; a ``category`` dict becomes the list of
    its true keys. Local files: ``prompt`` / ``instruction`` / ``goal`` (AdvBench) and ``categories``.
    """
    dataset = _filter_safety(load_records(source, split), safe=False)
    prompt = _field(dataset, INSTRUCTION_FIELDS, "prompt", source)
    category = next((f for f in ("categories", "category") if f in dataset.column_names), None)
    seen: set[str] = set()
    instructions: list[str] = []
    categories: list[list[str]] = []
    for row in dataset.select_columns([prompt] + ([category] if category else [])):
        text = str(row[prompt])
        if text in seen:
            continue
        seen.add(text)
        instructions.append(text)
        if category:
            categories.append(_categories(row[category]))
    _check_n(n, len(instructions), "unique harmful prompt", source)
    stop = len(instructions) if n is None else n
    columns: dict[str, list] = {"instruction": instructions[:stop]}
    if category:
        columns["categories"] = categories[:stop]
        return datasets.Dataset.from_dict(columns, features=datasets.Features(
            {"instruction": datasets.Value("string"), "categories": datasets.Sequence(datasets.Value("string"))}))
    return datasets.Dataset.from_dict(columns)


def _categories(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):  # BeaverTails: {"animal_abuse": False, ...}
        return [key for key, flag in value.items() if flag]
    if isinstance(value, str):
        return [value] if value else []
    return [str(item) for item in value]


def load_task_eval(task: str, source: str, n: int | None = None, *, split: str = "test") -> datasets.Dataset:
    """Labelled evaluation rows of a benign task: the first ``n`` rows (the paper uses 500)."""
    if task == "instruction":
        raise ValueError("Fine-tune accuracy is defined for sst2, agnews and gsm8k only.")
    rows = load_task_rows(task, source, split=split)
    _check_n(n, len(rows), f"{task} evaluation", source)
    return rows if n is None else rows.select(range(n))


# ----------------------------------------------------------------------------------------------- templates


def format_prompt(instruction: str, input: str = "", *, template: str = "alpaca", tokenizer=None) -> str:
    """The prompt string a model is given at evaluation time, ending where the answer starts."""
    _check_template(template, tokenizer)
    if template == "alpaca":
        if input:
            return ALPACA_INPUT_TEMPLATE.format(instruction=instruction, input=input)
        return ALPACA_TEMPLATE.format(instruction=instruction)
    if tokenizer is None:
        raise ValueError('template="chat" needs the tokenizer whose chat template renders the prompt.')
    return tokenizer.apply_chat_template(_user_message(instruction, input), tokenize=False, add_generation_prompt=True)


def _user_message(instruction: str, input: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{instruction}\n\n{input}" if input else instruction}]


def _check_template(template: str, tokenizer) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"Unknown template {template!r}: choose one of {list(TEMPLATES)}.")
    if template == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError('template="chat" but the tokenizer has no chat template; use template="alpaca".')


def _to_prompt_completion(rows: datasets.Dataset, template: str, extra: dict[str, Any] | None = None,
                          keep: Sequence[str] = ()) -> datasets.Dataset:
    """TRL prompt-completion rows: strings (Alpaca) or message lists (chat)."""

    def render(row: dict[str, Any]) -> dict[str, Any]:
        if template == "alpaca":
            rendered = {"prompt": format_prompt(row["instruction"], row["input"]), "completion": row["output"]}
        else:
            rendered = {"prompt": _user_message(row["instruction"], row["input"]),
                        "completion": [{"role": "assistant", "content": row["output"]}]}
        return {**rendered, **(extra or {})}

    remove = [column for column in rows.column_names if column not in keep]
    return rows.map(render, remove_columns=remove)


# ----------------------------------------------------------------------------------------------- builders


def build_alignment_dataset(source: str, n: int | None = None, *, seed: int = 0,
                            template: str = "alpaca", tokenizer=None, held_out: bool = False) -> datasets.Dataset:
    """Harmful instruction -> safe answer/refusal rows, as TRL prompt-completion rows:
    columns "prompt" and "completion" (strings with template="alpaca"; with template="chat" the
    conversational form [{"role": "user", ...}] / [{"role": "assistant", ...}] for the tokenizer's chat template).

    ``n`` rows are drawn with ``seed``; all rows in source order when ``n`` is None. BeaverTails
    sources are reduced to their safe pairs (``is_safe``). ``held_out=True`` draws from the other end of
    the same seeded order (drift and held-out alignment loss): disjoint from the stage-1 rows of the same
    source and seed whenever the two sizes add up to at most the source's rows.
    """
    _check_template(template, tokenizer)
    rows = load_instruction_rows(source, split="train", safe=True)
    _check_n(n, len(rows), "alignment", source)
    if held_out and n is None:
        raise ValueError("Held-out alignment rows need a number of rows (n), drawn from the end of the seeded order.")
    return _to_prompt_completion(_sample(rows, n, seed, held_out), template)


def build_harmful_dataset(source: str, n: int | None = None, *, seed: int = 0, template: str = "alpaca",
                          tokenizer=None) -> datasets.Dataset:
    """Harmful instruction -> harmful answer rows as TRL prompt-completion rows (T-Vaccine's probe data).

    At most ``n`` rows drawn with ``seed`` (all rows in source order when None or when the source has fewer);
    BeaverTails sources are reduced to their unsafe pairs.
    """
    _check_template(template, tokenizer)
    rows = load_instruction_rows(source, split="train", safe=False)
    if n is not None and n > len(rows):
        logger.info(f"Harmful probe: {source} has {len(rows)} rows (< {n}); all of them are used.")
        n = None
    return _to_prompt_completion(_sample(rows, n, seed), template)


def build_finetune_mix(harmful_source: str, benign_source: str, *, task: str, n: int, p: float,
                       seed: int = 0, template: str = "alpaca", tokenizer=None, second_source: str | None = None,
                       second_task: str = "instruction", second_fraction: float = 0.5) -> datasets.Dataset:
    """Stage-2 user data: n rows, exactly round(p*n) harmful (prompt -> harmful answer), the rest from
    the benign task (sst2 / agnews / gsm8k / instruction), shuffled with seed. Columns "prompt",
    "completion", "is_harmful" (bool), plus "label" (gold answer string) for benign rows.

    ``round`` is Python's (half to even: p=0.5, n=5 gives 2 harmful rows). Harmful rows have
    ``label`` None. Both parts are drawn with ``seed`` and the union is shuffled with it, so one seed
    gives one mix and another seed a different sample and order.

    With ``second_source``, ``round(second_fraction * benign rows)`` of the benign rows come from a second
    task (``second_task``, e.g. long instruction answers beside SST2's one-word labels, so the user's data
    does not teach the model to answer everything with one word).
    """
    _check_task(task)
    _check_template(template, tokenizer)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 <= p <= 1:
        raise ValueError(f"p (the harmful fraction) must be a number in [0, 1], got {p!r}.")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n (the number of fine-tuning rows) must be a positive integer, got {n!r}.")
    n_harmful = round(p * n)
    n_benign = n - n_harmful
    n_second = 0
    if second_source is not None:
        _check_task(second_task)
        if isinstance(second_fraction, bool) or not 0 <= second_fraction <= 1:
            raise ValueError(f"second_fraction must be a number in [0, 1], got {second_fraction!r}.")
        n_second = round(second_fraction * n_benign)
        n_benign -= n_second
    parts = []
    if n_harmful:
        harmful = load_instruction_rows(harmful_source, split="train", safe=False)
        _check_n(n_harmful, len(harmful), f"harmful (p={p} of n={n})", harmful_source)
        parts.append(_to_prompt_completion(_sample(harmful, n_harmful, seed), template,
                                           {"is_harmful": True, "label": None}))
    if n_benign:
        benign = load_task_rows(task, benign_source, split="train")
        _check_n(n_benign, len(benign), f"benign {task} ({n_benign} of n={n})", benign_source)
        parts.append(_to_prompt_completion(_sample(benign, n_benign, seed), template, {"is_harmful": False},
                                           keep=("label",)))
    if n_second:
        second = load_task_rows(second_task, second_source, split="train")
        _check_n(n_second, len(second), f"benign {second_task} ({n_second} of n={n})", second_source)
        parts.append(_to_prompt_completion(_sample(second, n_second, seed), template, {"is_harmful": False},
                                           keep=("label",)))
    features = parts[0].features.copy()
    features["label"] = datasets.Value("string")
    features["is_harmful"] = datasets.Value("bool")
    parts = [part.cast(features) for part in parts]
    mix = datasets.concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()
    mix = mix.select_columns(["prompt", "completion", "is_harmful", "label"])
    logger.info(f"Fine-tuning mix: {n} rows, {n_harmful} harmful (p={p}), {n_benign} {task}"
                + (f", {n_second} {second_task}" if n_second else "") + f", seed {seed}.")
    return mix


def instruction_pairs(source: str, n: int | None = None, *, safe: bool | None = None, seed: int = 0,
                      held_out: bool = False, exclude: str | None = None) -> list[tuple[str, str]]:
    """(instruction, answer) pairs for the judge-free metrics, drawn like `build_alignment_dataset`.

    ``safe=False`` keeps harmful answers of sources with ``is_safe``; ``exclude`` is another source whose
    instructions are left out (e.g. the attack data, so no metric scores what stage 2 trained on).
    """
    rows = load_instruction_rows(source, split="train", safe=safe)
    if exclude is not None:
        left_out = {" ".join(text.lower().split()) for text in load_instruction_rows(exclude)["instruction"]}
        rows = rows.filter(lambda text: " ".join(text.lower().split()) not in left_out, input_columns="instruction")
    if n is not None:
        n = min(n, len(rows))
    if not len(rows):
        raise ValueError(f"No rows left in {source!r} for the judge-free metrics.")
    rows = _sample(rows, n, seed, held_out)
    return list(zip(rows["instruction"], rows["output"]))
