"""`--accelerate_config` / `--num_processes` on `align` and `finetune`: the command again under `accelerate launch`,
with the configs shipped in the package (as `trl sft --accelerate_config zero3`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_cli import workspace  # noqa: F401  (the saved tiny model and its data)

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


def test_align_relaunched_by_the_cli_equals_accelerate_launch_of_the_same_run(workspace, tmp_path):  # noqa: F811
    """Two DeepSpeed ZeRO-3 processes on the CPU (the CPU config given by path, on a free port), started by
    `vaccine-trainer align --accelerate_config ... --num_processes 2` and by `accelerate launch`: the same adapter."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from conftest import REPO_ROOT
    from safetensors.torch import load_file

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cpu_config = REPO_ROOT / "examples" / "accelerate" / "cpu" / "deepspeed_zero3.yaml"
    launch_config = tmp_path / "zero3_cpu.yaml"
    launch_config.write_text(cpu_config.read_text() + f"main_process_port: {port}\n")
    align = ["--model_name_or_path", workspace["model"], "--dataset", workspace["alignment"], "--num_samples", "4",
             "--rho", "2", "--max_steps", "2", "--per_device_train_batch_size", "1", "--report_to", "none",
             "--save_strategy", "no", "--max_length", "64", "--activation_checkpointing", "false", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = {
        "cli": [sys.executable, "-m", "vaccine_trainer.cli", "align", "--accelerate_config", str(launch_config),
                "--num_processes", "2", "--output_dir", str(tmp_path / "cli"), *align],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cpu_config),
                       "--num_processes", "2", "--main_process_port", "0", "-m", "vaccine_trainer.cli", "align",
                       "--output_dir", str(tmp_path / "accelerate"), *align],
    }
    for name, command in runs.items():
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        state = json.loads((tmp_path / name / "trainer_state.json").read_text())
        assert state["epoch"] == 1.0  # 2 steps of 1 row on each of 2 processes: all 4 rows (one process: 0.5)
    cli, reference = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in runs)
    assert cli.keys() == reference.keys() and all(torch_equal(cli[k], reference[k]) for k in cli)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
