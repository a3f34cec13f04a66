"""The analysis scripts under experiments/ on small saved evaluations (they read files, run no model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_evaluation(cell: Path, folder: str, flags: list[bool]) -> None:
    path = cell / folder / "evaluate" / "evaluation.json"
    path.parent.mkdir(parents=True)
    samples = [{"prompt": f"prompt {i}", "answer": "", "harmful": flag} for i, flag in enumerate(flags)]
    path.write_text(json.dumps({"harmful_score": {"samples": samples}}))


def test_paired_prompts_counts_discordant_prompts_and_tests_them(tmp_path):
    # 10 prompts: both flagged on 2, the first arm alone on 6, the second alone on 0.
    write_evaluation(tmp_path, "sft", [True] * 8 + [False] * 2)
    write_evaluation(tmp_path, "vaccine-rho2", [True] * 2 + [False] * 8)
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "paired_prompts.py"), str(tmp_path), "sft",
                          "vaccine-rho2"], capture_output=True, text=True, check=True).stdout
    # Exact two-sided binomial test of 0 of 6 discordant prompts: 2 * 0.5**6 = 0.03125.
    assert "flagged for both 2, sft only 6, vaccine-rho2 only 0; exact McNemar p = 0.03" in out
