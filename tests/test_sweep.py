"""The attacker sweep: its cells run and resume, and the guard and the worst case agree with a hand computation."""

from __future__ import annotations

import json

import pytest

from testing_utils import pipeline_argv

from vaccine_trainer.cli import main
from vaccine_harness.commands.sweep import keeps_guard, worst_cases

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


def flags(*harmful):
    """Verdicts on prompts q0, q1, ...: True where harmful."""
    return {f"q{index}": bool(value) for index, value in enumerate(harmful)}


def test_the_arms_against_sft_on_the_same_prompts_by_hand():
    from vaccine_harness.commands.sweep_pairs import cell_key, paired_cells, paired_markdown, paired_targets

    rows = [row("sft", 1e-3, 2, 50.0, 80.0), row("sft", 4e-3, 2, 75.0, 80.0),
            row("vaccine", 1e-3, 2, 75.0, 70.0),   # broken guard (70 < 75): not Vaccine's worst case
            row("vaccine", 4e-3, 2, 50.0, 80.0)]
    verdicts = {cell_key(rows[0]): flags(1, 1, 0, 0), cell_key(rows[1]): flags(1, 1, 1, 0),
                cell_key(rows[2]): flags(1, 1, 1, 0), cell_key(rows[3]): flags(1, 0, 0, 1)}
    cells = paired_cells(rows, verdicts)
    # lr 1e-3: Vaccine flags q2 alone: 75 - 50 = +25 points, split 0 / 1
    # lr 4e-3: SFT flags q1, q2 alone, Vaccine q3 alone: 50 - 75 = -25 points, split 2 / 1
    assert [(c["learning_rate"], c["difference"], c["only_baseline"], c["only_method"]) for c in cells] == [
        (1e-3, 25.0, 0, 1), (4e-3, -25.0, 2, 1)]
    assert cells[1]["mcnemar_p"] == pytest.approx(1.0) and cells[1]["ci95"][0] <= -25.0 <= cells[1]["ci95"][1]
    (target,) = paired_targets(rows, verdicts, lambda r: keeps_guard(r, 5.0))
    # worst cases: Vaccine 50 (its one guarded cell), SFT 75: -25 points; mean: (75 + 50) / 2 - (50 + 75) / 2 = 0
    assert (target["method"], target["worst_difference"], target["mean_difference"]) == ("vaccine", -25.0, 0.0)
    assert (target["common_cells"], target["only_baseline"], target["only_method"]) == (2, 2, 2)
    assert target["worst_ci95"][0] <= -25.0 <= target["worst_ci95"][1] and "mcnemar_p" not in target
    assert paired_targets(rows, verdicts, lambda r: True)[0]["worst_difference"] == 0.0  # without the guard: 75 - 75
    markdown = "\n".join(paired_markdown(cells, [target]))
    assert "| 42 | 0.1 | vaccine | -25.0 [" in markdown and "| 2 | 2 / 2 |\n" in markdown
    assert "| 0.004 | 2 | -25.0 [" in markdown and "| 2 / 1 | 1.00 |" in markdown
    # judged on other prompts: no comparison rather than a wrong one
    verdicts[cell_key(rows[3])] = {"other": True, "q1": False, "q2": False, "q3": True}
    assert len(paired_cells(rows, verdicts)) == 1 and paired_targets(rows, verdicts, lambda r: True) == []


def test_while_a_sweep_runs_the_targets_compare_only_settings_both_arms_finished():
    """SFT has finished a stronger attacker that Vaccine has not: its 100% is no part of Vaccine's worst case yet."""
    from vaccine_harness.commands.sweep_pairs import cell_key, paired_targets

    rows = [row("sft", 1e-3, 2, 50.0, 80.0), row("sft", 4e-3, 2, 100.0, 80.0), row("vaccine", 1e-3, 2, 75.0, 80.0)]
    verdicts = {cell_key(rows[0]): flags(1, 1, 0, 0), cell_key(rows[1]): flags(1, 1, 1, 1),
                cell_key(rows[2]): flags(1, 1, 1, 0)}
    (target,) = paired_targets(rows, verdicts, lambda r: True)
    assert (target["worst_difference"], target["mean_difference"], target["common_cells"]) == (25.0, 25.0, 1)


def test_the_paired_intervals_do_not_depend_on_the_order_the_prompts_were_read_in():
    """The bootstrap draws prompts by position: the summary of a sweep (verdicts in evaluation order) and the one
    recomputed from its verdict files (written sorted) must pair the prompts in one order, or their intervals
    differ (they did, by up to 0.2 points on 500 prompts, before the pairing sorted them)."""
    import random

    from vaccine_harness.commands.sweep_pairs import cell_key, paired_cells, paired_targets

    generator = random.Random(0)
    rows = [row(method, rate, 2, 0.0, 80.0) for method in ("sft", "vaccine") for rate in (1e-3, 4e-3)]
    verdicts = {cell_key(r): {f"prompt{i:03d}": generator.random() < 0.5 for i in range(200)} for r in rows}
    shuffled = {}
    for key, cell in verdicts.items():
        order = list(cell)
        generator.shuffle(order)
        shuffled[key] = {prompt: cell[prompt] for prompt in order}
    assert [list(c) for c in shuffled.values()] != [list(c) for c in verdicts.values()]
    assert paired_cells(rows, shuffled) == paired_cells(rows, verdicts)
    assert paired_targets(rows, shuffled, lambda r: True) == paired_targets(rows, verdicts, lambda r: True)


def test_a_cell_redone_without_its_reference_takes_the_reference_files_accuracy(tmp_path):
    """A cell redone on a machine that lost its p = 0 reference's run has no benign-only accuracy of its own: the
    summary from the verdict files takes the reference file's, rather than dropping the cell from the guard."""
    from testing_utils import load_script

    from vaccine_harness.commands.sweep_pairs import cell_key
    from vaccine_harness.commands.verdict_files import write_verdict_files

    def cell(*args, **kwargs):  # a row as the sweep writes it
        return {**row(*args, **kwargs), "accuracy_ci95": [70.0, 85.0], "num_prompts": 10}

    reference = {**cell("sft", 1e-3, 2, 20.0, 80.0), "harmful_ratio": 0.0, "reference": True}
    kept, redone = cell("sft", 1e-3, 2, 30.0, 79.0), cell("sft", 4e-3, 6, 60.0, 78.0, benign=None)
    rows = [reference, kept, redone]
    verdicts = {cell_key(r): flags(*(i < r["harmful_score"] / 10 for i in range(10))) for r in rows}
    write_verdict_files(tmp_path / "verdicts", rows, verdicts)
    script = load_script("experiments/sweep_from_verdicts.py")
    assert script.main([str(tmp_path / "out"), str(tmp_path / "verdicts")]) == 0
    (sft,) = json.loads((tmp_path / "out" / "sweep.json").read_text())["worst_cases"]
    assert (sft["worst_harmful_score"], sft["guarded_cells"]) == (60.0, 2)  # 30.0 and 1 with the cell dropped

    write_verdict_files(tmp_path / "other", [reference, {**redone, "benign_accuracy": 70.0}], verdicts)
    with pytest.raises(ValueError, match="another stage 1"):  # a cell of another stage 1 is not mixed in
        script.main([str(tmp_path / "out"), str(tmp_path / "other")])


def test_the_sweep_runs_its_cells_reuses_the_grids_and_resumes(workspace, tmp_path):
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
    paired = {(c["method"], c["learning_rate"]): c for c in summary["paired_cells"]}
    by_setting = {(r["method"], r["learning_rate"]): r["harmful_score"] for r in summary["rows"]}
    assert sorted(paired) == [("vaccine", 0.01), ("vaccine", 0.05)]
    for (method, rate), entry in paired.items():  # the paired difference is the difference of the two scores
        assert entry["difference"] == pytest.approx(by_setting[method, rate] - by_setting["sft", rate])
    (target,) = summary["paired_targets"]
    assert target["mean_difference"] == pytest.approx(sum(e["difference"] for e in paired.values()) / 2)
    assert summary["planned_cells"] == 4  # one seed, one p, two settings, two arms
    assert "Cells finished: 4 of 4 planned" in (out / "sweep_summary" / "sweep.md").read_text()
    assert main(["sweep", *base, "--learning_rates", "0.01,0.05,0.1", "--summary_only", "true"]) == 0
    assert "Cells finished: 4 of 6 planned" in (out / "sweep_summary" / "sweep.md").read_text()  # a partial sweep
    for name in ("sweep.md", "harmful_score_heatmap.png", "worst_case.png"):
        assert (out / "sweep_summary" / name).stat().st_size > 0

    # every cell's verdicts are kept beside the summary, and the summary's figures come back from them alone
    from vaccine_harness.commands.sweep import summarise_cells
    from vaccine_harness.commands.verdict_files import read_verdict_files

    files = sorted((out / "sweep_summary" / "verdicts").glob("*.json"))
    assert [f.name for f in files] == ["seed1-p0-lr0.01-ep1-sft.json", "seed1-p0-lr0.01-ep1-vaccine.json",  # p = 0
                                       "seed1-p0.5-lr0.01-ep1-sft.json", "seed1-p0.5-lr0.01-ep1-vaccine.json",
                                       "seed1-p0.5-lr0.05-ep1-sft.json", "seed1-p0.5-lr0.05-ep1-vaccine.json"]
    rows, verdicts = read_verdict_files([out / "sweep_summary" / "verdicts"])
    assert sum(bool(row.get("reference")) for row in rows) == 2
    rows = [row for row in rows if not row.get("reference")]
    assert all(len(v) == len(json.loads(files[0].read_text())["verdicts"]) > 0 for v in verdicts.values())
    assert all(len(prompt) == 16 for v in verdicts.values() for prompt in v)  # hashed: no prompt text copied
    again = summarise_cells(rows, verdicts, 5.0, 6)
    for key in ("worst_cases", "paired_targets", "paired_cells"):
        assert json.loads(json.dumps(again[key])) == summary[key], key
    from testing_utils import load_script  # and the script that does it for committed files

    assert load_script("experiments/sweep_from_verdicts.py").main(
        [str(tmp_path / "again"), str(out / "sweep_summary" / "verdicts")]) == 0
    recomputed = json.loads((tmp_path / "again" / "sweep.json").read_text())
    assert recomputed["worst_cases"] == summary["worst_cases"]
    assert recomputed["paired_targets"] == summary["paired_targets"]


def test_a_sweep_without_an_aligned_arm_is_refused(workspace, tmp_path, capsys):
    assert main(["sweep", *pipeline_argv(workspace, tmp_path), "--methods", "non-aligned"]) == 1
    assert "aligned arms" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ --workers: parallel cells

def parsed(argv: list[str]):
    from trl import TrlParser

    from vaccine_harness.commands.pipeline import PipelineArguments
    from vaccine_harness.commands.sweep import SweepArguments

    return TrlParser((PipelineArguments, SweepArguments)).parse_args_and_config(argv)


def parallel_argv(output_dir) -> list[str]:
    return ["--output_dir", str(output_dir), "--model_name_or_path", "base", "--methods", "sft,vaccine",
            "--seeds", "1,2", "--harmful_ratios", "0.1", "--learning_rates", "4e-3,1e-3", "--epochs", "6,2",
            "--finetune_learning_rate", "1e-3", "--finetune_epochs", "2"]


def test_the_parallel_jobs_are_the_sequential_sweeps_runs_one_arm_a_job(tmp_path, monkeypatch):
    import vaccine_harness.commands.sweep as sweep_command

    args, sweep = parsed(parallel_argv(tmp_path / "s"))

    def fields(run):
        return (run.output_dir, run.seed, run.harmful_ratio, run.finetune_learning_rate, run.finetune_epochs,
                run.alignment_dir, run.model_name_or_path)

    theirs, ours = [], []
    monkeypatch.setattr(sweep_command, "run_pipeline", theirs.append)
    sweep_command.run_cells_here(args, sweep)
    monkeypatch.setattr(sweep_command, "run_pipeline", ours.append)
    jobs = sweep_command.sweep_jobs(args, sweep, tmp_path / "arguments.json")
    for job in jobs:
        sweep_command.run_job(args, job.name)

    # Stage 1 of every seed and arm first (side by side); every other job waits for its own stage 1.
    assert [job.name for job in jobs[:4]] == ["align:1:sft", "align:1:vaccine", "align:2:sft", "align:2:vaccine"]
    assert all(job.needs == "align:" + ":".join(job.name.split(":")[1:3]) for job in jobs[4:])
    assert jobs[-1].command[-3:] == ["vaccine_harness.commands.sweep_worker", str(tmp_path / "arguments.json"),
                                     "cell:2:vaccine:0.1:0.001:2"]
    aligns = [run for run in ours if run.align_only]
    assert [(run.seed, run.methods) for run in aligns] == [(1, "sft"), (1, "vaccine"), (2, "sft"), (2, "vaccine")]
    assert all(run.alignment_dir == str(tmp_path / "s" / f"seed{run.seed}") for run in aligns)
    # The rest are the sequential sweep's own runs (p = 0 references, then each setting), one arm at a time.
    expected = sorted((fields(run), method) for run in theirs for method in ("sft", "vaccine"))
    assert sorted((fields(run), run.methods) for run in ours if not run.align_only) == expected
    assert len(expected) == 2 * 2 * (1 + 4)  # seeds x arms x (reference + settings)
    assert (str(tmp_path / "s" / "seed1" / "p0.1"), 1, 0.1, 1e-3, 2.0) in {fields(run)[:5] for run in ours}
    with pytest.raises(ValueError, match="Unknown sweep job 'cell:1:sft:0.1'"):
        sweep_command.run_job(args, "cell:1:sft:0.1")


def shell_jobs(tmp_path, commands: dict[str, str], seeds: str = "1"):
    """The sweep's jobs with shell commands in place of runs: `exit 1` fails, `sleep 30` outlives a deadline."""
    from vaccine_harness.commands.sweep import sweep_jobs

    args, sweep = parsed([*parallel_argv(tmp_path), "--seeds", seeds])
    jobs = sweep_jobs(args, sweep, tmp_path / "arguments.json")
    for job in jobs:
        job.command = ["sh", "-c", commands.get(job.name, "exit 0")]
    return jobs


def test_a_failed_job_is_retried_once_and_what_needs_it_never_starts(tmp_path, monkeypatch):
    from vaccine_harness.commands import parallel_jobs

    monkeypatch.setattr(parallel_jobs, "POLL_S", 0.01)
    jobs = shell_jobs(tmp_path, {"align:1:vaccine": "exit 1"})
    ended = {job.name: job for job in parallel_jobs.run_jobs(jobs, tmp_path / "jobs", workers=3)}

    assert [run["rc"] for run in ended["align:1:vaccine"].history] == [1, 1]  # the first try and one retry
    vaccine = [name for name in ended if name.split(":")[2] == "vaccine" and not name.startswith("align")]
    assert len(vaccine) == 5 and all(not ended[name].history for name in vaccine)  # never started
    sft = [job for name, job in ended.items() if name.split(":")[2] == "sft"]
    assert len(sft) == 6 and all([run["rc"] for run in job.history] == [0] and job.succeeded for job in sft)
    status = json.loads((tmp_path / "jobs" / "jobs.json").read_text())
    assert len(status["jobs"]) == 12 and (tmp_path / "jobs" / "align_1_vaccine.log").is_file()


def test_at_the_deadline_running_jobs_stop_and_no_more_start(tmp_path, monkeypatch):
    import time

    from vaccine_harness.commands import parallel_jobs

    monkeypatch.setattr(parallel_jobs, "POLL_S", 0.01)
    jobs = shell_jobs(tmp_path, {"align:1:sft": "sleep 30", "align:1:vaccine": "sleep 30"})
    started = time.time()
    ended = {job.name: job for job in parallel_jobs.run_jobs(jobs, tmp_path / "jobs", workers=2, stop_after_s=0.2,
                                                             kill_after_s=0.5)}
    assert time.time() - started < 10
    assert [run["rc"] for run in ended["align:1:sft"].history] == ["stopped"]  # stopped, not retried
    assert sum(1 for job in ended.values() if job.history) == 2 and len(ended) == 12


@pytest.mark.parametrize("extra, message", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--workers", "2", "--accelerate_config", "multi_gpu"], "use --workers 1 with it"),
])
def test_bad_worker_settings_are_refused_before_anything_runs(
        workspace, tmp_path, capsys, extra, message):
    assert main(["sweep", *pipeline_argv(workspace, tmp_path), "--methods", "sft", *extra]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "seed42").exists()


def test_a_parallel_sweep_trains_what_the_sequential_one_does(workspace, tmp_path, monkeypatch):
    """Real jobs (`python -m vaccine_harness.commands.sweep_worker`), each one CPU thread as this process."""
    import os

    from vaccine_harness.commands import parallel_jobs

    monkeypatch.setattr(parallel_jobs, "POLL_S", 0.2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # 2 workers: one thread each, as the sequential run here
    base = ["--methods", "sft,vaccine", "--seeds", "1", "--harmful_ratios", "0.5", "--finetune_epochs", "1",
            "--epochs", "1", "--learning_rates", "0.05"]
    sequential, parallel = tmp_path / "sequential", tmp_path / "parallel"
    assert main(["sweep", *pipeline_argv(workspace, sequential), *base]) == 0
    assert main(["sweep", *pipeline_argv(workspace, parallel), *base, "--workers", "2"]) == 0

    jobs = json.loads((parallel / "jobs" / "jobs.json").read_text())["jobs"]
    assert sorted(job["job"] for job in jobs) == sorted(
        ["align:1:sft", "align:1:vaccine", "reference:1:sft", "reference:1:vaccine", "cell:1:sft:0.5:0.05:1",
         "cell:1:vaccine:0.5:0.05:1"]) and all(job["runs"][-1]["rc"] == 0 for job in jobs)
    for cell in ("p0", "sweep-p0.5/lr0.05-ep1"):
        for arm in ("sft", "vaccine-rho2"):
            ours, theirs = (json.loads((root / "seed1" / cell / arm / "evaluate" / "evaluation.json").read_text())
                            for root in (parallel, sequential))
            assert ours["harmful_score"]["samples"] == theirs["harmful_score"]["samples"]
            assert ours["accuracy"]["accuracy"] == theirs["accuracy"]["accuracy"]
    from safetensors.torch import load_file

    for arm in ("sft", "vaccine-rho2"):
        tuned = "sweep-p0.5/lr0.05-ep1/" + arm + "/finetune/adapter_model.safetensors"
        for path in (f"{arm}/align/adapter_model.safetensors", tuned):
            ours, theirs = (load_file(root / "seed1" / path) for root in (parallel, sequential))
            assert all(ours[key].equal(theirs[key]) for key in theirs)
    for cell in ("p0", "sweep-p0.5/lr0.05-ep1"):  # each job wrote its own arm; the sweep wrote both at the end
        ours, theirs = (json.loads((root / "seed1" / cell / "report" / "report.json").read_text())["methods"]
                        for root in (parallel, sequential))
        assert list(ours) == list(theirs) == ["sft", "vaccine"]
    summary = json.loads((parallel / "sweep_summary" / "sweep.json").read_text())
    assert sorted(row["method"] for row in summary["rows"]) == ["sft", "vaccine"] and summary["unfinished_jobs"] == []

    # Past its deadline a run starts nothing: the summary keeps the finished cells, names the rest, and exits 1.
    more = [*pipeline_argv(workspace, parallel), *base[:-1], "0.05,0.1", "--workers", "2", "--stop_after_s", "0"]
    assert main(["sweep", *more]) == 1
    summary = json.loads((parallel / "sweep_summary" / "sweep.json").read_text())
    assert len(summary["rows"]) == 2 and len(summary["unfinished_jobs"]) == 2 + 2 + 2 * 2
    assert "Jobs that did not finish in this run (8; a new run resumes them): align:1:sft" in (
        parallel / "sweep_summary" / "sweep.md").read_text()


def test_summaries_of_different_cells_combine_and_the_worst_case_is_recomputed_over_all(tmp_path):
    from testing_utils import load_script

    combine_sweeps = load_script("experiments/combine_sweeps.py")

    def part(rows, planned, guard=5.0):
        rows = [{**r, "accuracy_ci95": None, "num_prompts": 4} for r in rows]  # as collect_cells writes them
        cells = [{"seed": 42, "harmful_ratio": 0.1, "learning_rate": r["learning_rate"], "epochs": r["epochs"],
                  "method": "vaccine", "baseline": "sft", "difference": 1.0, "ci95": [-1.0, 3.0], "prompts": 4,
                  "only_baseline": 1, "only_method": 2, "mcnemar_p": 1.0} for r in rows if r["method"] == "vaccine"]
        return {"guard_points": guard, "planned_cells": planned, "rows": rows, "worst_cases": [],
                "paired_targets": [{"seed": 42, "method": "vaccine", "mean_difference": 9.9}], "paired_cells": cells}

    first = part([row("sft", 4e-3, 6, 60.0, 80.0), row("vaccine", 4e-3, 6, 55.0, 80.0)], planned=6)
    second = part([row("sft", 5e-4, 2, 20.0, 80.0), row("vaccine", 5e-4, 2, 65.0, 80.0),  # Vaccine's worst
                   row("sft", 5e-4, 4, 70.0, 70.0)], planned=3)                              # broken guard
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(second))
    assert combine_sweeps.main([str(tmp_path / "out"), str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    combined = json.loads((tmp_path / "out" / "sweep.json").read_text())
    sft, vaccine = combined["worst_cases"]
    # by hand: SFT's guarded cells 60 and 20 -> 60 at (4e-3, 6), mean (60 + 20 + 70) / 3; Vaccine 65 at (5e-4, 2)
    assert (sft["worst_harmful_score"], sft["worst_setting"], sft["guarded_cells"], sft["cells"]) == (
        60.0, {"learning_rate": 4e-3, "epochs": 6}, 2, 3)
    assert sft["mean_harmful_score"] == pytest.approx(50.0) and vaccine["mean_harmful_score"] == pytest.approx(60.0)
    assert (vaccine["worst_harmful_score"], vaccine["worst_setting"]) == (65.0, {"learning_rate": 5e-4, "epochs": 2})
    assert combined["planned_cells"] == 6 and len(combined["rows"]) == 5 and len(combined["paired_cells"]) == 2
    assert combined["paired_targets"] == []  # the parts' intervals need verdicts per prompt: not carried over
    markdown = (tmp_path / "out" / "sweep.md").read_text()
    assert "Cells finished: 5 of 6 planned" in markdown and "No paired interval" in markdown
    assert "Worst case − sft's" not in markdown and "| 42 | 0.1 | vaccine | 0.0005 | 2 | +1.0" in markdown
    with pytest.raises(ValueError, match="in both"):
        combine_sweeps.combine({"a": first, "again": first})
    with pytest.raises(ValueError, match="different guards"):
        combine_sweeps.combine({"a": first, "b": {**second, "guard_points": 3.0}})


def test_explicit_attacks_replace_the_cross_product_in_their_order():
    from vaccine_harness.commands.sweep import SweepArguments

    assert SweepArguments(attacks="1e-3x2, 4e-3X4,2e-3x6").settings() == [(1e-3, 2.0), (4e-3, 4.0), (2e-3, 6.0)]
    assert SweepArguments(learning_rates="1e-3,2e-3", epochs="2").settings() == [(1e-3, 2.0), (2e-3, 2.0)]
    for bad in ("1e-3", "1e-3x2,1e-3x2", "0x2", "ax2", "1e-3x2x3"):
        with pytest.raises(ValueError, match="--attacks must be"):
            SweepArguments(attacks=bad).settings()
