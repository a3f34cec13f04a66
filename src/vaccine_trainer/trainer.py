"""The perturbation-aware training step, as a mixin over any `transformers.Trainer`.

Pass 1 takes the gradient of the loss with respect to the hooked hidden states (no parameter
`.grad`, no gradient communication); pass 2 is the parent class's own `training_step` with the
perturbation added through the hooks, so loss scaling, autocast, gradient accumulation and
distributed backward stay exactly the Trainer's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from dataclasses import fields

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from .config import VaccineArguments
from .distributed import check_distributed_support, check_layer_sampling_support, pass_one_without_sync
from .layer_sampling import LayerSamplingState
from .layers import find_vaccine_modules
from .markdown import markdown_table
from .step_metrics import StepMetrics
from .targeted import LayerSampler
from .perturbation import (
    LOSS_SCALE_OVERFLOW,
    HiddenStateHooks,
    PerturbationResult,
    build_perturbation,
    gaussian_noise,
    MissingHiddenStateGradientError,
    checkpointed_modules,
    hidden_state_gradients,
    token_norms,
    uses_reentrant_checkpointing,
)

logger = logging.get_logger(__name__)

_VACCINE_FIELDS = tuple(f.name for f in fields(VaccineArguments))
VACCINE_CONFIG_NAME = "vaccine_config.json"


class VaccineStateCallback(TrainerCallback, ExportableState):
    """Keeps the Vaccine settings and counters in `trainer_state.json` of every checkpoint.

    On resume the trainer restores `skipped_steps`, so the logged counter carries on, and T-Vaccine's
    layer probabilities and active layers (`layer_sampling`, read from the sampler when saved), so the run
    draws what it would have drawn.
    """

    def __init__(self, settings: dict | None = None, modules: list[str] | None = None, skipped_steps: int = 0,
                 layer_sampling: dict | None = None):
        self.settings = dict(settings or {})
        self.modules = list(modules or [])
        self.skipped_steps = skipped_steps
        self.sampler: LayerSampler | None = None
        self._saved_sampling = layer_sampling  # what a checkpoint held, until a sampler takes it

    @property
    def layer_sampling(self) -> dict | None:
        return self.sampler.state.to_dict() if self.sampler is not None else self._saved_sampling

    @layer_sampling.setter
    def layer_sampling(self, saved: dict | None) -> None:  # the Trainer restores attributes by setting them
        self._saved_sampling = saved

    def state(self) -> dict:
        return {
            "args": {"settings": self.settings, "modules": self.modules},
            "attributes": {"skipped_steps": self.skipped_steps, "layer_sampling": self.layer_sampling},
        }


class VaccineMixin:
    """Adds Vaccine's two-pass step to a Trainer class: `class X(VaccineMixin, SomeTrainer)`.

    Vaccine settings come from the training arguments when they carry them
    (`VaccineTrainingArguments`, `VaccineSFTConfig`) and can be given or overridden as keyword
    arguments (`rho=2.0`, `vaccine_target="layer"`, ...), so plain `TrainingArguments` work too.
    """

    def __init__(self, *args, probe_dataset=None, **kwargs):
        overrides = {name: kwargs.pop(name) for name in _VACCINE_FIELDS if name in kwargs}
        super().__init__(*args, **kwargs)
        from_args = {name: getattr(self.args, name) for name in _VACCINE_FIELDS if hasattr(self.args, name)}
        self.vaccine_args = VaccineArguments(**{**from_args, **overrides})
        for name, value in overrides.items():
            if hasattr(self.args, name):
                setattr(self.args, name, value)  # saved with the arguments, so the run can be reproduced
        self._check_vaccine_supported()
        self._vaccine_hooks: HiddenStateHooks | None = None
        self._vaccine_reentrant_found = False  # the checkpoint function runs reentrant whatever its settings say
        self.vaccine_modules: list[str] = []
        if self.vaccine_args.rho > 0:
            settings = self.vaccine_args
            named = find_vaccine_modules(
                self.model, settings.vaccine_target, settings.vaccine_layers, settings.vaccine_modules
            )
            self.vaccine_modules = [name for name, _ in named]
            self._vaccine_hooks = HiddenStateHooks([module for _, module in named])
            logger.info(
                f"Vaccine ({settings.vaccine_perturbation}, rho={settings.rho}, norm={settings.vaccine_norm}) "
                f"perturbs the outputs of {len(named)} modules: {_summarise(self.vaccine_modules)}"
            )
        self._vaccine_metrics = StepMetrics()
        self._vaccine_state = VaccineStateCallback(self.vaccine_args.vaccine_kwargs(), self.vaccine_modules)
        self.add_callback(self._vaccine_state)
        self.vaccine_sampler: LayerSampler | None = None  # T-Vaccine
        if self.vaccine_args.vaccine_layer_sampling:
            self.vaccine_sampler = LayerSampler(self.model, self.vaccine_args, self.args.seed, probe_dataset,
                                                prepare_probe=self._prepare_probe_dataset)
            self._vaccine_state.sampler = self.vaccine_sampler
        elif probe_dataset is not None:
            logger.warning("probe_dataset is used by T-Vaccine only (vaccine_layer_sampling=True); it is ignored.")


    @property
    def vaccine_skipped_steps(self) -> int:
        """Micro-batches trained without perturbation because pass 1's gradient was non-finite or zero."""
        return self._vaccine_state.skipped_steps

    def _check_vaccine_supported(self) -> None:
        dataset = getattr(self, "train_dataset", None)
        if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError(
                "train_dataset is empty: Vaccine has nothing to align on. Check the data path and any "
                "filtering (e.g. max_length or a template that drops rows)."
            )
        check_distributed_support(self)
        check_layer_sampling_support(self)

    def _load_callback_state(self) -> None:
        """On resume, restore `skipped_steps` whatever `restore_callback_states_from_checkpoint` says.

        The counter is part of the run's record (logged, and written into the model card), not a setting
        the user may choose to reset. With the flag on, the Trainer swaps in a new callback instance;
        `_vaccine_state` follows it.
        """
        super()._load_callback_state()
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, VaccineStateCallback):
                self._vaccine_state = callback
        saved = (self.state.stateful_callbacks or {}).get(VaccineStateCallback.__name__)
        saved = saved[0] if isinstance(saved, list) and saved else saved
        self._vaccine_state.sampler = self.vaccine_sampler
        if isinstance(saved, dict):
            attributes = saved.get("attributes", {})
            self._vaccine_state.skipped_steps = int(attributes.get("skipped_steps", 0))
            sampling = attributes.get("layer_sampling")
            if self.vaccine_sampler is not None and sampling is not None:
                self.vaccine_sampler.restore(sampling)

    def _prepare_probe_dataset(self, dataset):
        """T-Vaccine's probe rows as the collator expects them; trainers that tokenize (TRL) override this."""
        if hasattr(dataset, "column_names") and self.args.remove_unused_columns:
            return self._remove_unused_columns(dataset, description="probe")
        return dataset

    @property
    def vaccine_layer_sampling_state(self) -> LayerSamplingState | None:
        """T-Vaccine's probabilities and active layers (decoder-layer indices via `active_layers()`)."""
        return self.vaccine_sampler.state if self.vaccine_sampler is not None else None

    def train(self, *args, **kwargs):
        """Train with the hooks registered for the whole run, so `torch.compile` sees them.

        `torch.compile` does not guard on module hooks by default: code it compiled for this model (an evaluation
        before `train`) or for another model of the same class (a plain run earlier in the process) would be
        reused without the hooks. So a compiled run starts from an empty compile cache, and during `train` the
        hooks are guarded on: code compiled with them is not reused once they are removed, nor the reverse.

        T-Vaccine's frozen layers are trainable again when `train` returns or fails.
        """
        if self._vaccine_hooks is None:
            return super().train(*args, **kwargs)
        try:
            with self._vaccine_hooks.installed_for(), compiled_with_hooks(self.args.torch_compile, self.model):
                return super().train(*args, **kwargs)
        finally:
            if self.vaccine_sampler is not None:
                self.vaccine_sampler.release()

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        hooks = self._vaccine_hooks
        if hooks is None:  # rho == 0: exactly the parent's step
            return super().training_step(model, inputs, num_items_in_batch)
        with hooks.installed_for():
            active = None
            if self.vaccine_sampler is not None:
                active = self.vaccine_sampler.active_at(
                    self.state.global_step, lambda rows: self._vaccine_probe_norms(model, rows))
            with hooks.restricted_to(active):
                result = self._vaccine_first_step(model, inputs, num_items_in_batch)
                return self._vaccine_second_step(model, inputs, num_items_in_batch, result)

    def _vaccine_first_step(self, model, inputs, num_items_in_batch) -> PerturbationResult:
        """The perturbation, as SAM's first step: Vaccine's `gradient` (pass 1) or the `gaussian` ablation's noise."""
        if self.vaccine_args.vaccine_perturbation == "gaussian":
            return PerturbationResult(gaussian_noise(math.sqrt(self.vaccine_args.rho)), grad_norm=0.0)
        return self._vaccine_pass_one(model, inputs, num_items_in_batch)

    def _vaccine_second_step(self, model, inputs, num_items_in_batch, result: PerturbationResult) -> torch.Tensor:
        """The parent's step with the perturbation added, as SAM's second step; a skipped pass 1 trains clean."""
        if result.skipped_reason == LOSS_SCALE_OVERFLOW:
            logger.info(
                f"Vaccine: pass 1 overflowed at loss scale {self._vaccine_loss_scale():g}; pass 2 carries the "
                "overflow to the loss scaler, which skips this optimizer step and lowers its scale, as for any "
                "overflow."
            )
            return self._vaccine_pass_two(model, inputs, num_items_in_batch, result.eps, measure=False)
        if result.skipped_reason is not None:
            self._vaccine_state.skipped_steps += 1
            logger.warning(
                f"Vaccine: {result.skipped_reason} in pass 1 (norm {result.grad_norm}); this micro-batch "
                f"trains without perturbation ({self.vaccine_skipped_steps} skipped so far)."
            )
            return self._vaccine_pass_two(model, inputs, num_items_in_batch, None)
        return self._vaccine_pass_two(model, inputs, num_items_in_batch, result.eps, result.eps_norms)

    def _vaccine_pass_two(self, model, inputs, num_items_in_batch, eps, eps_norms=None,
                          measure: bool = True) -> torch.Tensor:
        """The parent's step with `eps` applied; a failure drops this accumulation window's gradients.

        With `measure`, the norm of what the hooks really added is summed for `vaccine/perturbation_norm`, and,
        given the intended `eps_norms`, the median fraction of it each layer kept for `vaccine/perturbation_kept`.

        A backward that raised half way leaves a partial sum in `.grad`; rather than step on it, the
        window's gradients are cleared (set to None), so the next optimizer step starts clean.
        """
        hooks = self._vaccine_hooks
        try:
            with hooks.perturbing(eps) if eps is not None else contextlib.nullcontext():
                loss = super().training_step(model, inputs, num_items_in_batch)
                if eps is not None:
                    hooks.check_called(None if callable(eps) else [e is not None for e in eps])
                    applied = hooks.applied_norm() if measure else None
                    if applied is not None:  # a tensor: read back only when logging, not every step
                        self._vaccine_metrics.add("perturbation_norm", applied)
                    kept = hooks.kept_fraction_median(eps_norms) if measure and eps_norms is not None else None
                    if kept is not None:
                        self._vaccine_metrics.add("perturbation_kept", kept)
            return loss
        except BaseException:
            cleared = 0
            for param in model.parameters():
                if param.grad is not None:
                    param.grad = None
                    cleared += 1
            if cleared:
                logger.warning(
                    f"Vaccine: the step failed in pass 2; cleared the gradients of {cleared} parameters "
                    "accumulated in this optimizer step so that no partial sum is applied."
                )
            raise

    def _vaccine_pass_one(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None
    ) -> PerturbationResult:
        """Forward and input-gradient backward on the clean batch; returns eps.

        Under a dynamic loss scaler (fp16), a non-finite gradient is an overflow of the scale, not a bad batch: the
        result then carries an infinite eps (`LOSS_SCALE_OVERFLOW`), so that pass 2's gradients overflow too, on
        every process after the reduction, and the scaler skips the step and lowers the scale as it does for its
        own overflows. Without a scaler, the micro-batch trains unperturbed and is counted as skipped.
        """
        scaler_scale = self._vaccine_loss_scale()
        loss_scale = 1.0 if scaler_scale is None else scaler_scale
        relative = self.vaccine_args.vaccine_norm == "relative"
        gradients, loss, hidden_norms = self._vaccine_hidden_state_gradients(
            model, inputs, num_items_in_batch, loss_scale, with_token_norms=relative)
        self._record_clean_loss(loss, num_items_in_batch)
        result = build_perturbation(gradients, self.vaccine_args.rho, self.vaccine_args.vaccine_norm, hidden_norms)
        if scaler_scale is not None and not math.isfinite(result.grad_norm):
            overflow = [None if g is None else torch.full_like(g, math.inf) for g in gradients]
            return PerturbationResult(overflow, result.grad_norm, LOSS_SCALE_OVERFLOW)
        # Logged on the scale of one process's loss: the AMP scale and compute_loss's factor for averaging
        # tokens across processes divided out, so the figure does not depend on the number of processes.
        result.grad_norm /= loss_scale * self._vaccine_process_factor(num_items_in_batch)
        if result.skipped_reason is None:
            self._vaccine_metrics.add("grad_norm", result.grad_norm)
        return result

    def _vaccine_hidden_state_gradients(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None = None,
        loss_scale: float = 1.0, with_token_norms: bool = False,
    ) -> tuple[list[torch.Tensor | None], torch.Tensor, list[torch.Tensor | None] | None]:
        """The gradient of `loss * loss_scale` w.r.t. every hooked hidden state, the detached loss, and with
        `with_token_norms` each hidden state's per-token norms ||h_t|| (what the relative norm scales by).

        Shared by pass 1 and T-Vaccine's probe: no parameter `.grad` is made and no gradient is reduced
        across processes, whatever wraps the model.
        """
        model = self._vaccine_pass_one_model(model)
        model.train()
        reentrant = self._vaccine_reentrant_found or uses_reentrant_checkpointing(model)
        try:
            return self._vaccine_capture_gradients(model, inputs, num_items_in_batch, loss_scale, with_token_norms,
                                                   reentrant)
        except MissingHiddenStateGradientError as error:
            if reentrant or not any(True for _ in checkpointed_modules(model)):
                raise
            if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
                raise RuntimeError(
                    "Vaccine: the model's activation checkpointing runs reentrant although its settings say "
                    "use_reentrant=False (a checkpoint function replaced by another library, e.g. Unsloth's or "
                    "Axolotl's activation offloading). Reentrant checkpointing needs a full backward in pass 1, which "
                    "DeepSpeed and FSDP would reduce as a step's gradients. Turn that library's checkpointing or "
                    "offloading off, or use DDP."
                ) from error
        # The settings say non-reentrant, but the checkpoint function ran reentrant (Unsloth's "unsloth"
        # checkpointing, Axolotl's activation offloading): its forward kept no graph to the hidden states. Redo this
        # micro-batch's pass 1 by the reentrant path, and take that path from now on.
        self._vaccine_reentrant_found = True
        logger.warning(
            "Vaccine: the model's activation checkpointing runs reentrant although its settings say "
            "use_reentrant=False (a checkpoint function replaced by another library); pass 1 now collects the "
            "hidden-state gradients with a full backward, as for reentrant checkpointing. The update is the same."
        )
        return self._vaccine_capture_gradients(model, inputs, num_items_in_batch, loss_scale, with_token_norms, True)

    def _vaccine_capture_gradients(self, model, inputs, num_items_in_batch, loss_scale: float, with_token_norms: bool,
                                   reentrant: bool):
        """One forward and input-gradient backward of pass 1: by `autograd.grad`, or with `reentrant` by a full
        backward whose tensor hooks catch the gradients (the parameters' `.grad` stashed and restored)."""
        inputs = self._prepare_inputs(dict(inputs))  # a copy: compute_loss may pop keys
        hooks = self._vaccine_hooks
        trainable = [p for p in model.parameters() if p.requires_grad] if reentrant else []
        with self._vaccine_pass_one_context(), pass_one_without_sync(self, model), \
                hooks.capturing(gradient_hooks=reentrant):
            with self.compute_loss_context_manager(), self._vaccine_engine_autocast():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            hooks.check_called()
            gradients = hidden_state_gradients(loss * loss_scale, hooks, trainable)
            hidden_norms = [None if h is None else token_norms(h) for h in hooks.outputs] if with_token_norms else None
        return gradients, loss.detach(), hidden_norms

    def _vaccine_probe_norms(self, model: nn.Module, rows) -> list[float]:
        """T-Vaccine's probe: hidden-state gradient norm of every candidate layer on the probe rows `rows`.

        Averaged over processes, so every process draws from the same probabilities. The AMP scale keeps fp16
        gradients from underflowing; it cancels in the normalised probabilities.
        """
        dataset = self.vaccine_sampler.probe_dataset
        gradients, _, _ = self._vaccine_hidden_state_gradients(
            model, self.data_collator([dataset[i] for i in rows]), loss_scale=self._vaccine_loss_scale() or 1.0)
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) if g is not None
                             else torch.zeros((), device=self.args.device) for g in gradients]).to(self.args.device)
        if self.args.world_size > 1:
            norms = self.accelerator.reduce(norms, reduction="mean")
        return norms.tolist()

    def _vaccine_pass_one_model(self, model: nn.Module) -> nn.Module:
        """The module pass 1 runs through: never one whose backward reduces gradients.

        `DeepSpeedEngine.forward` registers backward hooks on its output that run the engine's gradient
        reduction after any backward from that loss, `autograd.grad` included (ZeRO-2 then crashes, ZeRO-3
        reduces stale buffers into the update). Its `.module` is the model itself: ZeRO-3's module hooks
        still gather the partitioned parameters in forward and in the partial backward, and no gradient
        hook fires because `autograd.grad` accumulates nothing into `.grad`.
        """
        if getattr(self, "is_deepspeed_enabled", False) and isinstance(getattr(model, "module", None), nn.Module):
            return model.module
        return model

    def _vaccine_pass_one_context(self):
        """Hook for subclasses: the contexts their `training_step` puts pass 2 in, and protection of state that
        `compute_loss` changes (e.g. TRL's metrics)."""
        return contextlib.nullcontext()

    def _vaccine_engine_autocast(self):
        """DeepSpeed's `torch_autocast`: its engine's forward enters it, and pass 1 (through `.module`) must too,
        or the two passes run at different precisions."""
        if getattr(self, "is_deepspeed_enabled", False) and callable(getattr(self.model_wrapped, "module", None)):
            from deepspeed.runtime.torch_autocast import autocast_if_enabled

            return autocast_if_enabled(self.model_wrapped)
        return contextlib.nullcontext()

    def _vaccine_process_factor(self, num_items_in_batch) -> float:
        """The factor `Trainer.compute_loss` multiplies the loss by under `average_tokens_across_devices`."""
        if (self.args.average_tokens_across_devices and num_items_in_batch is not None
                and (self.model_accepts_loss_kwargs or self.compute_loss_func is not None)):
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            return float(max(self.accelerator.num_processes // tp_size, 1))
        return 1.0

    def _vaccine_loss_scale(self) -> float | None:
        """The loss scale pass 2's backward uses (fp16), for pass 1 too; None where no loss scaling runs.

        fp16 gradients of hidden states underflow like weight gradients. The Trainer's own AMP keeps the scale in
        the accelerator's `GradScaler`; DeepSpeed scales fp16 losses itself, and every fp16 optimizer it builds
        (ZeRO-1/2/3 and the non-ZeRO fused and unfused ones) exposes the scale in use as `loss_scale`.
        """
        engine = self.model_wrapped if getattr(self, "is_deepspeed_enabled", False) else None
        # DeepSpeed's `torch_autocast` in fp16 without ZeRO scales with a GradScaler of its own engine.
        scaler = getattr(engine, "torch_autocast_z0_gradscaler", None) or getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            return float(scaler.get_scale())
        if engine is not None and callable(getattr(engine, "fp16_enabled", None)) and engine.fp16_enabled():
            scale = getattr(getattr(engine, "optimizer", None), "loss_scale", None)
            if isinstance(scale, torch.Tensor):
                scale = scale.item()
            if not isinstance(scale, (int, float)) or not scale > 0:
                raise RuntimeError(
                    f"Vaccine cannot read the fp16 loss scale of DeepSpeed's optimizer "
                    f"({type(getattr(engine, 'optimizer', None)).__name__}: loss_scale={scale!r}); without it pass 1's "
                    "fp16 gradients underflow. Use bf16 (`bf16: enabled` in the DeepSpeed config) or report the "
                    "DeepSpeed version."
                )
            return float(scale)
        return None

    def _record_clean_loss(self, loss: torch.Tensor, num_items_in_batch) -> None:
        # The same normalisation as Trainer.training_step, so vaccine/clean_loss is comparable to loss.
        scaled = getattr(self, "loss_is_scaled_for_ga", None)  # transformers < 5.2x has no such attribute
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        if not scaled:
            loss = loss / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        # Each micro-batch's share of its window times the window's length: the scale of the logged loss.
        self._vaccine_metrics.add("clean_loss", loss.float().mean() * self.args.gradient_accumulation_steps)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the `vaccine/*` figures since the last log (means over micro-batches and processes) to the logs."""
        if "loss" in logs and self._vaccine_hooks is not None:
            reduce = None
            if self.args.world_size > 1:
                reduce = functools.partial(self.accelerator.reduce, reduction="sum")
            logs.update(self._vaccine_metrics.means(reduce, self.args.device,
                                                    totals={"skipped_steps": self.vaccine_skipped_steps}))
            self._vaccine_metrics.clear()
            if self.vaccine_sampler is not None:  # after a probe or a draw: probabilities and active layers
                logs.update(self.vaccine_sampler.pop_logs())
        super().log(logs, start_time)

    def save_state(self) -> None:
        """The parent's, with Vaccine's counters and T-Vaccine's layers as they are now, not as at train start.

        The Trainer refreshes callback states only in checkpoints; `trainer_state.json` of the final save
        would otherwise show the values of the first step.
        """
        if isinstance(self.state.stateful_callbacks, dict):
            self.state.stateful_callbacks[VaccineStateCallback.__name__] = self._vaccine_state.state()
        super().save_state()

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Save as the parent does, plus `vaccine_config.json` so the run can be reproduced."""
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            settings = {"settings": self.vaccine_args.vaccine_kwargs(), "modules": self.vaccine_modules}
            with open(os.path.join(output_dir, VACCINE_CONFIG_NAME), "w") as handle:
                json.dump(settings, handle, indent=2)

    def create_model_card(self, *args, **kwargs) -> None:
        """The parent's model card, tagged `vaccine`, with a section giving the Vaccine settings."""
        from huggingface_hub import ModelCard

        super().create_model_card(*args, **kwargs)
        path = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not os.path.exists(path):
            return
        card = ModelCard.load(path)  # re-read: PEFT rewrites the card's metadata after the parent writes it
        card.data.tags = list(dict.fromkeys([*(card.data.tags or []), "vaccine", "safety-alignment"]))
        table = "\n".join(markdown_table(["setting", "value"], [
            [f"`{name}`", f"`{value}`"] for name, value in self.vaccine_args.vaccine_kwargs().items()], numeric_from=2))
        card.text += (
            "\n## Vaccine alignment\n\nTrained with Vaccine (perturbation-aware alignment, Huang et al., "
            "NeurIPS 2024, arXiv:2402.01109) using vaccine-trainer.\n\n"
            f"{table}\n\nPerturbed modules: {len(self.vaccine_modules)} "
            f"({_summarise(self.vaccine_modules)}).\nMicro-batches trained without perturbation "
            f"(non-finite or zero pass-1 gradient): {self.vaccine_skipped_steps}.\n"
        )
        card.save(path)


@contextlib.contextmanager
def compiled_with_hooks(torch_compile: bool, model: nn.Module):
    """For a compiled run: drop code compiled without the hooks, and guard the code compiled now on them."""
    from accelerate.utils import is_compiled_module

    if not (torch_compile or is_compiled_module(model)):
        yield
        return
    logger.info("Vaccine: clearing torch.compile's cache, so that no code compiled without its hooks is reused.")
    torch.compiler.reset()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        yield


def _summarise(names: list[str], keep: int = 3) -> str:
    if len(names) <= 2 * keep:
        return ", ".join(names)
    return ", ".join(names[:keep]) + f", ... ({len(names) - 2 * keep} more), " + ", ".join(names[-keep:])


class VaccineTrainer(VaccineMixin, Trainer):
    """`transformers.Trainer` with Vaccine's perturbation-aware alignment step.

    Accepts `VaccineTrainingArguments`, or plain `TrainingArguments` plus Vaccine keyword arguments:
    `VaccineTrainer(model=model, args=args, train_dataset=ds, rho=2.0)`.
    """


__all__ = ["VaccineMixin", "VaccineTrainer"]
