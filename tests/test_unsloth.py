"""Vaccine through Unsloth: `FastLanguageModel`'s model and LoRA, Unsloth's SFTTrainer (which replaces
`trl.SFTTrainer` when `unsloth` is imported first) under `VaccineSFTTrainer`, and Unsloth's "unsloth" gradient
checkpointing — on the CPU (Unsloth's CPU backend, fp32: exact) and on a GPU (its kernels and its offloaded
checkpoint, bf16).

Each case runs `unsloth_worker.py` in a process of its own, since Unsloth must be imported before transformers and
TRL. Skipped where Unsloth is not installed: its pins (transformers <= 5.17, trl <= 1.15) are not the main suite's;
`bash .ci/run-unsloth` installs them in a fresh venv and runs this file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testing_utils import relative_error

pytestmark = pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth (.ci/run-unsloth)")

HERE = Path(__file__).resolve().parent
ON_CUDA = torch.cuda.is_available()
# fp32 on the CPU; bf16 with Unsloth's kernels on a GPU against a bf16-autocast reference.
TOLERANCE = 0.1 if ON_CUDA else 1e-5


def unsloth_run(tmp_path, checkpointing: str, rho: str, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(HERE / "unsloth_worker.py"), str(tmp_path), checkpointing, rho,
                             *extra], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("checkpointing", ["unsloth", "false"])
def test_vaccine_through_unsloth_equals_the_reference(tmp_path, checkpointing):
    """Two micro-batches of gradient accumulation; the reference is the paper's formula on an identical copy of the
    Unsloth model, over the batches the trainer saw."""
    run = unsloth_run(tmp_path, checkpointing, "2.0")
    update, reference = torch.tensor(run["update"]), torch.tensor(run["reference"])
    assert relative_error(update, reference) < TOLERANCE, run["device"]
    assert run["checkpointing"] == (checkpointing != "false")
    assert run["skipped_steps"] == 0
    steps = [entry for entry in run["logs"] if "vaccine/perturbation_norm" in entry]
    assert steps and steps[0]["vaccine/perturbation_norm"] == pytest.approx(2.0, rel=0.05)
    assert any("vaccine_trainer.sft.VaccineSFTTrainer" == name for name in run["trainer_classes"])


def test_rho_zero_through_unsloth_trains_what_unsloths_sfttrainer_trains(tmp_path):
    """`VaccineSFTTrainer` subclasses the SFTTrainer Unsloth put in TRL's place: at rho 0 it is that trainer."""
    plain = unsloth_run(tmp_path, "false", "plain")
    vaccine = unsloth_run(tmp_path, "false", "0")
    assert plain["trainer_classes"][0] in vaccine["trainer_classes"]
    assert plain["trainer_classes"][0] != "trl.trainer.sft_trainer.SFTTrainer"  # Unsloth's, not TRL's own
    update, plain_update = torch.tensor(vaccine["update"]), torch.tensor(plain["update"])
    if ON_CUDA:
        assert relative_error(update, plain_update) < 1e-3
    else:
        assert torch.equal(update, plain_update)
    perturbed = unsloth_run(tmp_path, "false", "2.0")
    assert relative_error(torch.tensor(perturbed["update"]), plain_update) > 0.1  # rho 2 does change the update


@pytest.mark.cuda
@pytest.mark.skipif(not ON_CUDA, reason="Unsloth's 4-bit loading needs a GPU")
def test_vaccine_through_unsloth_qlora_equals_the_reference(tmp_path):
    """Unsloth's QLoRA (`load_in_4bit=True`: a bitsandbytes nf4 base) with its checkpointing: the reference runs on an
    identical 4-bit copy, so only the step is compared, not the quantisation."""
    run = unsloth_run(tmp_path, "unsloth", "2.0", "4bit")
    assert run["quantized_modules"] > 0
    assert relative_error(torch.tensor(run["update"]), torch.tensor(run["reference"])) < TOLERANCE
    steps = [entry for entry in run["logs"] if "vaccine/perturbation_norm" in entry]
    assert steps and steps[0]["vaccine/perturbation_norm"] == pytest.approx(2.0, rel=0.05)
