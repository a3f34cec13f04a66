"""`vaccine-trainer evaluate` and `pipeline` end to end on a tiny saved model and tiny local files."""

from __future__ import annotations

import json

import pytest
from testing_utils import SHARED_DATA, pipeline_argv

from vaccine_trainer.cli import main
from vaccine_harness.commands.pipeline import PipelineArguments
from vaccine_harness.evaluation import non_refusal_rate

pytestmark = pytest.mark.usefixtures("single_thread")


def test_pipeline_runs_every_method_writes_the_report_and_resumes(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    pairs = tmp_path / "labelled.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"tell me how to steal a car {i} .", "is_safe": False,
                                         "response": "sure , here is how to steal a car ."}) + "\n" for i in range(3)))
    argv = [*pipeline_argv(workspace, out), "--harmful_pairs", str(pairs),
            *(["--judge_data_dir", str(SHARED_DATA)] if SHARED_DATA.is_dir() else [])]
    assert main(["pipeline", *argv]) == 0
    report = json.loads((out / "report" / "report.json").read_text())
    for figures in report["methods"].values():  # the judge-free metrics, on every arm
        assert figures["likelihood"]["n_harmful"] == 3 and figures["likelihood"]["n_alignment"] > 0
        assert figures["likelihood"]["harmful_answer_nll"] > 0
    assert "Judge-free metrics" in (out / "report" / "report.md").read_text()
    assert list(report["methods"]) == ["non-aligned", "sft", "vaccine"]
    assert {m: e["n"] for m, e in report["paired_differences"].items()} == {"non-aligned": 3, "vaccine": 3}
    for method, folder in (("non-aligned", "non-aligned"), ("sft", "sft"), ("vaccine", "vaccine-rho2")):
        evaluation = json.loads((out / folder / "evaluate" / "evaluation.json").read_text())
        assert report["methods"][method]["harmful_score"]["score"] == evaluation["harmful_score"]["score"]
        answers = [sample["answer"] for sample in evaluation["harmful_score"]["samples"]]
        assert report["methods"][method]["harmful_score"]["non_refusal_rate"] == non_refusal_rate(answers)
        assert report["methods"][method]["harmful_score"]["n"] == 3
        assert report["methods"][method]["accuracy"]["n"] == 4
        by_likelihood = report["methods"][method]["accuracy_by_likelihood"]  # both fine-tune accuracies
        low, high = by_likelihood["ci95"]
        assert by_likelihood["n"] == 4 and low <= by_likelihood["accuracy"] <= high
        harm = report["methods"][method]["harmful_score"]
        assert harm["ci95"][0] <= harm["score"] <= harm["ci95"][1]
        if SHARED_DATA.is_dir():  # measured on the shared labelled pairs: the corrected score too
            assert harm["corrected"]["sensitivity"] == evaluation["judge_check"]["true_positives"] / \
                evaluation["judge_check"]["positives"]
        assert (out / folder / "finetune" / "adapter_model.safetensors").is_file()
        assert report["drift"][method][0]["drift"] == 0.0  # drift starts at exactly zero
    assert not (out / "non-aligned" / "align").exists()
    assert json.loads((out / "vaccine-rho2" / "align" / "vaccine_config.json").read_text())["settings"]["rho"] == 2.0
    assert json.loads((out / "sft" / "align" / "vaccine_config.json").read_text())["settings"]["rho"] == 0.0
    for name in ("report.md", "scores.png", "drift.png"):
        assert (out / "report" / name).stat().st_size > 0
    assert "vaccine" in (out / "report" / "report.md").read_text()
    # The arms are really different models: stage 1 (rho 0 vs 2) and so stage 2 trained different adapters.
    from safetensors.torch import load_file

    def weights(folder):
        return load_file(str(out / folder / "adapter_model.safetensors"))

    for stage in ("align", "finetune"):
        sft, vaccine = weights(f"sft/{stage}"), weights(f"vaccine-rho2/{stage}")
        assert sft.keys() == vaccine.keys() and any(not sft[k].equal(vaccine[k]) for k in sft), stage
    plain = weights("non-aligned/finetune")
    assert any(not plain[k].equal(weights("sft/finetune")[k]) for k in plain)

    # Resumable: a finished phase is not run again, and the report is rebuilt from what is on disk; an
    # evaluation saved before the non-refusal rate existed gets it from its saved answers.
    marker = out / "vaccine-rho2" / "align" / "phase.json"
    stamp = marker.stat().st_mtime_ns
    (out / "report" / "report.json").unlink()
    saved = out / "sft" / "evaluate" / "evaluation.json"
    old_format = json.loads(saved.read_text())
    del old_format["harmful_score"]["non_refusal_rate"]
    saved.write_text(json.dumps(old_format))
    capsys.readouterr()
    assert main(["pipeline", *argv]) == 0
    assert marker.stat().st_mtime_ns == stamp
    assert json.loads((out / "report" / "report.json").read_text())["methods"] == report["methods"]


@pytest.mark.parametrize("argv, message", [
    (lambda ws, tmp: ["evaluate", "--model_name_or_path", ws["model"], "--adapter", str(tmp / "nope"),
                      "--harmful_prompts", ws["harmful"], "--num_prompts", "2", "--task_dataset", ws["sst2"],
                      "--num_task_samples", "2"], "adapter_config.json"),
    (lambda ws, tmp: ["pipeline", "--methods", "sft,dpo", "--model_name_or_path", ws["model"]], "--methods must be"),
    (lambda ws, tmp: ["evaluate", "--model_name_or_path", ws["model"], "--judge", "beaverdamn",
                      "--harmful_prompts", ws["harmful"], "--num_prompts", "2", "--task", ""], "Unknown judge"),
], ids=["missing-adapter", "bad-methods", "bad-judge"])
def test_evaluate_and_pipeline_refuse_bad_input(workspace, tmp_path, capsys, argv, message):
    assert main(argv(workspace, tmp_path)) == 1
    assert message in capsys.readouterr().err


def test_a_finished_phase_with_other_settings_is_refused_not_reused(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*pipeline_argv(workspace, out), "--methods", "sft"]
    assert main(["pipeline", *argv]) == 0
    capsys.readouterr()
    assert main(["pipeline", *argv, "--align_learning_rate", "0.5"]) == 1
    error = capsys.readouterr().err
    assert "holds a finished run with other settings (differing: learning_rate;" in error
    assert "--learning_rate 0.5" in error


def test_a_rho_sweep_runs_one_vaccine_arm_per_rho(workspace, tmp_path):
    out = tmp_path / "run"
    assert main(["pipeline", *pipeline_argv(workspace, out), "--methods", "vaccine", "--rho", "0.5,3"]) == 0
    report = json.loads((out / "report" / "report.json").read_text())
    assert list(report["methods"]) == ["vaccine rho=0.5", "vaccine rho=3"]
    for rho in (0.5, 3.0):
        config = json.loads((out / f"vaccine-rho{rho:g}" / "align" / "vaccine_config.json").read_text())
        assert config["settings"]["rho"] == rho


@pytest.mark.parametrize(("rho", "labels"), [
    ("2", ["sft", "vaccine", "t-vaccine"]),
    ("0.5", ["sft", "vaccine rho=0.5", "t-vaccine rho=0.5"]),  # never the same label as a rho-2 run in that root
    ("0.5,2,5", ["sft", "vaccine rho=0.5", "vaccine", "vaccine rho=5", "t-vaccine rho=0.5", "t-vaccine",
                 "t-vaccine rho=5"]),  # the sweep's rho-2 arm pairs with earlier `vaccine` cells
])
def test_arm_labels_name_rho_unless_it_is_the_papers(rho, labels):
    arms = PipelineArguments(methods="sft,vaccine,t-vaccine", rho=rho).arms()
    assert [arm.label for arm in arms] == labels
    assert len({arm.folder for arm in arms}) == len(arms)


def test_an_arm_of_another_norm_is_named_and_kept_apart_and_aligns_with_that_norm(tmp_path):
    from vaccine_harness.commands.pipeline import align_settings

    args = PipelineArguments(methods="sft,vaccine", rho="0.05,2", vaccine_norm="relative")
    arms = args.arms()
    assert [(arm.label, arm.folder) for arm in arms] == [
        ("sft", "sft"), ("vaccine relative rho=0.05", "vaccine-relative-rho0.05"),
        ("vaccine relative rho=2", "vaccine-relative-rho2")]  # never the paper's `vaccine` at rho 2
    assert align_settings(args, arms[1], "m", tmp_path)["vaccine_norm"] == "relative"
    assert "vaccine_norm" not in align_settings(args, arms[0], "m", tmp_path)  # SFT: no perturbation at all
    assert "vaccine_norm" not in align_settings(PipelineArguments(), PipelineArguments().arms()[2], "m", tmp_path)


@pytest.mark.parametrize("rho", ["0", "2,2", "-1", "two"])
def test_bad_rho_lists_are_refused(workspace, rho, capsys):
    assert main(["pipeline", "--model_name_or_path", workspace["model"], "--rho", rho]) == 1
    assert "--rho must be" in capsys.readouterr().err


def test_evaluated_model_merges_stage_one_and_applies_stage_two(tmp_path):
    """`evaluate` scores base + merged alignment adapter + fine-tuning adapter, not the base model."""
    import peft
    import torch
    from testing_utils import save_tiny_causal_lm
    from transformers import AutoModelForCausalLM

    from vaccine_harness.commands.evaluate import load_evaluated_model

    base_path = save_tiny_causal_lm(tmp_path / "base", ["hello world"])

    def adapter(model, folder, seed):
        torch.manual_seed(seed)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                 init_lora_weights=False, task_type="CAUSAL_LM")
        peft.get_peft_model(model, config).save_pretrained(folder)
        return folder

    stage1 = adapter(AutoModelForCausalLM.from_pretrained(base_path), tmp_path / "align", seed=1)
    def merged_stage_one():
        base = AutoModelForCausalLM.from_pretrained(base_path)
        return peft.PeftModel.from_pretrained(base, stage1).merge_and_unload()

    stage2 = adapter(merged_stage_one(), tmp_path / "finetune", seed=2)

    ids = torch.tensor([[5, 9, 12, 7, 3, 20]])

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    by_hand = peft.PeftModel.from_pretrained(merged_stage_one(), stage2)
    evaluated = logits(load_evaluated_model(str(base_path), str(stage1), str(stage2)))
    assert torch.allclose(evaluated, logits(by_hand), atol=1e-5)
    assert not torch.allclose(evaluated, logits(AutoModelForCausalLM.from_pretrained(base_path)), atol=1e-3)
    aligned_only = logits(load_evaluated_model(str(base_path), str(stage1)))
    assert torch.allclose(aligned_only, logits(merged_stage_one()), atol=1e-5)
    assert not torch.allclose(evaluated, aligned_only, atol=1e-3)
    # The model flags reach from_pretrained: bf16 weights on an explicit device map, the same model within bf16.
    from vaccine_harness.commands.evaluate import EvaluateArguments

    flags = EvaluateArguments(dtype="bfloat16", device_map="cpu", attn_implementation="eager").load_kwargs()
    assert flags == {"dtype": "bfloat16", "device_map": "cpu", "attn_implementation": "eager"}
    in_bf16 = load_evaluated_model(str(base_path), str(stage1), str(stage2), **flags)
    assert {p.dtype for p in in_bf16.parameters()} == {torch.bfloat16}
    assert in_bf16.config._attn_implementation == "eager"
    assert torch.allclose(logits(in_bf16).float(), evaluated, atol=0.05 * evaluated.abs().max().item())


def test_a_t_vaccine_arm_aligns_with_sampled_layers_probed_on_the_harmful_data(workspace, tmp_path):
    out = tmp_path / "run"
    assert main(["pipeline", *pipeline_argv(workspace, out), "--methods", "vaccine,t-vaccine",
                 "--sampled_layers", "1"]) == 0
    report = json.loads((out / "report" / "report.json").read_text())
    assert list(report["methods"]) == ["vaccine", "t-vaccine"]
    settings = json.loads((out / "tvaccine-rho2" / "align" / "vaccine_config.json").read_text())["settings"]
    assert settings["vaccine_layer_sampling"] is True and settings["vaccine_sampled_layers"] == 1
    assert json.loads((out / "vaccine-rho2" / "align" / "vaccine_config.json").read_text())["settings"][
        "vaccine_layer_sampling"] is False
    marker = json.loads((out / "tvaccine-rho2" / "align" / "phase.json").read_text())
    assert marker["settings"]["probe_dataset"] == workspace["harmful"]
    state = json.loads((out / "tvaccine-rho2" / "align" / "trainer_state.json").read_text())["stateful_callbacks"]
    sampling = state["VaccineStateCallback"]["attributes"]["layer_sampling"]
    assert len(sampling["active"]) == 1 and sum(sampling["probabilities"]) == pytest.approx(1.0)


@pytest.mark.distributed
def test_the_pipeline_launches_its_training_phases_on_several_processes(workspace, tmp_path):
    """`--accelerate_config zero3 --num_processes 2`: stage 1 runs as `align` under accelerate launch, on 2 processes
    (2 steps of 2 rows on each: the 4 rows twice; one process would see them once)."""
    out = tmp_path / "run"
    assert main(["pipeline", *pipeline_argv(workspace, out), "--methods", "sft", "--align_only", "true",
                 "--accelerate_config", "zero3", "--num_processes", "2",
                 "--launch_args", json.dumps({"mixed_precision": "no", "main_process_port": 0})]) == 0
    state = json.loads((out / "sft" / "align" / "trainer_state.json").read_text())
    assert state["epoch"] == 2.0 and state["global_step"] == 2
    assert main(["pipeline", *pipeline_argv(workspace, out), "--launch_args", "{}", "--num_processes", "2"]) == 1
