"""`--accelerate_config` / `--num_processes` on `align` and `finetune`: the command again under `accelerate launch`,
with the configs shipped in the package (as `trl sft --accelerate_config zero3`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vaccine_trainer.cli import main
from vaccine_trainer.launch import SHIPPED, accelerate_config_path, split_launch_flags


def test_the_shipped_configs_are_package_files_and_a_path_is_taken_as_it_is(tmp_path):
    for name in SHIPPED:
        path = Path(accelerate_config_path(name))
        assert path.is_file() and path.parent.name == "accelerate_configs" and "vaccine_trainer" in path.parts
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\n")
    assert accelerate_config_path(str(own)) == str(own)
    with pytest.raises(ValueError, match="zero3"):
        accelerate_config_path("zero-3")


def test_launch_flags_are_split_from_the_commands_own():
    flags, rest = split_launch_flags(["--rho", "2", "--accelerate_config", "zero3", "--num_processes=2", "--x", "y"])
    assert flags == {"--accelerate_config": "zero3", "--num_processes": "2"}
    assert rest == ["--rho", "2", "--x", "y"]
    with pytest.raises(ValueError, match="needs a value"):
        split_launch_flags(["--accelerate_config"])


def test_align_with_a_config_runs_itself_under_accelerate_launch(monkeypatch):
    import accelerate.commands.launch as accelerate_launch

    seen = []
    monkeypatch.setattr(accelerate_launch, "launch_command", seen.append)
    assert main(["align", "--model_name_or_path", "m", "--accelerate_config", "zero3", "--num_processes", "2",
                 "--rho", "2"]) == 0
    (args,) = seen
    assert args.config_file == accelerate_config_path("zero3") and args.num_processes == 2
    assert args.module and args.training_script == "vaccine_trainer.cli"
    assert args.training_script_args == ["align", "--model_name_or_path", "m", "--rho", "2"]


def test_an_unknown_config_name_is_a_clear_error(capsys):
    assert main(["finetune", "--accelerate_config", "zero4"]) == 1
    assert "shipped configs" in capsys.readouterr().err
