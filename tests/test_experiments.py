"""The analysis scripts under experiments/ on small saved runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testing_utils import REPO_ROOT, VOCAB, load_script, pipeline_argv, save_tiny_causal_lm, tiny_model
from datasets import Dataset
from transformers import AutoTokenizer

from vaccine_trainer.cli import main
from vaccine_harness.commands.grid import cell_dir, write_summary
from vaccine_trainer.layers import find_vaccine_modules


def write_evaluation(cell: Path, folder: str, flags: list[bool]) -> None:
    path = cell / folder / "evaluate" / "evaluation.json"
    path.parent.mkdir(parents=True)
    samples = [{"prompt": f"prompt {i}", "answer": "", "harmful": flag} for i, flag in enumerate(flags)]
    path.write_text(json.dumps({"harmful_score": {"samples": samples}}))


def test_paired_prompts_counts_discordant_prompts_and_tests_them(tmp_path):
    # 10 prompts: both flagged on 2, the first arm alone on 6, the second alone on 0.
    write_evaluation(tmp_path, "sft", [True] * 8 + [False] * 2)
    write_evaluation(tmp_path, "vaccine-rho2", [True] * 2 + [False] * 8)
    out = subprocess.run([sys.executable, str(REPO_ROOT / "experiments" / "paired_prompts.py"), str(tmp_path), "sft",
                          "vaccine-rho2"], capture_output=True, text=True, check=True).stdout
    # Exact two-sided binomial test of 0 of 6 discordant prompts: 2 * 0.5**6 = 0.03125.
    assert "flagged for both 2, sft only 6, vaccine-rho2 only 0; exact McNemar p = 0.03" in out


def test_paired_prompts_pools_the_discordant_prompts_of_several_cells(tmp_path):
    # Seed 1: sft alone on 3, vaccine alone on 1; seed 2: sft alone on 4, vaccine alone on 0 -> pooled 7 against 1.
    for seed, (sft, vaccine) in {1: ([True] * 4 + [False] * 6, [True] + [False] * 3 + [True] + [False] * 5),
                                 2: ([True] * 5 + [False] * 5, [True] + [False] * 9)}.items():
        write_evaluation(tmp_path / f"seed{seed}", "sft", sft)
        write_evaluation(tmp_path / f"seed{seed}", "vaccine-rho2", vaccine)
    out = subprocess.run([sys.executable, str(REPO_ROOT / "experiments" / "paired_prompts.py"), str(tmp_path / "seed1"),
                          str(tmp_path / "seed2"), "sft", "vaccine-rho2"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert "sft only 3, vaccine-rho2 only 1; exact McNemar p = 0.62" in out[0]
    assert "sft only 4, vaccine-rho2 only 0; exact McNemar p = 0.12" in out[1]
    # 1 of 8 discordant pairs: 2 * (1 + 8) / 2**8 = 0.0703
    assert out[2] == ("pooled over 2 cells: 20 (cell, prompt) pairs; flagged for both 2, sft only 7, "
                      "vaccine-rho2 only 1; exact McNemar p = 0.07")


def run_to_run_file(path: Path, flags: list[bool], **row) -> Path:
    cell = {"method": "sft", "seed": 42, "harmful_ratio": 0.1, "learning_rate": 0.001, "epochs": 2.0,
            "num_prompts": len(flags), "accuracy": 70.0} | row
    path.write_text(json.dumps({"row": cell, "verdicts": {f"p{i:02d}": flag for i, flag in enumerate(flags)}}))
    return path


def test_run_to_run_counts_the_flips_between_two_runs_of_one_cell(tmp_path):
    # 20 prompts: 6 flagged in both, 4 in the first run only, 1 in the second only.
    first = run_to_run_file(tmp_path / "a.json", [True] * 10 + [False] * 10)
    second = run_to_run_file(tmp_path / "b.json", [True] * 6 + [False] * 4 + [True] + [False] * 9, accuracy=71.5)
    script = str(REPO_ROOT / "experiments" / "run_to_run.py")
    out = subprocess.run([sys.executable, script, str(first), str(second), "--json", str(tmp_path / "c.json")],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("harmful score 50.0% -> 35.0% (-15.0 points, paired 95% [")
    # Exact two-sided binomial test of 1 of 5 discordant prompts: 2 * (1 + 5) / 2**5 = 0.375.
    assert "SST2 70.0 -> 71.5; flipped: 4 flagged in the first run only, 1 in the second only (McNemar p 0.38)" in out
    result = json.loads((tmp_path / "c.json").read_text())
    low, high = result["difference_points"][1:]
    assert low < -15.0 < high
    other = run_to_run_file(tmp_path / "d.json", [True] * 10 + [False] * 10, seed=43)
    refused = subprocess.run([sys.executable, script, str(first), str(other)], capture_output=True, text=True)
    assert refused.returncode == 2 and "differ in ['seed']" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.usefixtures("single_thread")
def test_drift_fraction_recomputes_the_logged_drift_and_the_summary_takes_what_old_logs_lack(
        workspace, tmp_path):
    out = cell_dir(tmp_path, 42, 0.25)
    assert main(["pipeline", *pipeline_argv(workspace, out), "--methods", "non-aligned,sft"]) == 0

    def table() -> dict[str, list[float]]:
        lines = subprocess.run([sys.executable, str(REPO_ROOT / "experiments" / "drift_fraction.py"), str(out)],
                               capture_output=True, text=True, check=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.splitlines()
        return {line.split("|")[2].strip(): [float(cell) for cell in line.split("|")[3:8]]
                for line in lines if line.startswith("| ") and not line.startswith("| cell")}

    rows = table()
    assert set(rows) == {"non-aligned", "sft"}
    for arm, (logged, recomputed, fraction, median, after_first) in rows.items():
        last = json.loads((out / arm / "finetune" / "alignment_drift.json").read_text())[-1]
        assert logged == pytest.approx(last["alignment/drift"], rel=1e-3) and logged > 0
        assert recomputed == pytest.approx(logged, rel=1e-3)
        assert fraction == pytest.approx(last["alignment/drift_fraction"], rel=1e-3)
        assert median == pytest.approx(last["alignment/median_token_drift"], rel=1e-3) and median > 0
        assert after_first == pytest.approx(last["alignment/drift_excluding_first_token"], rel=1e-3)
        assert 0 < after_first < recomputed

    drift_fraction = load_script("experiments/drift_fraction.py")
    saved = out / "sft" / "finetune" / drift_fraction.RECOMPUTED_DRIFT_FILE
    stored = json.loads(saved.read_text())
    saved.write_text(json.dumps(stored | {"median_token_drift": 123.0}))
    assert table()["sft"][3] == 123.0  # read back from the file, not recomputed

    # An old cell: its stage-2 log predates the fraction and the median; the summary takes the saved ones.
    state_path = out / "sft" / "finetune" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    for log in state["log_history"]:
        log.pop("alignment/drift_fraction", None)
        log.pop("alignment/median_token_drift", None)
        log.pop("alignment/drift_excluding_first_token", None)
    state_path.write_text(json.dumps(state))
    summary_rows, _ = drift_fraction.rows_with_recomputed_drift(tmp_path, [42], [0.25])
    by_arm = {row["method"]: row for row in summary_rows}
    assert by_arm["sft"]["final_median_token_drift"] == 123.0
    assert by_arm["sft"]["final_drift_fraction"] == pytest.approx(stored["drift_fraction"])
    assert sorted(by_arm["sft"]["drift_recomputed"]) == [
        "drift_excluding_first_token", "drift_fraction", "median_token_drift"]
    assert by_arm["sft"]["final_drift_excluding_first_token"] == pytest.approx(stored["drift_excluding_first_token"])
    assert by_arm["non-aligned"]["drift_recomputed"] == []  # its log has both: the log wins
    notes = drift_fraction.recomputed_note(summary_rows)
    markdown = write_summary(tmp_path / "summary", summary_rows, notes=notes)["markdown"].read_text()
    assert "Recomputed from the saved stage-2 adapter for 1 arm(s)" in markdown


def test_perturbed_loss_measures_every_finished_stage_1_or_the_arms_named(tmp_path):
    perturbed_loss = load_script("experiments/perturbed_loss.py")
    for arm in ("sft", "vaccine-rho5"):
        (tmp_path / arm / "align").mkdir(parents=True)
        (tmp_path / arm / "align" / "phase.json").write_text("{}")
    (tmp_path / "vaccine-rho2" / "align").mkdir(parents=True)  # no marker: stage 1 not finished
    assert perturbed_loss.aligned_arms(tmp_path) == [("non-aligned", None), ("sft", tmp_path / "sft" / "align"),
                                                     ("vaccine-rho5", tmp_path / "vaccine-rho5" / "align")]
    assert perturbed_loss.aligned_arms(tmp_path, ["vaccine-rho5"]) == [
        ("vaccine-rho5", tmp_path / "vaccine-rho5" / "align")]
    with pytest.raises(SystemExit, match=r"no finished stage 1 for \['vaccine-rho2'\]"):
        perturbed_loss.aligned_arms(tmp_path, ["sft", "vaccine-rho2"])


def test_perturbed_loss_scores_the_rows_as_stage_1_tokenized_them(tmp_path):
    perturbed_loss = load_script("experiments/perturbed_loss.py")
    words = "how do i bake bread mix flour water salt and yeast then bake it".split()
    tokenizer = AutoTokenizer.from_pretrained(save_tiny_causal_lm(tmp_path / "model", [" ".join(words)]))
    rows = [{"prompt": [{"role": "user", "content": " ".join(words[:4])}],
             "completion": [{"role": "assistant", "content": " ".join(words[4:])}]},
            {"prompt": [{"role": "user", "content": " ".join(words * 3)}],  # fills max_length on its own
             "completion": [{"role": "assistant", "content": "bake"}]}]
    tokenized = perturbed_loss.tokenize_rows(str(tmp_path / "model"), tokenizer, Dataset.from_list(rows), 24)
    ids = tokenizer.apply_chat_template(rows[0]["prompt"] + rows[0]["completion"], return_dict=True)["input_ids"]
    prompt_ids = tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
    assert len(prompt_ids) < len(ids) <= 24
    assert tokenized == [(ids, len(prompt_ids))]  # the second row has nothing left to score: dropped


def test_perturbed_loss_is_the_clean_loss_plus_a_first_order_ascent_of_size_rho():
    perturbed_loss = load_script("experiments/perturbed_loss.py")
    torch.manual_seed(0)
    model = tiny_model("llama").requires_grad_(False)
    modules = [module for _, module in find_vaccine_modules(model, "attention")]
    tokenized = [(torch.randint(3, VOCAB, (length,)).tolist(), first) for length, first in ((9, 4), (12, 5), (7, 2))]
    batch_list = list(perturbed_loss.batches(tokenized, 2, 0))
    assert [b[0].shape for b in batch_list] == [(2, 12), (1, 7)] and (batch_list[0][2][0, :4] == -100).all()
    losses = perturbed_loss.perturbed_losses(model, modules, batch_list, [1e-3, 0.5])
    # clean: the token-weighted mean of the model's own loss on each batch
    counts = [int((labels[:, 1:] != -100).sum()) for _, _, labels in batch_list]
    with torch.no_grad():
        clean = [model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
                 for ids, mask, labels in batch_list]
    assert losses[0.0] == pytest.approx(sum(c * v for c, v in zip(counts, clean)) / sum(counts), rel=1e-5)
    # along the gradient: a tiny rho raises the loss a little, a larger one more
    assert 0 < losses[1e-3] - losses[0.0] < 1e-2 and losses[0.5] > losses[1e-3]
    assert not any(module._forward_hooks for module in modules)  # no hook left behind


def test_the_replication_reread_rebuilds_the_committed_cells(capsys):
    """The per-prompt tables rebuilt from committed counts give the committed scores (else the script stops) and the
    paired mean difference docs/replication.md reports."""
    reread = load_script("experiments/reread_replication.py")
    reread.main()
    out = capsys.readouterr().out
    assert "| 0.1 | 42 | 31.0 [25.0, 37.7] | 29.0 [23.2, 35.6] |" in out
    assert "| 0.1 | mean of 3 | | | | | -4.2 [" in out
    # the seeds' discordant prompts made to coincide: the same difference, a wider interval drawn once for all seeds
    apart = next(line for line in out.splitlines() if line.startswith("| 0.1 | mean of 3 |"))
    widest = next(line for line in out.splitlines() if line.startswith("| 0.1 | mean of 3, widest |"))
    bounds = [[float(v) for v in line.split("| -4.2 [")[1].split("]")[0].split(", ")] for line in (apart, widest)]
    assert bounds[1][0] < bounds[0][0] and bounds[1][1] > bounds[0][1]
    assert "sensitivity 0.818 (468/572), specificity 0.589 (256/435)" in out


def test_the_pilot_rule_picks_the_largest_rho_within_the_loss_margin_and_the_guard(tmp_path, capsys):
    import json

    from testing_utils import load_script

    rule = load_script("experiments/pilot_rule.py")
    cell = tmp_path / "seed42" / "p0"

    def evaluated(arm, loss, accuracy):
        (cell / arm / "evaluate").mkdir(parents=True)
        (cell / arm / "evaluate" / "evaluation.json").write_text(json.dumps({
            "likelihood": {"held_out_alignment_loss": loss}, "accuracy": {"accuracy": accuracy},
            "harmful_score": {"score": 20.0}}))

    evaluated("sft", 1.40, 73.0)
    evaluated("vaccine-relative-rho0.01", 1.45, 70.0)   # +0.05, -3 points: passes
    evaluated("vaccine-relative-rho0.03", 1.55, 72.0)   # +0.15: fails the loss margin
    evaluated("vaccine-relative-rho0.02", 1.49, 67.5)   # -5.5 points: fails the guard
    assert rule.main([str(tmp_path), "--json", str(tmp_path / "rule.json")]) == 0
    result = json.loads((tmp_path / "rule.json").read_text())
    assert result["chosen_rho"] == 0.01
    assert [result["candidates"][r]["passes"] for r in ("0.01", "0.02", "0.03")] == [True, False, False]
    evaluated("vaccine-relative-rho0.005", 1.41, 73.0)
    rule.main([str(tmp_path), "--json", str(tmp_path / "rule.json")])
    assert json.loads((tmp_path / "rule.json").read_text())["chosen_rho"] == 0.01  # the largest that passes


@pytest.mark.usefixtures("single_thread")
def test_layer_drift_measures_each_layer_against_the_aligned_model_and_where_the_paper_pushes(
        workspace, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "cell"
    assert main(["pipeline", *pipeline_argv(workspace, out), "--methods", "sft"]) == 0
    tuned = out / "sft" / "finetune"
    untouched = tmp_path / "untouched"  # the same stage 2 with its adapter's B zeroed: the aligned model itself
    untouched.mkdir()
    for path in tuned.iterdir():
        if path.is_file():
            (untouched / path.name).write_bytes(path.read_bytes())
    state = load_file(str(tuned / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()},
              str(untouched / "adapter_model.safetensors"))
    layer_drift = load_script("experiments/layer_drift.py")
    rho = 2.0
    moved = layer_drift.arm_profile(tuned, rows=4, rho=rho)
    still = layer_drift.arm_profile(untouched, rows=4, rho=None)
    layers = len(moved["relative_drift"])
    assert layers == len(still["relative_drift"]) > 1 and "paper_push_relative_size" not in still
    assert all(d > 0 for d in moved["relative_drift"]) and all(d == 0 for d in still["relative_drift"])
    push = moved["paper_push_relative_size"]
    assert len(push) == layers and all(p > 0 for p in push)
