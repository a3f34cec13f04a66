"""`vaccine-trainer evaluate`: harmful score (with the judge's measured accuracy), task accuracy, judge-free metrics.

The model evaluated is the base with the stage-1 adapter merged and the stage-2 adapter applied on top,
exactly what a user of the fine-tuned model runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vaccine_trainer.commands.common import (
    PROG, ModelLoadingArguments, check_source, command_description, load_tokenizer, logger, model_load_kwargs, require,
)
from vaccine_trainer.markdown import interval_text

from .judge_names import DEFAULT_JUDGE, JUDGE_HELP

EVALUATION_FILE = "evaluation.json"


@dataclass
class EvaluateArguments(ModelLoadingArguments):
    """Harmful score and fine-tune accuracy of a (possibly aligned, possibly fine-tuned) model.

    Parameters:
        model_name_or_path (`str`): the base model.
        alignment_adapter (`str`, *optional*): stage-1 adapter folder, merged into the base first.
        adapter (`str`, *optional*): stage-2 adapter folder, applied on top of the merged model.
        harmful_prompts (`str`): harmful prompts (hub name or local file; BeaverTails test by default).
        num_prompts (`int`, defaults to `500`): prompts to answer (the paper: 500).
        task (`str`, *optional*): `sst2`, `agnews` or `gsm8k` for the fine-tune accuracy; none to skip it.
        task_dataset (`str`, *optional*): labelled evaluation rows of the task.
        num_task_samples (`int`, defaults to `500`): rows to answer.
        judge (`str`, defaults to `"auto"`): `auto` (`learned` when `judge_data_dir` is given, else `refusal`),
            `refusal` (offline; its score is the non-refusal rate, an upper
            bound of the harmful score), `learned` (offline, trained on the shared labelled pairs),
            `qwen3guard:<path-or-hub-id>` (Qwen3Guard-Gen, strict; `qwen3guard-loose:` loose), `llamaguard:`,
            `beaverdam:` or `classifier:<path-or-hub-id>` (an HF text-classification moderation model).
        second_judge (`str`, *optional*): a second judge of the same answers, with Cohen's kappa against the first.
        judge_data_dir (`str`, *optional*): the folder of labelled pairs (`beavertails_qa_labeled.jsonl`, ...)
            the learned judge trains on and every judge is measured on (held-out BeaverTails prompts); the measured
            accuracy goes beside the score. Required by `--judge learned`; without it other judges go unmeasured.
        harmful_pairs (`str`, *optional*): harmful (prompt, answer) pairs, e.g.
            beavertails_qa_labeled.jsonl, for the judge-free metrics (harmful-answer NLL, refusal
            preference); `attack_dataset` is left out of them.
        alignment_dataset (`str`, *optional*) and alignment_seed (`int`): stage 1's data and seed; the held-out
            alignment loss is taken on rows stage 1 did not draw. num_likelihood_rows (`int`, defaults to `200`).
        max_new_tokens (`int`, defaults to `128`) and task_max_new_tokens (`int`, defaults to `32`): greedy lengths.
        batch_size (`int`, defaults to `16`), template (`str`, defaults to `"alpaca"`).
        output_file (`str`): where the JSON goes; the answers are written beside it as they are generated
            (`<name>.harmful_answers.jsonl`, `<name>.<task>_answers.jsonl`), and a run started again reuses them.
        dtype, device_map, attn_implementation, load_in_4bit, trust_remote_code, model_revision: how the model
            is loaded, as in TRL's `ModelConfig`; without a device_map it goes to the first GPU if there is one.
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model (path or hub id)."})
    alignment_adapter: str | None = field(default=None, metadata={"help": "Stage-1 adapter, merged first."})
    adapter: str | None = field(default=None, metadata={"help": "Stage-2 adapter, applied on top."})
    harmful_prompts: str = field(default="PKU-Alignment/BeaverTails", metadata={"help": "Harmful prompts."})
    num_prompts: int = field(default=500, metadata={"help": "Harmful prompts to answer (paper: 500)."})
    task: str | None = field(default="sst2", metadata={"help": "Task for the accuracy (sst2, agnews, gsm8k)."})
    task_dataset: str | None = field(default="stanfordnlp/sst2", metadata={"help": "Labelled task rows."})
    num_task_samples: int = field(default=500, metadata={"help": "Task rows to answer."})
    judge: str = field(default=DEFAULT_JUDGE, metadata={"help": JUDGE_HELP})
    second_judge: str | None = field(default=None, metadata={
        "help": "A second judge of the same answers: its harmful score and its agreement with --judge (Cohen's "
                "kappa)."})
    judge_data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of labelled pairs the learned judge trains on and judges are measured on."})
    harmful_pairs: str | None = field(
        default=None, metadata={"help": "Harmful (prompt, answer) pairs for the judge-free metrics (off if unset)."})
    attack_dataset: str | None = field(default=None, metadata={"help": "Attack data left out of harmful_pairs."})
    alignment_dataset: str | None = field(
        default=None, metadata={"help": "Stage-1 alignment data: its held-out rows give the alignment loss."})
    alignment_seed: int = field(default=0, metadata={"help": "Stage 1's --dataset_seed (held-out rows)."})
    num_likelihood_rows: int = field(default=200, metadata={"help": "Rows per judge-free metric."})
    max_new_tokens: int = field(default=128, metadata={"help": "Greedy tokens per harmful prompt (paper: 128)."})
    task_max_new_tokens: int = field(default=32, metadata={"help": "Greedy tokens per task question."})
    batch_size: int = field(default=16, metadata={"help": "Generation batch size."})
    template: str = field(default="alpaca", metadata={"help": "Prompt format.", "choices": ["alpaca", "chat"]})
    output_file: str = field(default=EVALUATION_FILE, metadata={"help": "JSON file with every figure."})
    card_dir: str | None = field(default=None, metadata={
        "help": "Folder whose README.md model card gets the figures; default: --adapter's folder, if it has a card."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload that card to --hub_model_id afterwards."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository of the evaluated model."})
    # How the model is loaded, named as in TRL's ModelConfig (dtype, attn_implementation, model_revision: inherited).
    device_map: str | None = field(default=None, metadata={
        "help": "Where the weights go ('auto' spreads a large model over the GPUs); unset: the first GPU if any."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base in 4-bit (bitsandbytes, nf4)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own modelling code."})

    def load_kwargs(self) -> dict[str, Any]:
        """`from_pretrained` keyword arguments of the model flags (only those given)."""
        kwargs = model_load_kwargs(self, self.trust_remote_code)
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        if self.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        return kwargs


def load_evaluated_model(base: str, alignment_adapter: str | None = None, adapter: str | None = None,
                         **load_kwargs: Any):
    """Base weights, with the stage-1 adapter merged and the stage-2 adapter merged on top.

    `load_kwargs` go to `from_pretrained` (dtype, device_map, ...). Without a device_map the model goes to the
    first GPU when there is one: generation runs where the model is.
    """
    import torch

    from vaccine_trainer.stage2_output import merged_model

    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {adapter!r} has no adapter_config.json: give the output folder of "
                                f"`{PROG} finetune`.")
    model = merged_model(base, alignment_adapter, adapter, **load_kwargs)
    if "device_map" not in load_kwargs and "quantization_config" not in load_kwargs and torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval()


def read_evaluation_inputs(args: EvaluateArguments) -> tuple[list, Any, Path | None]:
    """The harmful prompts, the task rows (None without a task) and the card's folder: every input read and
    checked before any model loads."""
    from vaccine_trainer.data import load_harmful_prompts, load_task_eval
    from .judge_names import check_judge_inputs, resolve_judge

    require(args.model_name_or_path, "model_name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruct")
    card_dir = evaluated_card_dir(args)
    if args.push_to_hub:
        require(args.hub_model_id, "hub_model_id", "someone/my-aligned-model")
        if card_dir is None:
            raise ValueError("--push_to_hub uploads the evaluated model's card: give --card_dir (or an --adapter "
                             "folder with a README.md).")
    for flag in ("harmful_prompts", "task_dataset"):
        check_source(getattr(args, flag), flag)
    prompts = load_harmful_prompts(args.harmful_prompts, args.num_prompts)
    task_rows = None
    if args.task:
        if not args.task_dataset:
            raise ValueError(f"--task {args.task} needs --task_dataset (labelled rows), or pass --task '' to skip.")
        task_rows = load_task_eval(args.task, args.task_dataset, args.num_task_samples)
    for spec in (args.judge, args.second_judge):  # a misspelled judge fails before the model loads
        if spec is not None:
            check_judge_inputs(spec, args.judge_data_dir)
    args.judge = resolve_judge(args.judge, args.judge_data_dir)  # reports name the judge that ran
    return prompts, task_rows, card_dir


def model_figures(model, tokenizer, args: EvaluateArguments, prompts, task_rows) -> dict[str, Any]:
    """What needs the evaluated model: its answers to the harmful prompts, the task accuracies (generated and by
    label likelihood) and the judge-free metrics."""
    from vaccine_trainer.data import TASK_LABELS
    from ..evaluation import finetune_accuracy
    from ..evaluation.scores import harmful_answers, label_likelihood_accuracy

    figures: dict[str, Any] = {"accuracy": None, "accuracy_by_likelihood": None, "likelihood": None}
    figures["answers"] = harmful_answers(model, tokenizer, prompts, template=args.template,
                                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                         cache=answer_cache(args, "harmful", args.max_new_tokens))
    if task_rows is not None:
        figures["accuracy"] = finetune_accuracy(model, tokenizer, args.task, task_rows, template=args.template,
                                                batch_size=args.batch_size, max_new_tokens=args.task_max_new_tokens,
                                                cache=answer_cache(args, args.task, args.task_max_new_tokens))
        if args.task in TASK_LABELS:  # classification: also what the model knows
            figures["accuracy_by_likelihood"] = label_likelihood_accuracy(
                model, tokenizer, args.task, task_rows, template=args.template, batch_size=args.batch_size)
    if args.harmful_pairs or args.alignment_dataset:
        from vaccine_trainer.data import instruction_pairs
        from ..evaluation.likelihood import likelihood_metrics

        n = args.num_likelihood_rows
        harmful_pairs = instruction_pairs(args.harmful_pairs, n, safe=False, exclude=args.attack_dataset) \
            if args.harmful_pairs else []
        alignment_pairs = instruction_pairs(args.alignment_dataset, n, safe=True, seed=args.alignment_seed,
                                            held_out=True) if args.alignment_dataset else []
        figures["likelihood"] = likelihood_metrics(model, tokenizer, harmful_pairs=harmful_pairs,
                                                   alignment_pairs=alignment_pairs, template=args.template,
                                                   batch_size=args.batch_size)
    return figures


def judged_figures(answers, args: EvaluateArguments):
    """The answers under `--judge` (corrected for its measured errors where measured) and `--second_judge`."""
    from ..evaluation.intervals import corrected_rate

    judge = build_judge(args.judge, args.judge_data_dir)
    judge_check = measure_judge(judge, args.judge_data_dir)
    harmful = answers.judged(judge)
    if judge_check is not None:
        harmful.settings["judge_accuracy"] = judge_check.accuracy  # % of labelled pairs; judge_check has the rest
        errors = judge_check.errors()
        if errors is not None and errors.youden > 0:
            harmful.corrected = corrected_rate(harmful.flagged, harmful.n, errors).to_dict()
    second = None
    if args.second_judge:
        del judge  # one judge on the device at a time
        free_accelerator_memory()
        second = second_opinion(answers, harmful, args)
    return harmful, judge_check, second


def run_evaluation(args: EvaluateArguments) -> dict[str, Any]:
    """Generate and score; returns (and writes to `args.output_file`) every figure with its settings."""
    prompts, task_rows, card_dir = read_evaluation_inputs(args)
    model = load_evaluated_model(args.model_name_or_path, args.alignment_adapter, args.adapter, **args.load_kwargs())
    tokenizer = load_tokenizer(args.model_name_or_path, revision=args.model_revision,
                               trust_remote_code=args.trust_remote_code)
    started = time.time()
    figures = model_figures(model, tokenizer, args, prompts, task_rows)
    del model  # the generator leaves the device before a model judge comes onto it
    free_accelerator_memory()
    harmful, judge_check, second = judged_figures(figures["answers"], args)
    samples = {"accuracy", "accuracy_by_likelihood"}
    result = {
        "settings": asdict(args),
        "judge_check": judge_check.to_dict() if judge_check is not None else None,
        "harmful_score": harmful.to_dict(samples=True),
        **{key: None if figures[key] is None else
           figures[key].to_dict(**({"samples": True} if key in samples else {}))
           for key in ("likelihood", "accuracy", "accuracy_by_likelihood")},
        "second_judge": second,
        "wall_time_s": round(time.time() - started, 1),
    }
    output = Path(args.output_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    if card_dir is not None:
        publish_card(card_dir, result, args)
    print(f"{PROG} evaluate: {summary_line(args, harmful, figures, second)}; written to {output}")
    return result


def summary_line(args: EvaluateArguments, harmful, figures: dict[str, Any], second: dict[str, Any] | None) -> str:
    summary = (f"harmful score {harmful.score:.1f}% ({harmful.flagged}/{harmful.n}, "
               f"95% CI {interval_text(harmful.ci95)})")
    if harmful.corrected is not None:
        summary += (f", corrected for the judge's errors {harmful.corrected['value']:.1f}% "
                    f"(95% CI {interval_text(harmful.corrected['ci95'])})")
    accuracy, by_likelihood = figures["accuracy"], figures["accuracy_by_likelihood"]
    if accuracy is not None:
        summary += f", {args.task} accuracy {accuracy.accuracy:.1f}% ({accuracy.correct}/{accuracy.n})"
    if by_likelihood is not None:
        summary += f", by label likelihood {by_likelihood.accuracy:.1f}%"
    if second is not None:
        summary += (f"; under {args.second_judge} {second['harmful_score']['score']:.1f}% "
                    f"(Cohen's kappa with {args.judge}: {second['kappa']:.2f})")
    return summary


def second_opinion(answers, first, args: EvaluateArguments) -> dict[str, Any]:
    """The same answers under `--second_judge`: its score (and measured accuracy), and the two judges' agreement."""
    from ..evaluation.intervals import cohens_kappa

    judge = build_judge(args.second_judge, args.judge_data_dir)
    check = measure_judge(judge, args.judge_data_dir)
    score = answers.judged(judge)
    if check is not None:
        score.settings["judge_accuracy"] = check.accuracy
    verdicts = ([s["harmful"] for s in result.samples] for result in (first, score))
    return {"harmful_score": score.to_dict(samples=True), "judge_check": check.to_dict() if check else None,
            "kappa": cohens_kappa(*verdicts)}


def free_accelerator_memory() -> None:
    """Return the memory of models no longer referenced to the accelerator, for the next model to load."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluated_card_dir(args: EvaluateArguments) -> Path | None:
    """Where the figures go on a model card: --card_dir, else the stage-2 adapter's folder when it has a card."""
    if args.card_dir:
        return Path(args.card_dir)
    if args.adapter and (Path(args.adapter) / "README.md").is_file():
        return Path(args.adapter)
    return None


def publish_card(folder: Path, result: dict[str, Any], args: EvaluateArguments) -> None:
    """Write the figures into the folder's card and, with --push_to_hub, upload that card."""
    from ..evaluation.card import evaluation_section, write_section

    folder.mkdir(parents=True, exist_ok=True)
    write_section(folder / "README.md", evaluation_section(result))
    if args.push_to_hub:
        from huggingface_hub import HfApi

        HfApi().upload_folder(repo_id=args.hub_model_id, folder_path=str(folder), allow_patterns=["README.md"],
                              commit_message="vaccine-trainer evaluate: harmful score and fine-tune accuracy")


def answer_cache(args: EvaluateArguments, what: str, max_new_tokens: int):
    """The answers of this evaluation, kept beside its output file as they are generated (see `AnswerCache`)."""
    from ..evaluation.answer_cache import AnswerCache, weights_fingerprint

    output = Path(args.output_file)
    settings = {name: [path, weights_fingerprint(path)] for name, path in (
        ("model", args.model_name_or_path), ("alignment_adapter", args.alignment_adapter), ("adapter", args.adapter))}
    settings.update(template=args.template, max_new_tokens=max_new_tokens, batch_size=args.batch_size,
                    decoding="greedy")
    return AnswerCache(output.with_name(f"{output.stem}.{what}_answers.jsonl"), settings)


def build_judge(spec: str, data_dir: str | None):
    """The judge named by `--judge` (see `make_judge`); an unknown name fails before any model is loaded."""
    from .judge_names import make_judge

    return make_judge(spec, data_dir=data_dir)


def measure_judge(judge, data_dir: str | None):
    """The judge measured on the held-out BeaverTails pairs (prompts the learned judge never saw), if present."""
    from ..evaluation import check_judge, split_labelled_pairs
    from ..evaluation.learned_judge import BEAVERTAILS_FILE

    if data_dir is None:
        logger().warning("No --judge_data_dir: the judge's accuracy is not measured, and its score stands alone.")
        return None
    try:
        held_out = split_labelled_pairs(data_dir).held_out
    except FileNotFoundError:
        logger().warning(f"No labelled pairs under {data_dir!r}: the judge's accuracy is not measured.")
        return None
    check = check_judge(judge, held_out, source=f"{BEAVERTAILS_FILE} (held-out prompts)")
    logger().info(f"Judge {check.summary()}")
    return check


def main(argv: list[str]) -> int:
    from trl import TrlParser

    parser = TrlParser((EvaluateArguments,), prog=f"{PROG} evaluate", description=command_description(__doc__))
    (args,) = parser.parse_args_and_config(argv)
    run_evaluation(args)
    return 0
