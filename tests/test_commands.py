"""The pipeline drives the phase commands through typed settings, not re-parsed strings."""

from __future__ import annotations

import json
import shlex

import pytest
from testing_utils import REPO_ROOT, pipeline_argv
from trl import TrlParser

from vaccine_trainer.cli import main
from vaccine_harness.commands.pipeline import (
    PHASE_COMMANDS,
    PipelineArguments,
    check_phase_settings,
    command_line,
    phase_arguments,
)

SHIPPED = sorted(str(p.relative_to(REPO_ROOT))
                 for p in [*REPO_ROOT.glob("examples/*.yaml"), *REPO_ROOT.glob("experiments/*.yaml")]
                 if "output_dir" in p.read_text() and "methods" in p.read_text())


def test_there_are_shipped_pipeline_configs():
    assert "examples/pipeline_offline.yaml" in SHIPPED and len(SHIPPED) >= 2


@pytest.mark.parametrize("config", SHIPPED)
def test_every_shipped_pipeline_config_gives_known_phase_settings(config, monkeypatch):
    from vaccine_harness.commands.grid import GridArguments

    monkeypatch.chdir(REPO_ROOT)
    args, _ = TrlParser((PipelineArguments, GridArguments)).parse_args_and_config(["--config", config])
    assert all(isinstance(getattr(args, f"{c}_args"), dict) for c in PHASE_COMMANDS)
    check_phase_settings(args)
    args.arms()


@pytest.mark.parametrize("extra, message", [
    (["--finetune_args", '{"no_such_flag": 1}'], "--finetune_args: unknown setting(s) ['no_such_flag']"),
    (["--align_args", "--logging_steps 5"], "--align_args takes a mapping of the phase's flags to values"),
    (["--evaluate_args", "[1, 2]"], "--evaluate_args takes a mapping"),
], ids=["unknown-flag", "old-flag-string", "not-a-mapping"])
def test_bad_phase_settings_fail_before_anything_runs(workspace, tmp_path, capsys, extra, message):

    out = tmp_path / "run"
    argv = [*pipeline_argv(workspace, out), "--methods", "sft", *extra]
    assert main(["pipeline", *argv]) == 1
    assert message in capsys.readouterr().err
    assert not list(out.rglob("phase.json"))


def test_settings_from_yaml_get_their_field_types():
    """PyYAML reads `1e-3` as a string; the phase still gets a float (and a bool from "false")."""
    script, config, model = phase_arguments("align", {"output_dir": "x", "learning_rate": "1e-3",
                                                      "activation_checkpointing": "false", "num_samples": "7",
                                                      "rho": "0.5", "use_cpu": True})
    assert config.learning_rate == 1e-3 and config.activation_checkpointing is False and config.rho == 0.5
    assert script.num_samples == 7 and model.lora_r == 8  # the paper's stage-1 LoRA default
    with pytest.raises(ValueError, match=r"align: unknown setting\(s\) \['rh0'\]"):
        phase_arguments("align", {"output_dir": "x", "rh0": 2})


@pytest.mark.parametrize("command, settings", [
    ("align", {"model_name_or_path": "m", "dataset": "a.jsonl", "output_dir": "out/a", "rho": 2.0,
               "learning_rate": 0.001, "activation_checkpointing": False, "report_to": "none", "use_cpu": True}),
    ("finetune", {"model_name_or_path": "m", "harmful_ratio": 0.1, "output_dir": "out/f", "task": "sst2",
                  "alignment_adapter": "out/a", "disable_tqdm": True, "use_cpu": True}),
    ("evaluate", {"model_name_or_path": "m", "judge": "learned", "num_prompts": 200, "task": "sst2"}),
])
def test_the_marker_command_line_parses_to_the_same_arguments(command, settings):
    """The command a phase marker records runs the same phase by hand."""
    words = shlex.split(command_line(command, settings))
    assert words[:2] == ["vaccine-trainer", command]
    classes, _ = PHASE_COMMANDS[command].load()
    by_hand = TrlParser(classes).parse_args_into_dataclasses(words[2:])
    from_settings = phase_arguments(command, settings)
    for parsed, built in zip(by_hand, from_settings):
        as_dict = getattr(parsed, "to_dict", None)
        assert (parsed.to_dict() == built.to_dict()) if as_dict else (parsed == built)


def test_a_marker_of_an_older_version_is_refused_with_what_to_do(workspace, tmp_path, capsys):

    out = tmp_path / "run"
    marker = out / "sft" / "align" / "phase.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"phase": "sft/align", "argv": ["--rho", "0"], "wall_time_s": 1.0}))
    assert main(["pipeline", *pipeline_argv(workspace, out), "--methods", "sft"]) == 1
    assert "holds a run of an older vaccine-trainer" in capsys.readouterr().err


def test_an_interrupted_training_phase_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    import vaccine_trainer.commands.align as align_module
    from vaccine_harness.commands.pipeline import run_phase

    seen = []
    monkeypatch.setattr(align_module, "run_align", lambda script, args, model: seen.append(args.resume_from_checkpoint))
    folder = tmp_path / "sft" / "align"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-3").mkdir()
    settings = {"model_name_or_path": "m", "dataset": "a.jsonl", "output_dir": str(folder), "rho": 0.0,
                "save_strategy": "steps", "save_steps": 1, "use_cpu": True}
    done = run_phase(folder, "sft/align", "align", settings)
    assert seen == [str(folder / "checkpoint-3")]
    assert done["resumed_from"] == str(folder / "checkpoint-3") and "resume_from_checkpoint" not in done["settings"]
    # Settings that only change bookkeeping (checkpoints, logging) reuse the finished phase; others refuse it.
    assert run_phase(folder, "sft/align", "align", {**settings, "save_strategy": "no", "logging_steps": 3}) == done
    assert seen == [str(folder / "checkpoint-3")]
    with pytest.raises(ValueError, match="differing: learning_rate"):
        run_phase(folder, "sft/align", "align", {**settings, "learning_rate": 0.5})
