"""T-Vaccine (layer sampling): probabilities, draws, frozen layers, the update, the graph, resume, errors."""

from __future__ import annotations

import types

import peft
import pytest
import torch
import transformers
from testing_utils import LR, PROBE, TINY_CONFIGS, first, relative_error, token_rows, trainable_state, training_args
from transformers import TrainerCallback
from transformers.data.data_collator import default_data_collator

from vaccine_trainer import VaccineTrainer, VaccineTrainingArguments
from vaccine_trainer.distributed import check_layer_sampling_support
from vaccine_trainer.layer_sampling import draw_layers, layer_probabilities

NUM_LAYERS = 6



def six_layer_lora_model(seed: int = 0):
    torch.manual_seed(seed)
    config = TINY_CONFIGS["llama"]()
    config.num_hidden_layers, config.use_cache = NUM_LAYERS, False
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return peft.get_peft_model(model, lora)


def decoder_layers(model):
    return model.base_model.model.model.layers


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def sampling_trainer(model, tmp_path, rows=None, probe=PROBE, **overrides):
    sampling = {"vaccine_layer_sampling": True, "vaccine_sampled_layers": 2, "vaccine_sampling_interval": 2,
                "vaccine_probe_interval": 4, "vaccine_probe_batch_size": len(PROBE)}
    vaccine = {k: overrides.pop(k) for k in list(overrides) if k == "rho" or k.startswith("vaccine_")}
    args = VaccineTrainingArguments(**training_args(tmp_path, **overrides), **{**sampling, **vaccine})
    return VaccineTrainer(model=model, args=args, train_dataset=rows or token_rows(4), probe_dataset=probe,
                          data_collator=default_data_collator)


class ActiveLayersPerStep(TrainerCallback):
    """The active decoder layers and probabilities in force at every optimizer step."""

    def __init__(self):
        self.trainer, self.steps = None, {}

    def on_step_end(self, args, state, control, **kwargs):
        sampling = self.trainer.vaccine_layer_sampling_state
        self.steps[state.global_step - 1] = (sampling.active_layers(), sampling.probabilities)


def run_with_record(trainer, **train_kwargs):
    record = ActiveLayersPerStep()
    record.trainer = trainer
    trainer.add_callback(record)
    trainer.train(**train_kwargs)
    return record.steps


def test_probabilities_are_the_normalised_gradient_norms_of_the_harmful_batch(tmp_path):
    """p_l = ||dL_harmful/dh_l|| / sum, against hooks and autograd written here (the whole probe set as batch)."""
    reference = six_layer_lora_model().train()
    captured = []
    handles = [layer.self_attn.register_forward_hook(lambda m, a, out: captured.append(first(out)))
               for layer in decoder_layers(reference)]
    loss = reference(**default_data_collator(PROBE)).loss
    for handle in handles:
        handle.remove()
    norms = [g.double().norm().item() for g in torch.autograd.grad(loss, captured)]
    expected = [n / sum(norms) for n in norms]

    trainer = sampling_trainer(six_layer_lora_model(), tmp_path, max_steps=1)
    steps = run_with_record(trainer)
    probabilities = steps[0][1]
    assert probabilities == pytest.approx(expected, rel=1e-5)
    assert max(expected) / min(expected) > 1.05  # the check can fail: the layers are not equally weighted
    assert layer_probabilities([1.0, 3.0]) == [0.25, 0.75]
    with pytest.raises(ValueError, match="cannot be normalised"):
        layer_probabilities([0.0, float("nan")])


def test_the_draw_is_reproducible_and_follows_the_probabilities():
    p = [0.05, 0.05, 0.6, 0.1, 0.1, 0.1]
    assert draw_layers(p, 3, seed=1, step=20) == draw_layers(p, 3, seed=1, step=20)
    draws = {tuple(draw_layers(p, 3, seed=s, step=t)) for s in range(3) for t in range(0, 200, 20)}
    assert len(draws) > 3  # seed and step change the draw
    counts = torch.zeros(6)
    for t in range(400):
        counts[draw_layers(p, 1, seed=0, step=t)] += 1
    assert counts[2] > counts[0] * 4  # the heavy layer is drawn far more often
    filled = draw_layers([0.0, 1.0, 0.0, 0.0], 3, seed=0, step=0)  # zero-probability layers fill up only if needed
    assert len(filled) == 3 and 1 in filled


def test_frozen_adapters_stay_bit_identical_and_adamw_state_is_untouched(tmp_path):
    """AdamW with weight decay: a layer outside the draw keeps its weights and its moments, bit for bit."""
    model = six_layer_lora_model()
    trainer = sampling_trainer(model, tmp_path, max_steps=4, optim="adamw_torch", weight_decay=0.1,
                               learning_rate=1e-2, vaccine_layer_probabilities="uniform", vaccine_sampled_layers=3)
    def snapshot():
        optimizer = trainer.optimizer
        return ({n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n},
                {n: {k: v.clone() for k, v in (optimizer.state.get(p, {}) if optimizer else {}).items()}
                 for n, p in model.named_parameters() if "lora" in n})

    snapshots = {0: snapshot()}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots[state.global_step] = snapshot()

    trainer.add_callback(Snapshot())
    steps = run_with_record(trainer)
    windows = [steps[0][0], steps[2][0]]
    assert steps[1][0] == windows[0] and steps[3][0] == windows[1] and windows[0] != windows[1]
    for start, end, active in ((0, 2, windows[0]), (2, 4, windows[1])):
        (weights_start, moments_start), (weights_end, moments_end) = snapshots[start], snapshots[end]
        for name in weights_end:
            if layer_of(name) in active:
                assert not torch.equal(weights_end[name], weights_start[name]), name
                continue
            assert torch.equal(weights_end[name], weights_start[name]), name  # no step, no weight decay
            assert moments_end[name].keys() == moments_start[name].keys(), name
            assert all(torch.equal(moments_end[name][k], moments_start[name][k]) for k in moments_end[name])
    assert any(moments_end[n] for n in moments_end if layer_of(n) not in windows[1])  # frozen, with a history
    # After training every adapter is trainable again.
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora" in n)


@pytest.mark.parametrize("checkpoint_frozen", [True, False], ids=["frozen-checkpointed", "frozen-kept"])
def test_one_step_trains_and_perturbs_only_the_active_layers(tmp_path, checkpoint_frozen):
    """The update equals the paper's formula restricted to the active layers (eps normed over them alone)."""
    rows = token_rows(4)
    batch = default_data_collator(rows)
    model = six_layer_lora_model()
    before = trainable_state(model)
    trainer = sampling_trainer(model, tmp_path, rows=rows, max_steps=1, vaccine_sampled_layers=3,
                               vaccine_checkpoint_frozen_layers=checkpoint_frozen)
    num_items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    steps = run_with_record(trainer)
    active = steps[0][0]
    assert len(active) == 3

    reference = six_layer_lora_model().train()
    modules = [decoder_layers(reference)[i].self_attn for i in active]
    batch = {**batch, "num_items_in_batch": num_items}
    captured = []
    handles = [m.register_forward_hook(lambda mod, a, out: captured.append(first(out))) for m in modules]
    clean = reference(**batch).loss
    for handle in handles:
        handle.remove()
    hidden = torch.autograd.grad(clean, captured)
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in hidden))
    eps = [(2.0 * g.double() / total).float() for g in hidden]
    handles = [m.register_forward_hook(lambda mod, a, out, e=e: (out[0] + e,) + tuple(out[1:]))
               for m, e in zip(modules, eps)]
    perturbed = reference(**batch).loss
    for handle in handles:
        handle.remove()
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    grads = dict(zip(names, torch.autograd.grad(perturbed, [p for p in reference.parameters() if p.requires_grad])))

    after = trainable_state(model)
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    assert moved == {n for n in after if layer_of(n) in active}
    update = torch.cat([(after[n] - before[n]).flatten() for n in sorted(moved)])
    want = torch.cat([(-LR * grads[n]).flatten() for n in sorted(moved)])
    assert relative_error(update, want) < 1e-5


def test_all_layers_with_uniform_probabilities_equal_plain_vaccine(tmp_path):
    rows = token_rows(8)
    plain_model, sampled_model = six_layer_lora_model(), six_layer_lora_model()
    before = trainable_state(plain_model)
    args = dict(max_steps=2, per_device_train_batch_size=4, optim="adamw_torch", weight_decay=0.1, learning_rate=1e-2)
    VaccineTrainer(model=plain_model, args=VaccineTrainingArguments(**training_args(tmp_path / "a", **args)),
                   train_dataset=rows).train()
    sampling_trainer(sampled_model, tmp_path / "b", rows=rows, vaccine_sampled_layers=NUM_LAYERS,
                     vaccine_layer_probabilities="uniform", **args).train()
    plain, sampled = trainable_state(plain_model), trainable_state(sampled_model)
    assert all(torch.equal(plain[n], sampled[n]) for n in plain)
    assert any(not torch.equal(plain[n], before[n]) for n in plain)


def test_the_graph_stops_at_the_lowest_active_layer_in_both_passes(tmp_path):
    model = six_layer_lora_model()
    trainer = sampling_trainer(model, tmp_path, max_steps=1, vaccine_layer_probabilities="uniform")
    seen = []
    for index, layer in enumerate(decoder_layers(model)):
        layer.register_forward_hook(lambda m, a, out, i=index: seen.append(
            (trainer._vaccine_hooks.mode, i, first(out).requires_grad, m.gradient_checkpointing)))
    steps = run_with_record(trainer)
    active = steps[0][0]
    lowest = min(active)
    assert lowest > 0 or NUM_LAYERS == 1
    for mode in ("capture", "perturb"):
        calls = [(i, grad, checkpointed) for m, i, grad, checkpointed in seen if m == mode]
        assert [i for i, _, _ in calls] == list(range(NUM_LAYERS)), mode
        assert all(grad == (i >= lowest) for i, grad, _ in calls), (mode, lowest, calls)
        # Frozen layers keep no activations (recomputed in backward), as in the authors' code.
        assert all(checkpointed == (i not in active) for i, _, checkpointed in calls), (mode, active, calls)
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))  # restored after train()


def test_resume_draws_the_same_layers_and_ends_at_the_same_weights(tmp_path):
    settings = dict(max_steps=6, optim="adamw_torch", learning_rate=1e-2, weight_decay=0.1,
                    vaccine_probe_interval=3, vaccine_sampling_interval=2)
    whole_model = six_layer_lora_model()
    whole = run_with_record(sampling_trainer(whole_model, tmp_path / "whole", **settings))

    first_part = sampling_trainer(six_layer_lora_model(), tmp_path / "parts", save_strategy="steps", save_steps=3,
                                  **settings)
    run_with_record(first_part)
    resumed_model = six_layer_lora_model()
    resumed = run_with_record(sampling_trainer(resumed_model, tmp_path / "parts", save_strategy="no", **settings),
                              resume_from_checkpoint=str(tmp_path / "parts" / "checkpoint-3"))
    assert sorted(resumed) == [3, 4, 5]
    for step in (3, 4, 5):
        assert resumed[step] == whole[step], step
    assert len({tuple(whole[s][0]) for s in whole}) > 1  # the draws do change over the run
    a, b = trainable_state(whole_model), trainable_state(resumed_model)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_probabilities_and_active_layers_are_logged(tmp_path):
    trainer = sampling_trainer(six_layer_lora_model(), tmp_path, max_steps=2)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert sum(logged[f"vaccine/layer_probability/{i}"] for i in range(NUM_LAYERS)) == pytest.approx(1.0)
    assert sum(logged[f"vaccine/layer_active/{i}"] for i in range(NUM_LAYERS)) == 2 == logged["vaccine/active_layers"]
    assert "vaccine/layer_probability/0" not in trainer.state.log_history[1]  # only after a probe


@pytest.mark.parametrize("overrides, probe, message", [
    ({}, None, "pass probe_dataset="),
    ({"vaccine_sampled_layers": 7}, PROBE, "only 6 layers can be sampled"),
    ({"vaccine_layers": "4-5", "vaccine_sampled_layers": 3}, PROBE, "choose at most 2"),
    ({"vaccine_sampling_interval": 0}, PROBE, "vaccine_sampling_interval must be a whole number >= 1"),
    ({"rho": 0.0}, PROBE, "it needs rho > 0"),
    ({"vaccine_modules": ".*self_attn"}, PROBE, "cannot use vaccine_modules"),
], ids=["no-probe-data", "too-many-layers", "too-many-for-subset", "zero-interval", "rho-0", "modules-by-name"])
def test_bad_layer_sampling_settings_fail_at_start_up(tmp_path, overrides, probe, message):
    with pytest.raises(ValueError, match=message):
        sampling_trainer(six_layer_lora_model(), tmp_path, probe=probe, **overrides)


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp"])
def test_sharding_backends_are_refused_for_layer_sampling(backend):
    state = types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(zero_stage=3),
                                  fsdp_plugin=types.SimpleNamespace(fsdp_version=2))
    trainer = types.SimpleNamespace(
        vaccine_args=types.SimpleNamespace(vaccine_layer_sampling=True), accelerator=types.SimpleNamespace(state=state),
        is_deepspeed_enabled=backend == "deepspeed", is_fsdp_enabled=backend == "fsdp",
        args=types.SimpleNamespace(world_size=2))
    refusal = "cannot run under (DeepSpeed ZeRO-3|FSDP2).*Run it on one process or under DDP"
    with pytest.raises(ValueError, match=refusal):
        check_layer_sampling_support(trainer)


def test_the_users_own_checkpointing_stays_on_every_layer_during_and_after_training(tmp_path):
    """The Trainer turns checkpointing on in `train()`, after T-Vaccine is set up: T-Vaccine takes each layer's state
    then, so the user's checkpointing is neither dropped from the active layers nor switched off by a probe."""
    model = six_layer_lora_model()
    trainer = sampling_trainer(model, tmp_path, max_steps=3, vaccine_layer_probabilities="harmful_gradient",
                               activation_checkpointing=True,
                               activation_checkpointing_kwargs={"use_reentrant": False})
    seen = []
    for layer in decoder_layers(model):
        layer.register_forward_hook(lambda m, a, out: seen.append((trainer._vaccine_hooks.mode,
                                                                   m.gradient_checkpointing)))
    trainer.train()
    assert {checkpointed for mode, checkpointed in seen if mode in ("capture", "perturb")} == {True}
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))  # as the Trainer set it
