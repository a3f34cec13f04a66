"""Import cost of the package and of `vaccine-trainer --help`, each in a fresh interpreter.

    python bench/import_cost.py [--repeats 5]

Prints the median wall time of each command and whether torch was imported; run on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "vaccine-trainer --help": [sys.executable, "-m", "vaccine_trainer", "--help"],
    "import vaccine_trainer": [sys.executable, "-c", "import vaccine_trainer"],
    "from vaccine_trainer import VaccineTrainer": [sys.executable, "-c", "from vaccine_trainer import VaccineTrainer"],
    "from vaccine_trainer import VaccineSFTTrainer": [sys.executable, "-c",
                                                      "from vaccine_trainer import VaccineSFTTrainer"],
    "reference: from transformers import Trainer; import peft": [
        sys.executable, "-c", "from transformers import Trainer; import peft"],
}
PROBE = "; import sys; print('torch' in sys.modules, 'trl' in sys.modules)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| command | median s | torch imported | trl imported |")
    print("|---|---:|---|---|")
    for name, command in CASES.items():
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            subprocess.run(command, capture_output=True, check=True)
            times.append(time.perf_counter() - started)
        if command[1] == "-c":
            probe = subprocess.run([*command[:2], command[2] + PROBE], capture_output=True, text=True, check=True)
            torch_seen, trl_seen = probe.stdout.split()[-2:]
        else:
            probe = subprocess.run([sys.executable, "-X", "importtime", *command[1:]], capture_output=True, text=True)
            torch_seen = str(any(line.rstrip().endswith("| torch") for line in probe.stderr.splitlines()))
            trl_seen = str(any(line.rstrip().endswith("| trl") for line in probe.stderr.splitlines()))
        print(f"| `{name}` | {statistics.median(times):.2f} | {torch_seen} | {trl_seen} |")


if __name__ == "__main__":
    main()
