"""The Axolotl plugin through Axolotl's own config loading, dataset preparation and trainer builder.

Runs in the Axolotl lane (`bash .ci/run-axolotl`: Axolotl 0.19 and its pins in a venv of their own); skipped where
Axolotl is not installed. Tiny random Llama on the CPU, two alpaca rows, one SGD step.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import yaml
from testing_utils import perturbed_modules, reference_gradients, relative_error, save_tiny_causal_lm, trainable_state

pytest.importorskip("axolotl")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")  # no telemetry from tests

from axolotl.cli.args import TrainerCliArgs  # noqa: E402
from axolotl.cli.config import load_cfg  # noqa: E402
from axolotl.common.datasets import load_datasets  # noqa: E402
from axolotl.core.trainers.base import AxolotlTrainer  # noqa: E402
from axolotl.train import setup_model_and_trainer  # noqa: E402

from vaccine_trainer.trainer import VaccineMixin  # noqa: E402

PLUGIN = "vaccine_trainer.integrations.axolotl.VaccinePlugin"
LR = 0.5
ROWS = [{"instruction": "say the word one", "input": "", "output": "one is said here"},
        {"instruction": "say the word two", "input": "", "output": "two is the word you asked for"}]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("axolotl")
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    save_tiny_causal_lm(root / "tiny", [f"{row['instruction']} {row['output']}" for row in ROWS])
    return root


def axolotl_config(workspace, output_dir, **keys) -> dict:
    """One exact SGD step (constant lr, no clipping, no dropout, fp32), both rows in one micro-batch."""
    return {
        "base_model": str(workspace / "tiny"), "tokenizer_type": "AutoTokenizer",
        "datasets": [{"path": str(workspace / "rows.jsonl"), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(workspace / "prepared"), "dataset_num_proc": 1, "val_set_size": 0,
        "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_linear": True,
        "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False,  # Triton kernels: GPU only
        "sequence_len": 64, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 1,
        "num_epochs": 1, "optimizer": "sgd", "learning_rate": LR, "lr_scheduler": "constant", "warmup_steps": 0,
        "weight_decay": 0.0, "max_grad_norm": 0.0, "bf16": False, "fp16": False, "tf32": False, "seed": 0,
        "output_dir": str(output_dir), "save_strategy": "no", "logging_steps": 1, **keys,
    }


def build_trainer(workspace, tmp_path, **keys):
    """Axolotl's path up to training: YAML → validated config → prepared data → model, LoRA and trainer."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(axolotl_config(workspace, tmp_path / "out", **keys)))
    cfg = load_cfg(str(path))
    trainer, model, *_ = setup_model_and_trainer(cfg, load_datasets(cfg=cfg, cli_args=TrainerCliArgs()))
    return trainer, model


def the_batch(trainer) -> dict[str, torch.Tensor]:
    """Both rows collated as Axolotl's collator does (the loss and eps do not depend on their order)."""
    rows = [{key: trainer.train_dataset[i][key] for key in ("input_ids", "attention_mask", "labels")}
            for i in range(len(trainer.train_dataset))]
    return dict(trainer.data_collator(rows))


def trained_update(trainer, model) -> torch.Tensor:
    before = trainable_state(model)
    trainer.train()
    after = trainable_state(model)
    return torch.cat([(after[name] - before[name]).flatten() for name in sorted(after)])


def test_one_vaccine_step_through_axolotl_matches_the_reference(workspace, tmp_path):
    trainer, model = build_trainer(workspace, tmp_path, plugins=[PLUGIN], rho=2.0)
    assert isinstance(trainer, VaccineMixin) and isinstance(trainer, AxolotlTrainer)
    assert len(trainer.train_dataset) == 2 and trainer.args.rho == 2.0

    batch = the_batch(trainer)
    num_items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    reference = copy.deepcopy(model).train()
    expected, plain = reference_gradients(reference, perturbed_modules(reference, "llama", "attention"), batch,
                                          2.0, "global", num_items)
    update = trained_update(trainer, model)
    want = torch.cat([(-LR * expected[name]).flatten() for name in sorted(expected)])
    plain_update = torch.cat([(-LR * plain[name]).flatten() for name in sorted(plain)])
    assert relative_error(update, want) < 1e-5
    assert relative_error(plain_update, want) > 1e-3  # the perturbation changes the update: the check can fail
    logged = trainer.state.log_history[0]
    assert logged["vaccine/perturbation_norm"] == pytest.approx(2.0, rel=1e-4)


def test_rho_zero_is_plain_axolotl_and_tokens_are_counted_once(workspace, tmp_path):
    runs = {}
    for name, keys in {"plain": {}, "rho 0": {"plugins": [PLUGIN], "rho": 0.0},
                       "rho 2": {"plugins": [PLUGIN], "rho": 2.0}}.items():
        trainer, model = build_trainer(workspace, tmp_path / name.replace(" ", ""), **keys)
        runs[name] = (trained_update(trainer, model), trainer.state.log_history[0])
    assert torch.equal(runs["rho 0"][0], runs["plain"][0])
    assert not torch.equal(runs["rho 2"][0], runs["plain"][0])
    for key in ("tokens/total", "tokens/trainable"):  # pass 1's compute_loss would count every token twice
        assert runs["rho 2"][1][key] == runs["plain"][1][key] > 0


def test_the_plugin_does_nothing_unless_rho_is_set(workspace, tmp_path):
    trainer, _ = build_trainer(workspace, tmp_path, plugins=[PLUGIN])
    assert type(trainer) is AxolotlTrainer


@pytest.mark.parametrize("keys, message", [
    ({"rho": 2.0, "rl": "dpo"}, "preference and RL training (rl: dpo) is not supported"),
    ({"rho": 2.0, "reward_model": True}, "reward-model training"),
    ({"vaccine_norm": "layer"}, "vaccine_norm set without rho"),
    ({"rho": 3.0, "vaccine_norm": "relative"}, "would push it by 300%"),
    ({"rho": -1.0}, "rho must be a finite number >= 0"),
], ids=["rl", "reward-model", "no-rho", "relative-too-large", "negative"])
def test_bad_vaccine_keys_are_refused_when_the_yaml_is_validated(workspace, tmp_path, keys, message):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(axolotl_config(workspace, tmp_path / "out", plugins=[PLUGIN], **keys)))
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_cfg(str(path))


def test_the_entry_point_axolotl_reads_from_0_20_names_the_plugin():
    from importlib.metadata import entry_points

    from vaccine_trainer.integrations.axolotl import VaccinePlugin

    points = [point for point in entry_points(group="axolotl.plugins") if point.name == "vaccine"]
    assert [point.load() for point in points] == [VaccinePlugin]
