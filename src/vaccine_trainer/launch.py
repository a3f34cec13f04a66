"""`--accelerate_config NAME_OR_PATH` and `--num_processes N` on `align` and `finetune`: the command runs again
under `accelerate launch`, as TRL's CLI does for `trl sft --accelerate_config zero3`. `--main_process_port` and
`--mixed_precision` (e.g. `fp16` on GPUs without bf16, `no` on the CPU) override the config's values.

The named configs (multi_gpu, fsdp2, zero2, zero3) ship inside the package, so a `pip install` has them.
A launched rank ends with `exit_launched_rank`, which skips the interpreter's finalization.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import NoReturn

SHIPPED = ("multi_gpu", "fsdp2", "zero2", "zero3")
LAUNCH_FLAGS = ("--accelerate_config", "--num_processes", "--main_process_port", "--mixed_precision")


def accelerate_config_path(name_or_path: str) -> str:
    """A shipped config by name, or a config file by path."""
    if Path(name_or_path).is_file():
        return str(name_or_path)
    if name_or_path in SHIPPED:
        return str(resources.files("vaccine_trainer").joinpath("accelerate_configs", f"{name_or_path}.yaml"))
    raise ValueError(f"--accelerate_config {name_or_path!r} is neither a file nor one of the shipped configs "
                     f"{list(SHIPPED)}.")


def split_launch_flags(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The launch flags (`--flag value` or `--flag=value`) and the command's own arguments."""
    flags, rest, index = {}, [], 0
    while index < len(argv):
        name, equals, value = argv[index].partition("=") if isinstance(argv[index], str) else (argv[index], "", "")
        if name in LAUNCH_FLAGS:
            if not equals:
                if index + 1 >= len(argv):
                    raise ValueError(f"{name} needs a value.")
                index += 1
                value = argv[index]
            flags[name] = value
        else:
            rest.append(argv[index])
        index += 1
    return flags, rest


class LaunchFailedError(RuntimeError):
    """A process of a command run under `accelerate launch` failed; the process printed its own error."""


def launch(command: str, flags: dict[str, str], argv: list[str]) -> int:
    """Run `vaccine-trainer COMMAND argv` under `accelerate launch` with the given config and process count.

    A failed process raises `LaunchFailedError` naming the first rank that failed, instead of the launcher's own
    traceback under the process's error."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    launch_args = []
    if "--accelerate_config" in flags:
        launch_args += ["--config_file", accelerate_config_path(flags["--accelerate_config"])]
    for name in LAUNCH_FLAGS[1:]:
        if name in flags:
            launch_args += [name, flags[name]]
    failed = f"`{command}` under accelerate launch failed"
    try:
        launch_command(launch_command_parser().parse_args([*launch_args, "-m", "vaccine_trainer.cli", command,
                                                            *argv]))
    except ChildFailedError as error:  # several processes (torchrun)
        rank, failure = error.get_first_failure()
        raise LaunchFailedError(f"{failed}: {len(error.failures)} of its processes exited with an error, rank "
                                f"{rank} first (exit code {failure.exitcode}); that process's error is printed "
                                "above.") from None
    except subprocess.CalledProcessError as error:  # one process
        raise LaunchFailedError(f"{failed}: its process exited with code {error.returncode}; its error is printed "
                                "above.") from None
    except SystemExit as error:  # accelerate's own exits (--quiet, a signal)
        if error.code:
            raise LaunchFailedError(f"{failed} (exit code {error.code}); its error is printed above.") from None
    return 0


def exit_launched_rank(code: int) -> NoReturn:
    """Exit with `code`; a rank started by torchrun (`accelerate launch`) skips the interpreter's finalization.

    With its work saved and its process group ended, a 2-process ZeRO-3 rank still aborted in about 1 exit in 12
    ("terminate called without an active exception", SIGABRT; the launch then exits 1): a native thread touched
    Python objects while the interpreter was being torn down (pytorch/pytorch#190489). Such a rank runs the exit
    handlers (logging's flush, `report_to` integrations) and flushes its streams itself, then `os._exit`s: nothing
    is left to finalize. Any other process, or a Python without `atexit._run_exitfuncs` (CPython's, underscore-named),
    exits normally."""
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if "LOCAL_RANK" not in os.environ or "torch" not in sys.modules or run_exit_handlers is None:
        raise SystemExit(code)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


__all__ = ["SHIPPED", "accelerate_config_path", "exit_launched_rank", "launch", "split_launch_flags"]
