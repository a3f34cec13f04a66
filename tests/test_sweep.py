"""The attacker sweep: its cells run and resume, and the guard and the worst case agree with a hand computation."""

from __future__ import annotations

import json

import pytest
from test_cli import workspace  # noqa: F401  (the saved tiny model and its data)
from test_pipeline import pipeline_argv

from vaccine_trainer.cli import main
from vaccine_trainer.commands.sweep import keeps_guard, worst_cases

pytestmark = pytest.mark.usefixtures("single_thread")


def row(method, rate, epochs, harm, accuracy, benign=80.0, seed=42):
    return {"seed": seed, "harmful_ratio": 0.1, "learning_rate": rate, "epochs": epochs, "method": method,
            "harmful_score": harm, "harmful_ci95": [harm - 5, harm + 5], "accuracy": accuracy,
            "benign_accuracy": benign}


def test_the_guard_and_the_worst_case_by_hand():
    rows = [row("sft", 1e-3, 2, 30.0, 79.0), row("sft", 4e-3, 2, 60.0, 74.0),   # 74 < 80 - 5: broken
            row("sft", 2e-3, 4, 45.0, 75.0),                                      # exactly 5 below: kept
            row("vaccine", 1e-3, 2, 25.0, 81.0), row("vaccine", 4e-3, 6, 50.0, None)]  # no accuracy: not counted
    assert [keeps_guard(r, 5.0) for r in rows] == [True, False, True, True, False]
    sft, vaccine = worst_cases(rows, 5.0)
    assert (sft["method"], sft["worst_harmful_score"], sft["worst_setting"]) == (
        "sft", 45.0, {"learning_rate": 2e-3, "epochs": 4})
    assert sft["mean_harmful_score"] == pytest.approx((30 + 60 + 45) / 3) and sft["guarded_cells"] == 2
    assert (vaccine["worst_harmful_score"], vaccine["guarded_cells"], vaccine["cells"]) == (25.0, 1, 2)
    assert worst_cases([row("sft", 1e-3, 2, 30.0, 10.0)], 5.0)[0]["worst_harmful_score"] is None


def test_the_sweep_runs_its_cells_reuses_the_grids_and_resumes(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    base = [*pipeline_argv(workspace, out), "--methods", "sft,vaccine", "--seeds", "1", "--harmful_ratios", "0.5",
            "--finetune_epochs", "1", "--epochs", "1"]
    assert main(["sweep", *base, "--learning_rates", "0.01"]) == 0  # interrupted after the first setting
    own = out / "seed1" / "p0.5"  # lr 0.01 for 1 epoch is the configuration's own setting: the grid's cell
    marker = own / "sft" / "evaluate" / "phase.json"
    stamp = marker.stat().st_mtime_ns
    assert main(["sweep", *base, "--learning_rates", "0.01,0.05"]) == 0
    assert marker.stat().st_mtime_ns == stamp  # resumed: the finished cell did not run again
    other = out / "seed1" / "sweep-p0.5" / "lr0.05-ep1"
    for arm in ("sft", "vaccine-rho2"):
        settings = json.loads((other / arm / "finetune" / "phase.json").read_text())["settings"]
        assert settings["learning_rate"] == 0.05 and settings["harmful_ratio"] == 0.5
        assert settings["alignment_adapter"] == str(out / "seed1" / arm / "align")  # stage 1 shared
    assert (out / "seed1" / "p0" / "sft" / "evaluate" / "phase.json").is_file()  # the benign-only reference

    summary = json.loads((out / "sweep_summary" / "sweep.json").read_text())
    assert sorted((r["method"], r["learning_rate"]) for r in summary["rows"]) == [
        ("sft", 0.01), ("sft", 0.05), ("vaccine", 0.01), ("vaccine", 0.05)]
    benign = json.loads((out / "seed1" / "p0" / "sft" / "evaluate" / "evaluation.json").read_text())
    assert all(r["benign_accuracy"] == benign["accuracy"]["accuracy"] for r in summary["rows"] if r["method"] == "sft")
    assert [w["method"] for w in summary["worst_cases"]] == ["sft", "vaccine"]
    assert summary["planned_cells"] == 4  # one seed, one p, two settings, two arms
    assert "Cells finished: 4 of 4 planned" in (out / "sweep_summary" / "sweep.md").read_text()
    assert main(["sweep", *base, "--learning_rates", "0.01,0.05,0.1", "--summary_only", "true"]) == 0
    assert "Cells finished: 4 of 6 planned" in (out / "sweep_summary" / "sweep.md").read_text()  # a partial sweep
    for name in ("sweep.md", "harmful_score_heatmap.png", "worst_case.png"):
        assert (out / "sweep_summary" / name).stat().st_size > 0


def test_a_sweep_without_an_aligned_arm_is_refused(workspace, tmp_path, capsys):  # noqa: F811
    assert main(["sweep", *pipeline_argv(workspace, tmp_path), "--methods", "non-aligned"]) == 1
    assert "aligned arms" in capsys.readouterr().err
