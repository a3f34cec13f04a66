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


LEAVING_PROCESS = """
import atexit, os, sys, torch
from pathlib import Path
from vaccine_trainer.launch import exit_launched_rank

folder = Path(sys.argv[1])


class Finalized:
    def __init__(self, path):  # holds an open file and os.write: modules may be torn down when it runs
        self.file, self.write = os.open(path, os.O_WRONLY | os.O_CREAT), os.write

    def __del__(self):  # runs while the interpreter clears __main__, after the exit handlers
        self.write(self.file, b"yes")


kept = Finalized(folder / "finalized")
atexit.register(lambda: (folder / "exit_handler").write_text("yes"))
print("saved", end="")  # buffered: a pipe is not a terminal
if len(sys.argv) > 2:  # a Python whose atexit lacks CPython's private runner
    del atexit._run_exitfuncs
exit_launched_rank(3)
"""


@pytest.mark.parametrize("launched, without_runner", [(True, False), (False, False), (True, True)],
                         ids=["rank-of-a-launch", "plain-process", "rank-on-a-python-without-the-runner"])
def test_a_launched_rank_exits_with_its_code_and_handlers_but_without_finalization(tmp_path, launched,
                                                                                    without_runner):
    """A rank started by torchrun runs the exit handlers and flushes its output, then skips the finalization in
    which a native thread could abort it; any other process, or a Python that lacks the private runner of the exit
    handlers, exits as usual."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "LOCAL_RANK"} | ({"LOCAL_RANK": "1"}
                                                                                      if launched else {})
    argv = [sys.executable, "-c", LEAVING_PROCESS, str(tmp_path)] + (["without-runner"] if without_runner else [])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and done.stdout == "saved", done.stderr
    assert (tmp_path / "exit_handler").read_text() == "yes"
    assert (tmp_path / "finalized").read_text() == ("" if launched and not without_runner else "yes")


def test_align_with_a_config_runs_itself_under_accelerate_launch(monkeypatch):
    import accelerate.commands.launch as accelerate_launch

    seen = []
    monkeypatch.setattr(accelerate_launch, "launch_command", seen.append)
    assert main(["align", "--model_name_or_path", "m", "--accelerate_config", "zero3", "--num_processes", "2",
                 "--mixed_precision", "fp16", "--main_process_port=29555", "--rho", "2"]) == 0
    (args,) = seen
    assert args.config_file == accelerate_config_path("zero3") and args.num_processes == 2
    assert args.mixed_precision == "fp16" and args.main_process_port == 29555
    assert args.module and args.training_script == "vaccine_trainer.cli"
    assert args.training_script_args == ["align", "--model_name_or_path", "m", "--rho", "2"]


def test_an_unknown_config_name_is_a_clear_error(capsys):
    assert main(["finetune", "--accelerate_config", "zero4"]) == 1
    assert "shipped configs" in capsys.readouterr().err


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def readme_recipes() -> list[list[list[str]]]:
    """The README's scale-out recipes: per code block, its commands as argument lists."""
    import re
    import shlex

    from testing_utils import REPO_ROOT

    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("<!-- scale-out recipes"):text.index("<!-- end of scale-out recipes -->")]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    recipes = []
    for block in blocks:
        lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
        recipes.append([shlex.split(line) for line in lines])
    return recipes


TINY_SIZES = {  # a few rows and steps; the flags of the recipe itself are kept
    "align": ["--num_samples", "4", "--max_steps", "1", "--per_device_train_batch_size", "1", "--max_length", "64",
              "--report_to", "none", "--save_strategy", "no", "--seed", "0"],
    "finetune": ["--num_samples", "4", "--harmful_ratio", "0.5", "--drift_samples", "2", "--max_steps", "1",
                 "--max_length", "64", "--report_to", "none", "--save_strategy", "no", "--task", "sst2"],
    "evaluate": ["--num_prompts", "2", "--task", "sst2", "--num_task_samples", "2", "--max_new_tokens", "4",
                 "--task_max_new_tokens", "2", "--judge", "refusal"],
}


def same_run_by_hand(args: list[str], output: Path, env: dict[str, str]) -> None:
    """`accelerate launch --config_file <shipped config> ... -m vaccine_trainer.cli align` of the arguments the CLI
    relaunched itself with: the same adapter, bit for bit."""
    import subprocess
    import sys

    from testing_utils import REPO_ROOT
    from safetensors.torch import load_file

    launch_flags, own = split_launch_flags(args)
    launch = ["--config_file", accelerate_config_path(launch_flags.pop("--accelerate_config"))]
    launch += [item for pair in launch_flags.items() for item in pair]
    cli_output = Path(own[own.index("--output_dir") + 1])
    own[own.index("--output_dir") + 1] = str(output)
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "vaccine_trainer.cli",
                           "align", *own, *TINY_SIZES["align"]], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    mine, by_hand = (load_file(str(folder / "adapter_model.safetensors")) for folder in (cli_output, output))
    assert mine.keys() == by_hand.keys() and all(torch_equal(mine[k], by_hand[k]) for k in mine)


@pytest.mark.distributed
@pytest.mark.parametrize("recipe", [0, 1], ids=["7b-on-8-gpus", "70b"])
def test_the_readme_scale_out_recipes_run_at_tiny_size(workspace, tmp_path, recipe):
    """Each line of the README's recipes, with its own flags, on a tiny Llama: 2 CPU processes in fp32 instead of 8
    GPUs, local files instead of hub datasets. The 70B recipe's `align --accelerate_config zero3 --num_processes 2`
    equals `accelerate launch` of the shipped zero3 config running the same command."""
    import json
    import os
    import subprocess
    import sys

    from testing_utils import REPO_ROOT

    commands = readme_recipes()[recipe]
    assert [command[1] for command in commands] == ["align", "finetune", "evaluate"]
    local = {"meta-llama/Llama-2-7b-hf": workspace["model"], "meta-llama/Llama-2-70b-hf": workspace["model"],
             "PKU-Alignment/BeaverTails": workspace["alignment"]}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for command in commands:
        args = []
        for flag, value in zip(command[2::2], command[3::2]):
            if flag == "--num_processes":
                args += [flag, "2", "--mixed_precision", "no", "--main_process_port", "0"]
                continue
            if flag in ("--output_dir", "--output_file", "--alignment_adapter", "--adapter"):
                value = str(tmp_path / value)
            args += [flag, local.get(value, value)]
        name = command[1]
        if name == "finetune":
            args += ["--harmful_dataset", workspace["harmful"], "--benign_dataset", workspace["sst2"]]
        if name == "evaluate":
            args += ["--harmful_prompts", workspace["harmful"], "--task_dataset", workspace["sst2"]]
        done = subprocess.run([sys.executable, "-m", "vaccine_trainer.cli", name, *args, *TINY_SIZES[name]],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{name}: {done.stderr[-4000:]}"
        if name == "align":  # one step of one row on each of 2 processes: half of the 4 rows (one process: 0.25)
            output = Path(args[args.index("--output_dir") + 1])
            assert json.loads((output / "trainer_state.json").read_text())["epoch"] == 0.5
        if name == "align" and "zero3" in args:  # the relaunch is `accelerate launch` of the same run
            same_run_by_hand(args, tmp_path / "by_hand", env)
    finetuned = Path(args[args.index("--adapter") + 1])
    state = json.loads((finetuned / "trainer_state.json").read_text())
    assert any("alignment/drift" in entry for entry in state["log_history"])
    assert json.loads((finetuned / "vaccine_stage2.json").read_text())
    evaluation = json.loads(Path(args[args.index("--output_file") + 1]).read_text())
    assert "harmful_score" in json.dumps(evaluation)


ONE_PROCESS_CONFIG = "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\nuse_cpu: true\n"


@pytest.mark.distributed
@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_launched_command_that_fails_ends_with_one_line_naming_it(workspace, tmp_path, processes):
    """A launched `align` whose processes fail (a dataset that is not there) prints each process's error, then ends
    with exit code 1 and one line that says so, not the launcher's traceback: torchrun's ChildFailedError with the
    shipped multi_gpu config on 2 processes, a CalledProcessError with a one-process config (no torchrun)."""
    import os
    import re
    import subprocess
    import sys

    from testing_utils import REPO_ROOT

    if processes == "1":
        config = tmp_path / "one_process.yaml"
        config.write_text(ONE_PROCESS_CONFIG)
        launch = ["--accelerate_config", str(config)]
    else:
        launch = ["--accelerate_config", "multi_gpu", "--num_processes", "2", "--main_process_port", "0"]
    missing = tmp_path / "missing.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "vaccine_trainer.cli", "align", *launch, "--mixed_precision", "no",
         "--model_name_or_path", workspace["model"], "--dataset", str(missing), "--output_dir", str(tmp_path / "out"),
         *TINY_SIZES["align"]],
        cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True,
        text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-4000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    assert str(missing) in done.stderr  # a process said what is wrong (with 2, torchrun may stop the other first)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("vaccine-trainer align: error: `align` under accelerate launch failed: "), last
    expected = (r"its process exited with code 1; its error is printed above\.$" if processes == "1" else
                r"[12] of its processes exited with an error, rank [01] first \(exit code 1\)")
    assert re.search(expected, last), last


def test_a_launched_pipeline_phase_that_fails_is_named(monkeypatch, tmp_path):
    import vaccine_trainer.launch
    from vaccine_harness.commands import pipeline

    def failing(command, flags, argv):
        raise vaccine_trainer.launch.LaunchFailedError(f"`{command}` under accelerate launch failed: rank 1.")

    monkeypatch.setattr(vaccine_trainer.launch, "launch", failing)
    with pytest.raises(vaccine_trainer.launch.LaunchFailedError, match=r"^sft/align: `align` under accelerate "
                                                                        r"launch failed: rank 1\. Fix it"):
        pipeline.run_phase(tmp_path / "sft", "sft/align", "align", {"output_dir": str(tmp_path / "sft")},
                           launch={"--num_processes": "2"})
    assert not (tmp_path / "sft" / pipeline.PHASE_MARKER).exists()  # not marked done
