"""`vaccine-trainer grid` on a tiny model: cells share their alignment, resume, and are summarised."""

from __future__ import annotations

import json

import pytest

from testing_utils import pipeline_argv

from vaccine_trainer.cli import main
from vaccine_harness.commands.grid import evaluated_arms, paired_seed_differences, summarise, write_summary

pytestmark = pytest.mark.usefixtures("single_thread")


def test_grid_aligns_once_per_seed_and_summarises_every_cell(workspace, tmp_path, capsys):
    out = tmp_path / "grid"
    argv = [*pipeline_argv(workspace, out), "--methods", "non-aligned,sft", "--seeds", "1,2",
            "--harmful_ratios", "0,0.5"]
    assert main(["grid", *argv]) == 0
    for seed in (1, 2):
        assert (out / f"seed{seed}" / "sft" / "align" / "adapter_config.json").is_file()
        for ratio in ("0", "0.5"):
            cell = out / f"seed{seed}" / f"p{ratio}"
            assert not (cell / "sft" / "align").exists()  # aligned once per seed, beside the cells
            finetune = json.loads((cell / "sft" / "finetune" / "phase.json").read_text())["settings"]
            assert finetune["harmful_ratio"] == float(ratio) and finetune["seed"] == seed
            assert finetune["alignment_adapter"] == str(out / f"seed{seed}" / "sft" / "align")
    # Stage-1 data and training depend on the seed: the two seeds' adapters differ.
    assert ((out / "seed1" / "sft" / "align" / "adapter_model.safetensors").read_bytes()
            != (out / "seed2" / "sft" / "align" / "adapter_model.safetensors").read_bytes())

    summary = json.loads((out / "summary" / "summary.json").read_text())
    assert len(summary["rows"]) == 2 * 2 * 2
    for entry in summary["summary"]:
        rows = [r for r in summary["rows"] if (r["method"], r["harmful_ratio"]) == (entry["method"],
                                                                                   entry["harmful_ratio"])]
        assert entry["seeds"] == [1, 2]
        assert entry["harmful_score"] == pytest.approx(sum(r["harmful_score"] for r in rows) / 2)
        assert entry["harmful_score_n"] == 3
    for name in ("summary.md", "scores_vs_ratio.png", "drift.png"):
        assert (out / "summary" / name).stat().st_size > 0
    # Non-aligned minus SFT pooled over the two seeds, on the same 3 prompts of each: the mean of the seeds' paired
    # differences, inside its interval.
    for entry in summary["pooled_paired"]:
        assert (entry["method"], entry["seeds"], entry["n"]) == ("non-aligned", [1, 2], 6)
        assert entry["prompts_shared_by_seeds"]  # the same prompts on both seeds: one draw of them for both
        per_seed = [next(r["harmful_score"] for r in summary["rows"] if (r["seed"], r["harmful_ratio"], r["method"])
                         == (seed, entry["harmful_ratio"], method))
                    for seed in (1, 2) for method in ("non-aligned", "sft")]
        assert entry["difference"] == pytest.approx((per_seed[0] - per_seed[1] + per_seed[2] - per_seed[3]) / 2)
        assert entry["ci95"][0] <= entry["difference"] <= entry["ci95"][1]
    assert len(summary["pooled_paired"]) == 2
    row = summary["rows"][0]
    flagged = round(row["harmful_score"] * row["harmful_score_n"] / 100)
    from vaccine_harness.evaluation.intervals import wilson_percent

    low, high = wilson_percent(flagged, row["harmful_score_n"])
    assert f"| {row['harmful_score']:.1f} [{low:.1f}, {high:.1f}] |" in (out / "summary" / "summary.md").read_text()
    # The judge is named with its measured accuracy (the held-out labelled pairs, when ../shared is there).
    assert "Judge of the harmful score (its measured accuracy): refusal" in (out / "summary" / "summary.md").read_text()

    # A second call finds every phase done and only rewrites the summary.
    marker = out / "seed2" / "p0.5" / "sft" / "evaluate" / "phase.json"
    stamp = marker.stat().st_mtime_ns
    assert main(["grid", *argv]) == 0
    assert marker.stat().st_mtime_ns == stamp


def test_summary_is_the_mean_and_spread_over_seeds():
    rows = [{"seed": s, "harmful_ratio": 0.1, "method": "sft", "harmful_score": h, "accuracy": a,
             "final_drift": None, "harmful_score_n": 4, "accuracy_n": 2} for s, h, a in ((1, 50.0, 90.0),
                                                                                          (2, 70.0, 80.0))]
    (entry,) = summarise(rows)
    assert entry["harmful_score"] == 60.0 and entry["harmful_score_std"] == pytest.approx(14.1421356)
    assert entry["accuracy"] == 85.0 and entry["final_drift"] is None


def test_a_mean_over_fewer_seeds_than_its_group_says_so(tmp_path):
    """Older cells predate some logged keys: their group's mean must not pass for a mean over every seed."""
    rows = [{"seed": s, "harmful_ratio": 0.1, "method": "sft", "harmful_score": h, "accuracy": 80.0,
             "non_refusal_rate": h, "final_drift": 2.0, "final_drift_fraction": fraction,
             "final_median_token_drift": None, "final_drift_excluding_first_token": None,
             "harmful_score_n": 4, "accuracy_n": 2, "judge": "learned",
             "drift": [], "wall_time_s": {}}
            for s, h, fraction in ((1, 50.0, None), (2, 70.0, None), (3, 60.0, 4e-4))]
    (entry,) = summarise(rows)
    assert entry["final_drift_fraction"] == 4e-4 and entry["final_drift_fraction_num_seeds"] == 1
    assert entry["harmful_score_num_seeds"] == 3 and entry["final_median_token_drift_num_seeds"] == 0
    markdown = write_summary(tmp_path, rows)["markdown"].read_text()
    assert "| sft | 0.1 | 60.0 ± 10.0 | 60.0 ± 10.0 | 80.0 ± 0.0 | – | 2.00e+00 ± 0.00e+00 " \
           "| 4.00e-04 (1 of 3 seeds) | – | – | 4 / 2 |" in markdown


def test_paired_differences_are_taken_seed_by_seed_against_sft(tmp_path):
    def row(seed, method, harm, accuracy, drift=None):
        return {"seed": seed, "harmful_ratio": 0.1, "method": method, "harmful_score": harm, "accuracy": accuracy,
                "non_refusal_rate": harm + 10, "refusal_preference": None, "final_drift": drift,
                "final_drift_fraction": None if drift is None else drift / 100,
                "final_median_token_drift": None if drift is None else drift / 1000,
                "harmful_score_n": 4, "accuracy_n": 2, "judge": "learned",
                "drift": [], "wall_time_s": {}}

    rows = [row(1, "sft", 50.0, 90.0, 4.0), row(1, "vaccine", 40.0, 91.0, 3.0), row(2, "sft", 70.0, 80.0),
            row(2, "vaccine", 64.0, 78.0), row(3, "vaccine", 0.0, 0.0)]  # seed 3 has no SFT cell: no pair
    (entry,) = paired_seed_differences(rows)
    assert (entry["method"], entry["baseline"], entry["seeds"]) == ("vaccine", "sft", [1, 2])
    assert entry["harmful_score"] == [-10.0, -6.0] and entry["harmful_score_mean"] == -8.0
    assert entry["harmful_score_std"] == pytest.approx(2.8284271)
    assert entry["accuracy"] == [1.0, -2.0] and entry["non_refusal_rate"] == [-10.0, -6.0]
    assert entry["final_drift"] == [-1.0] and entry["final_drift_std"] is None  # only seed 1 logged drift
    assert entry["final_drift_fraction"] == [pytest.approx(-0.01)]
    assert entry["refusal_preference"] == [] and entry["refusal_preference_mean"] is None
    markdown = write_summary(tmp_path, rows)["markdown"].read_text()
    assert "| vaccine | 0.1 | 1, 2 | -8.0 ± 2.8 (-10.0, -6.0) |" in markdown
    # drift, its fraction and the median token drift, seed 1 only, named as such
    assert entry["final_drift_seeds"] == [1] and entry["harmful_score_seeds"] == [1, 2]
    assert ("| -1.00e+00 (seed 1: -1.00e+00) | -1.00e-02 (seed 1: -1.00e-02) | -1.00e-03 (seed 1: -1.00e-03) |"
            in markdown)
    assert json.loads((tmp_path / "summary.json").read_text())["paired"][0]["harmful_score_mean"] == -8.0


@pytest.mark.parametrize("flag, value", [("--seeds", "1,1"), ("--harmful_ratios", "0.1,1.5"), ("--seeds", "x")])
def test_bad_grid_axes_are_refused(workspace, flag, value, capsys):
    assert main(["grid", "--model_name_or_path", workspace["model"], flag, value]) == 1
    assert f"{flag} must be" in capsys.readouterr().err


def test_summary_only_runs_nothing_and_lists_unfinished_cells(workspace, tmp_path, capsys):
    out = tmp_path / "grid"
    argv = [*pipeline_argv(workspace, out), "--methods", "non-aligned", "--harmful_ratios", "0"]
    assert main(["grid", *argv, "--summary_only", "true", "--seeds", "1"]) == 1
    assert "No finished cell" in capsys.readouterr().err
    assert main(["grid", *argv, "--seeds", "1"]) == 0
    assert main(["grid", *argv, "--seeds", "1,2", "--summary_only", "true"]) == 0
    assert not (out / "seed2").exists()
    summary = json.loads((out / "summary" / "summary.json").read_text())
    assert summary["missing_cells"] == ["seed 2, p = 0"] and [r["seed"] for r in summary["rows"]] == [1]
    assert "Not finished, left out:** seed 2, p = 0" in (out / "summary" / "summary.md").read_text()

    # A call with another method rewrites the cell's report with that method only; the summary reads every
    # arm evaluated in the cell from its own phases, so both are there, in the order of the methods.
    assert main(["grid", *pipeline_argv(workspace, out), "--methods", "sft", "--harmful_ratios", "0",
                 "--seeds", "1"]) == 0
    assert list(json.loads((out / "seed1" / "p0" / "report" / "report.json").read_text())["methods"]) == ["sft"]
    summary = json.loads((out / "summary" / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["non-aligned", "sft"]
    sft = summary["rows"][1]
    assert set(sft["wall_time_s"]) == {"align", "finetune", "evaluate"} and sft["drift"]
    assert sft["final_drift"] == sft["drift"][-1]["drift"]
    assert sft["final_median_token_drift"] == sft["drift"][-1]["median_token_drift"] > 0


def test_evaluated_arms_are_ordered_by_method_then_rho(tmp_path):
    for folder, label in (("vaccine-rho5", "vaccine rho=5"), ("tvaccine-rho2", "t-vaccine"),
                          ("vaccine-rho2", "vaccine"), ("vaccine-rho0.5", "vaccine rho=0.5"), ("sft", "sft"),
                          ("unfinished", None)):
        (tmp_path / folder / "evaluate").mkdir(parents=True)
        if label:
            (tmp_path / folder / "evaluate" / "phase.json").write_text(json.dumps({"phase": f"{label}/evaluate"}))
    assert evaluated_arms(tmp_path) == [
        ("sft", tmp_path / "sft"), ("vaccine rho=0.5", tmp_path / "vaccine-rho0.5"),
        ("vaccine", tmp_path / "vaccine-rho2"), ("vaccine rho=5", tmp_path / "vaccine-rho5"),
        ("t-vaccine", tmp_path / "tvaccine-rho2")]


def test_align_only_runs_stage_one_per_seed_and_nothing_else(workspace, tmp_path, capsys):
    out = tmp_path / "grid"
    argv = [*pipeline_argv(workspace, out), "--methods", "non-aligned,sft", "--seeds", "1",
            "--harmful_ratios", "0,0.5", "--align_only", "true"]
    assert main(["grid", *argv]) == 0
    assert (out / "seed1" / "sft" / "align" / "phase.json").is_file()
    assert sorted(p.name for p in (out / "seed1").iterdir()) == ["sft"]  # no cell, no stage 2, no report
    assert not (out / "summary").exists()
    # The full grid afterwards reuses that stage 1.
    marker = out / "seed1" / "sft" / "align" / "phase.json"
    stamp = marker.stat().st_mtime_ns
    assert main(["grid", *argv[:-2]]) == 0
    assert marker.stat().st_mtime_ns == stamp and (out / "summary" / "summary.md").is_file()
