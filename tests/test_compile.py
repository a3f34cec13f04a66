"""torch.compile with the backends users run (both go through AOTAutograd) gives the reference update.

The `eager` backend skips AOTAutograd and would hide the failure these tests exist for: traced into one
compiled graph, pass 1's captured outputs have no gradient and the step silently became plain SFT.
"""

from __future__ import annotations

import pytest
import torch
from testing_utils import (
    LR, flat, perturbed_modules, reference_gradients, relative_error, run, tiny_lora_model, token_rows,
    trainable_state,
)
from transformers.data.data_collator import default_data_collator

import vaccine_trainer.perturbation as perturbation
from vaccine_trainer.perturbation import MissingHiddenStateGradientError

CASES = [("llama", "attention"), ("falcon", "layer")]  # falcon's decoder layers return tuples


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own graphs: no cache entry (or recompile limit) carried over between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def reference_update(arch: str, target: str, rows) -> torch.Tensor:
    """The paper's update over two micro-batches of two rows (equal lengths: each loss is its mean over 2)."""
    total = None
    for part in (rows[:2], rows[2:]):
        model = tiny_lora_model(arch).train()
        grads, _ = reference_gradients(model, perturbed_modules(model, arch, target), default_data_collator(part),
                                       2.0, "global")
        update = -LR * flat(grads) / 2
        total = update if total is None else total + update
    return total


def compiled_update(tmp_path, arch: str, target: str, backend: str, rows):
    return run(tiny_lora_model(arch), tmp_path, rows, vaccine_target=target, per_device_train_batch_size=2,
               gradient_accumulation_steps=2, torch_compile=True, torch_compile_backend=backend)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("arch, target", CASES, ids=[arch for arch, _ in CASES])
def test_compiled_step_equals_the_reference(tmp_path, arch, target, backend):
    rows = token_rows(4)
    update, trainer = compiled_update(tmp_path, arch, target, backend, rows)
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"  # the step really ran compiled
    assert trainer.vaccine_skipped_steps == 0
    expected = reference_update(arch, target, rows)
    assert relative_error(update, expected) < 1e-4
    plain, _ = run(tiny_lora_model(arch), tmp_path / "plain", rows, rho=0.0, per_device_train_batch_size=2,
                   gradient_accumulation_steps=2)
    assert relative_error(plain, expected) > 1e-2  # plain SFT, what the step silently was, is far off


def test_without_the_graph_break_the_compiled_step_fails_loudly(tmp_path, monkeypatch):
    """Negative control: hooks traced into the graph run but give no gradient; that is an error, never a skip."""
    monkeypatch.setattr(perturbation, "run_eagerly", lambda hook: hook)
    model = tiny_lora_model()
    before = trainable_state(model)
    with pytest.raises(MissingHiddenStateGradientError, match="ran in pass 1, but the loss has no gradient"):
        run(model, tmp_path, token_rows(4), torch_compile=True, torch_compile_backend="aot_eager")
    assert all(torch.equal(p, before[n]) for n, p in trainable_state(model).items())
    assert all(p.grad is None for p in model.parameters())  # pass 1 left no gradient behind
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # nor a hook


def test_code_compiled_earlier_without_the_hooks_is_not_reused(tmp_path):
    """torch.compile does not guard on hooks by default: a plain compiled run of the same model class earlier in
    the process, and an evaluation of the same model compiled before `train`, must not hand Vaccine hookless code."""
    rows = token_rows(4)
    run(tiny_lora_model(), tmp_path / "plain", rows, rho=0.0, torch_compile=True, torch_compile_backend="aot_eager")
    update, trainer = run(tiny_lora_model(), tmp_path / "vaccine", rows, torch_compile=True,
                          torch_compile_backend="aot_eager")
    model = tiny_lora_model().train()
    grads, _ = reference_gradients(model, perturbed_modules(model, "llama", "attention"), default_data_collator(rows),
                                   2.0, "global")
    assert relative_error(update, -LR * flat(grads)) < 1e-4
    trainer.evaluate(rows)  # the trained model, compiled, without hooks: then trained again with them
    trainer.train()
    assert trainer.vaccine_skipped_steps == 0
