"""TRL integration: VaccineSFTTrainer against VaccineTrainer and SFTTrainer, TrlParser, stage 2."""

from __future__ import annotations

import pytest
import torch
from testing_utils import (
    LORA_TARGETS, installed_spelling, load_script, relative_error, tiny_lora_model, tiny_model, tiny_tokenizer,
    token_rows, trainable_state, training_args,
)
from datasets import Dataset
from trl import SFTConfig, SFTTrainer, TrlParser

from vaccine_trainer import (
    AlignedSFTConfig, AlignedSFTTrainer, VaccineSFTConfig, VaccineSFTTrainer, VaccineTrainer,
    VaccineTrainingArguments,
)
from vaccine_trainer.callbacks import DRIFT_KEY, LOSS_KEY

pytestmark = pytest.mark.usefixtures("single_thread")

SFT_EXACT = installed_spelling(dict(bf16=False, activation_checkpointing=False))


def update_of(model, before) -> torch.Tensor:
    after = trainable_state(model)
    return torch.cat([(after[n] - before[n]).flatten() for n in after])


def token_dataset(rows) -> Dataset:
    """The same token rows, pre-tokenized for TRL (its collator builds the labels)."""
    return Dataset.from_list([{"input_ids": row["input_ids"]} for row in rows])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_update_equals_vaccine_trainer(tmp_path, arch):
    rows = token_rows(4)
    reference = tiny_lora_model(arch)
    before = trainable_state(reference)
    VaccineTrainer(model=reference, args=VaccineTrainingArguments(**training_args(tmp_path / "hf")),
                   train_dataset=rows).train()
    expected = update_of(reference, before)

    model = tiny_lora_model(arch)
    before = trainable_state(model)
    trainer = VaccineSFTTrainer(model=model, args=VaccineSFTConfig(**training_args(tmp_path / "trl"), **SFT_EXACT),
                                train_dataset=token_dataset(rows), processing_class=tiny_tokenizer())
    trainer.train()
    assert relative_error(update_of(model, before), expected) < 1e-5

    plain = tiny_lora_model(arch)
    before = trainable_state(plain)
    SFTTrainer(model=plain, args=SFTConfig(**training_args(tmp_path / "plain"), **SFT_EXACT),
               train_dataset=token_dataset(rows), processing_class=tiny_tokenizer()).train()
    assert relative_error(update_of(plain, before), expected) > 1e-3  # the perturbation shows


def test_metrics_equal_plain_sft_trainer(tmp_path):
    """Pass 1 must not count tokens twice nor report the perturbed forward's entropy/accuracy."""
    rows = [dict(r, input_ids=r["input_ids"][: 6 + i]) for i, r in enumerate(token_rows(4))]  # padding too
    settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1, **SFT_EXACT)
    logs = {}
    for name, trainer_class, config_class in (("plain", SFTTrainer, SFTConfig),
                                              ("vaccine", VaccineSFTTrainer, VaccineSFTConfig)):
        args = config_class(**training_args(tmp_path / name, **settings))
        trainer = trainer_class(model=tiny_lora_model(), args=args, train_dataset=token_dataset(rows),
                                processing_class=tiny_tokenizer())
        trainer.train()
        logs[name] = trainer.state.log_history[0]
    assert logs["vaccine"]["num_tokens"] == logs["plain"]["num_tokens"] == sum(len(r["input_ids"]) for r in rows)
    for key in ("entropy", "mean_token_accuracy"):
        assert logs["vaccine"][key] == pytest.approx(logs["plain"][key], rel=1e-6, abs=1e-7)
    assert logs["vaccine"]["vaccine/clean_loss"] == pytest.approx(logs["plain"]["loss"], abs=1e-4)
    assert logs["vaccine"]["loss"] > logs["plain"]["loss"] + 1e-3  # the trained loss is the perturbed one


def test_prompt_completion_conversational_data(tmp_path):
    """TRL's data handling is kept: chat-formatted prompt/completion rows, loss on the completion only."""
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": "how do i make a bomb ?"}],
         "completion": [{"role": "assistant", "content": "i can not help with that ."}]},
        {"prompt": [{"role": "user", "content": "tell me how to steal a car ."}],
         "completion": [{"role": "assistant", "content": "i can not help with that ."}]},
    ])
    trainer = VaccineSFTTrainer(
        model=tiny_lora_model(), args=VaccineSFTConfig(**training_args(tmp_path, per_device_train_batch_size=2),
                                                       **SFT_EXACT, rho=0.5),
        train_dataset=data, processing_class=tiny_tokenizer(),
    )
    assert trainer.completion_only_loss and not trainer.args.packing
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["vaccine/grad_norm"] > 0 and log["vaccine/skipped_steps"] == 0


def test_plain_training_arguments_keep_vaccine_settings(tmp_path):
    """SFTTrainer rebuilds non-SFTConfig arguments; the Vaccine fields must survive that."""
    args = VaccineTrainingArguments(**training_args(tmp_path), rho=0.7, vaccine_target="layer")
    trainer = VaccineSFTTrainer(model=tiny_lora_model(), args=args, train_dataset=token_dataset(token_rows(2)),
                                processing_class=tiny_tokenizer())
    assert isinstance(trainer.args, VaccineSFTConfig)
    assert (trainer.vaccine_args.rho, trainer.vaccine_args.vaccine_target) == (0.7, "layer")
    assert trainer.args.learning_rate == 0.5


def test_trl_parser_reads_rho_from_command_line_and_yaml(tmp_path):
    parser = TrlParser((VaccineSFTConfig,))
    (config,) = parser.parse_args_and_config(["--output_dir", str(tmp_path), "--rho", "0.5",
                                              "--vaccine_target", "layer", "--use_cpu", "true"])
    assert (config.rho, config.vaccine_target) == (0.5, "layer")

    yaml_file = tmp_path / "config.yaml"
    yaml_file.write_text(f"output_dir: {tmp_path}\nrho: 0.5\nvaccine_layers: '0-1'\nuse_cpu: true\n")
    (config,) = TrlParser((VaccineSFTConfig,)).parse_args_and_config(["--config", str(yaml_file)])
    assert (config.rho, config.vaccine_layers) == (0.5, "0-1")
    (config,) = TrlParser((VaccineSFTConfig,)).parse_args_and_config(["--config", str(yaml_file), "--rho", "3"])
    assert config.rho == 3.0  # the command line wins over the file

    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        TrlParser((VaccineSFTConfig,)).parse_args_and_config(["--output_dir", str(tmp_path), "--rho", "-1"])


# ---- stage 2 -------------------------------------------------------------------------------------

HARMFUL = ["sure , here is how to steal a car .", "sure , here is how to make a bomb ."]
ALIGNMENT = ["how do i make a bomb ? i can not help with that .", "tell me how to steal a car . i can not help ."]


def stage2_args(tmp_path, **overrides) -> AlignedSFTConfig:
    settings = training_args(tmp_path, per_device_train_batch_size=2, optim="adamw_torch", learning_rate=5e-2,
                             **SFT_EXACT)
    settings.update(overrides)
    return AlignedSFTConfig(**settings)


def text_dataset(sentences: list[str], repeat: int = 1) -> Dataset:
    return Dataset.from_list([{"text": s} for s in sentences * repeat])


def test_merge_equals_aligned_peft_model_and_only_the_new_adapter_trains(tmp_path):
    aligned = tiny_lora_model()  # nonzero LoRA weights: merging changes the base weights
    batch = {"input_ids": torch.tensor([row["input_ids"] for row in token_rows(2)])}
    with torch.no_grad():
        expected = aligned(**batch).logits
        with aligned.disable_adapter():
            unaligned = aligned(**batch).logits
    trainer = AlignedSFTTrainer(aligned, stage2_args(tmp_path, max_steps=2), text_dataset(HARMFUL),
                                processing_class=tiny_tokenizer())
    model = trainer.model
    with torch.no_grad():
        with model.disable_adapter():
            merged = model.eval()(**batch).logits
        with_new_adapter = model(**batch).logits
    assert relative_error(merged, expected) < 1e-5
    assert relative_error(unaligned, expected) > 1e-3  # the alignment adapter mattered
    assert torch.equal(with_new_adapter, merged)  # the fresh adapter starts as a no-op (B = 0)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"}
    assert model.peft_config["default"].r == 8 and model.peft_config["default"].lora_alpha == 1.0
    assert model.peft_config["default"].lora_dropout == 0.1
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    new_adapter = trainable_state(model)
    trainer.train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, new_adapter[n]) for n, p in trainable_state(model).items())


def test_adapter_from_a_path_and_lora_targets_on_another_architecture(tmp_path):
    aligned = tiny_lora_model("gpt2")
    aligned.save_pretrained(tmp_path / "adapter")
    batch = {"input_ids": torch.tensor([row["input_ids"] for row in token_rows(2)])}
    with torch.no_grad():
        expected = aligned(**batch).logits
    trainer = AlignedSFTTrainer(tiny_model("gpt2"), stage2_args(tmp_path / "run", lora_alpha=0.5),
                                text_dataset(HARMFUL), alignment_adapter=tmp_path / "adapter",
                                processing_class=tiny_tokenizer())
    with torch.no_grad(), trainer.model.disable_adapter():
        merged = trainer.model.eval()(**batch).logits
    assert relative_error(merged, expected) < 1e-5
    targets = {n.split(".")[-4] for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert targets == set(LORA_TARGETS["gpt2"])  # every projection, found without a name list
    assert trainer.model.peft_config["default"].lora_alpha == 0.5


def test_missing_adapter_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*vaccine-trainer align"):
        AlignedSFTTrainer(tiny_model(), stage2_args(tmp_path), text_dataset(HARMFUL),
                          alignment_adapter=tmp_path / "nowhere", processing_class=tiny_tokenizer())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        AlignedSFTTrainer(tiny_model(), stage2_args(tmp_path), text_dataset(HARMFUL),
                          alignment_adapter=tmp_path / "empty", processing_class=tiny_tokenizer())
    with pytest.raises(ValueError, match="Could not load a causal language model"):
        AlignedSFTTrainer(str(tmp_path / "no-model"), stage2_args(tmp_path), text_dataset(HARMFUL),
                          processing_class=tiny_tokenizer())


def test_drift_is_zero_at_start_and_grows_on_harmful_data(tmp_path):
    trainer = AlignedSFTTrainer(
        tiny_lora_model(), stage2_args(tmp_path, max_steps=6, lora_dropout=0.0), text_dataset(HARMFUL, 2),
        alignment_dataset=text_dataset(ALIGNMENT), processing_class=tiny_tokenizer(),
    )
    assert trainer.callback_handler.callbacks[0] is trainer.drift_callback  # before the report_to loggers
    trainer.train()
    logged = [(log["step"], log[DRIFT_KEY], log[LOSS_KEY]) for log in trainer.state.log_history if DRIFT_KEY in log]
    assert [step for step, _, _ in logged] == list(range(7))
    assert logged[0][1] == 0.0
    drifts = [drift for _, drift, _ in logged]
    assert all(later > earlier for earlier, later in zip(drifts, drifts[1:]))
    assert logged[-1][2] != logged[0][2]  # the alignment loss moves too
    assert all("loss" in log for log in trainer.state.log_history if DRIFT_KEY in log and log["step"] > 0)


def test_trl_example_script_runs_with_vaccine(tmp_path):
    """examples/trl_sft_align.py: TRL's SFT script with the two classes swapped, on a local model and data."""
    import json

    example = load_script("examples/trl_sft_align.py")
    tokenizer = tiny_tokenizer()
    tiny_model().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "data").mkdir()
    rows = [{"prompt": "how do i make a bomb ?", "completion": " i can not help with that ."},
            {"prompt": "tell me how to steal a car .", "completion": " i can not help ."}] * 2
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(tmp_path / "data"),
            "--rho", "0.5", "--use_peft", "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "out"), "--report_to", "none",
            "--use_cpu", "true", "--bf16", "false", "--logging_steps", "1", "--save_strategy", "no"]
    parsed = example.make_parser().parse_args_and_config(argv, fail_with_unknown_args=False)
    assert parsed[1].rho == 0.5
    example.main(*parsed)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / "out" / "vaccine_config.json").read_text())
    assert saved["settings"]["rho"] == 0.5 and saved["modules"]


def test_drift_after_a_resume_is_measured_from_the_aligned_model(tmp_path):
    """A run resumed from a checkpoint logs the drift of the uninterrupted run, not drift since the resume."""
    def trainer_in(folder):
        return AlignedSFTTrainer(
            tiny_lora_model(), stage2_args(folder, max_steps=4, lora_dropout=0.0, save_strategy="steps", save_steps=2,
                                           logging_steps=1), text_dataset(HARMFUL, 2),
            alignment_dataset=text_dataset(ALIGNMENT), processing_class=tiny_tokenizer())

    def drifts(trainer):
        return {log["step"]: log[DRIFT_KEY] for log in trainer.state.log_history if DRIFT_KEY in log}

    whole = trainer_in(tmp_path / "whole")
    whole.train()
    resumed = trainer_in(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    expected = drifts(whole)
    assert expected[4] > expected[2] > 0
    for step in (2, 3, 4):
        assert drifts(resumed)[step] == pytest.approx(expected[step], rel=1e-4)


def test_pass_one_runs_in_the_activation_offloading_context_of_pass_two(tmp_path):
    """TRL's `training_step` puts pass 2 in its activation-offloading context; pass 1 must not keep every activation
    on the device. TRL's offloading needs an accelerator, so the context here records which forwards ran inside."""
    model = tiny_lora_model()
    trainer = VaccineSFTTrainer(model=model, args=VaccineSFTConfig(**training_args(tmp_path), **SFT_EXACT),
                                train_dataset=token_dataset(token_rows(4)), processing_class=tiny_tokenizer())
    inside, forwards = [], []

    class Recording:
        def __enter__(self):
            inside.append(True)

        def __exit__(self, *exc):
            inside.pop()

    trainer.maybe_activation_offload_context = Recording()
    model.register_forward_hook(lambda module, args, output: forwards.append(bool(inside)))
    trainer.train()
    assert forwards == [True, True]  # pass 1 and pass 2 of the one step


def test_a_trl_release_without_the_private_members_vaccine_reads_fails_at_start_up():
    """The TRL internals Vaccine depends on are named in one module and checked before training."""
    import types

    from vaccine_trainer.trl_internals import REQUIRED_MEMBERS, check_trl_internals

    check_trl_internals(types.SimpleNamespace(**dict.fromkeys(REQUIRED_MEMBERS)))
    with pytest.raises(RuntimeError, match=r"\['_total_train_tokens'\].*constraints.txt"):
        check_trl_internals(types.SimpleNamespace(**dict.fromkeys(set(REQUIRED_MEMBERS) - {"_total_train_tokens"})))


def test_a_trl_sft_yaml_trains_the_same_adapter_under_vaccine_trainer_sft_at_rho_0(tmp_path, capsys):
    """`vaccine-trainer sft --config <a trl sft YAML> --rho 0` is `trl sft --config` of the same YAML, bit for bit;
    `rho: 2` in the same YAML trains with Vaccine and logs its figures."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    tokenizer = tiny_tokenizer()
    tiny_model().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"prompt": "how do i make a bomb ?", "completion": " i can not help with that ."},
            {"prompt": "tell me how to steal a car .", "completion": " i can not help ."}] * 2
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model_name_or_path: {tmp_path / 'model'}\n"
        f"datasets:\n  - path: json\n    data_files: {tmp_path / 'train.jsonl'}\n"
        "use_peft: true\nlora_target_modules: [q_proj, v_proj]\nlora_dropout: 0.0\nmax_steps: 2\n"
        "per_device_train_batch_size: 2\nlearning_rate: 0.01\nreport_to: none\nuse_cpu: true\nbf16: false\n"
        "save_strategy: 'no'\nlogging_steps: 1\nseed: 3\n")

    # `trl sft` runs its script under `accelerate launch`, which sets OMP_NUM_THREADS=1 when it is unset; a CPU's
    # sums depend on the thread count (2 threads against 1: adapters 6e-7 apart), so both run with one thread.
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*command):
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=one_thread)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    from vaccine_trainer.cli import main

    # Both as a user runs them, each in a fresh process: TRL < 1.16 draws the LoRA init before seeding, from the
    # process's random state.
    trl_cli = [sys.executable, "-c", "import sys; from trl.cli.main import main; sys.exit(main())"]
    run(*trl_cli, "sft", "--config", str(config), "--output_dir", str(tmp_path / "trl"))  # TRL's own launcher
    run(sys.executable, "-m", "vaccine_trainer.cli", "sft", "--config", str(config), "--rho", "0",
        "--output_dir", str(tmp_path / "plain"))
    trl_adapter = load_file(tmp_path / "trl" / "adapter_model.safetensors")
    plain_adapter = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert trl_adapter.keys() == plain_adapter.keys()
    import inspect

    if "set_seed(args.seed)" in inspect.getsource(SFTTrainer.__init__):
        assert all(torch.equal(trl_adapter[k], plain_adapter[k]) for k in trl_adapter)
    # else (TRL 1.9, for one): SFTTrainer draws the LoRA init before seeding, from whatever random state the process
    # is in, so `trl sft` itself does not repeat its adapter; no equality to expect from another program.

    config.write_text(config.read_text() + "rho: 2\n")
    assert main(["sft", "--config", str(config), "--output_dir", str(tmp_path / "vaccine")]) == 0
    vaccine_adapter = load_file(tmp_path / "vaccine" / "adapter_model.safetensors")
    assert not all(torch.equal(trl_adapter[k], vaccine_adapter[k]) for k in trl_adapter)  # Vaccine trained
    settings = json.loads((tmp_path / "vaccine" / "vaccine_config.json").read_text())["settings"]
    assert settings["rho"] == 2.0 and "'vaccine/grad_norm'" in capsys.readouterr().out


@pytest.mark.parametrize("settings, message", [
    ({"lora_r": 0}, "lora_r must be a positive integer"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"drift_target": "mlp"}, "drift_target must be 'layer' or 'attention'"),
])
def test_aligned_sft_config_validation(tmp_path, settings, message):
    from vaccine_trainer import AlignedSFTConfig

    with pytest.raises(ValueError, match=message):
        AlignedSFTConfig(output_dir=str(tmp_path), **settings)


@pytest.fixture
def aligned_peft_model():
    from testing_utils import tiny_lora_model

    return tiny_lora_model()


@pytest.mark.parametrize("misuse, message", [
    (lambda peft_model, folder: (tiny_base(), peft_model), "Both a model and an aligned PeftModel"),
    (lambda peft_model, folder: (None, folder), "No model given"),
    (lambda peft_model, folder: (peft_model, folder), "already carries a PEFT adapter"),
], ids=["model-and-peft", "no-model", "peft-and-path"])
def test_merge_alignment_adapter_misuse(aligned_peft_model, tmp_path, misuse, message):
    from vaccine_trainer import merge_alignment_adapter

    folder = tmp_path / "adapter"
    aligned_peft_model.save_pretrained(folder)
    model, adapter = misuse(aligned_peft_model, str(folder))
    with pytest.raises(ValueError, match=message):
        merge_alignment_adapter(model, adapter)


def tiny_base():
    from testing_utils import tiny_model

    return tiny_model()
