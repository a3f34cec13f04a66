"""One job of a parallel sweep, in its own process (`vaccine-trainer sweep --workers N` starts these).

    python -m vaccine_harness.commands.sweep_worker <output_dir>/jobs/sweep_arguments.json <job name>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .pipeline import PipelineArguments
from .sweep import run_job


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    arguments_file, name = argv
    arguments = json.loads(Path(arguments_file).read_text())
    run_job(PipelineArguments(**arguments["pipeline"]), name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
