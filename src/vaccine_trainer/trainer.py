"""The perturbation-aware training step, as a mixin over any `transformers.Trainer`.

Pass 1 takes the gradient of the loss with respect to the hooked hidden states (no parameter
`.grad`, no gradient communication); pass 2 is the parent class's own `training_step` with the
perturbation added through the hooks, so loss scaling, autocast, gradient accumulation and
distributed backward stay exactly the Trainer's.

The trainer holds its parts: the hooks (`perturbation.HiddenStateHooks`), the keyed metrics (`StepMetrics`), the
persisted state (`VaccineStateCallback`) and T-Vaccine's sampler (`LayerSampler`); `backend` says what pass 1 must
do alike under each backend, and `ModelCardSections` writes the card.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import fields

import torch
from torch import nn
from transformers import Trainer
from transformers.utils import logging

from . import backend
from .config import VaccineArguments
from .distributed import check_distributed_support, check_layer_sampling_support
from .layer_sampling import LayerSamplingState
from .layers import find_vaccine_modules
from .markdown import markdown_table
from .model_card import ModelCardSections
from .perturbation import (
    LOSS_SCALE_OVERFLOW,
    HiddenStateHooks,
    MissingHiddenStateGradientError,
    PerturbationResult,
    build_perturbation,
    checkpointed_modules,
    gaussian_noise,
    hidden_state_gradients,
    token_norms,
    uses_reentrant_checkpointing,
)
from .quantized_layout import trainable_4bit_layout
from .step_metrics import StepMetrics
from .targeted import LayerSampler
from .vaccine_state import VaccineStateCallback, write_vaccine_config

logger = logging.get_logger(__name__)

_VACCINE_FIELDS = tuple(f.name for f in fields(VaccineArguments))


class VaccineMixin(ModelCardSections):
    """Adds Vaccine's two-pass step to a Trainer class: `class X(VaccineMixin, SomeTrainer)`.

    Vaccine settings come from the training arguments when they carry them
    (`VaccineTrainingArguments`, `VaccineSFTConfig`) and can be given or overridden as keyword
    arguments (`rho=2.0`, `vaccine_target="layer"`, ...), so plain `TrainingArguments` work too.
    """

    model_card_tags = ("vaccine", "safety-alignment")

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
    def vaccine_hooks(self) -> HiddenStateHooks | None:
        """The hooks on the perturbed modules (`modules`, and `mode`: the pass running); None at rho 0."""
        return self._vaccine_hooks

    @property
    def vaccine_skipped_steps(self) -> int:
        """Micro-batches trained without perturbation because pass 1's gradient was non-finite or zero."""
        return self._vaccine_state.skipped_steps

    @property
    def vaccine_layer_sampling_state(self) -> LayerSamplingState | None:
        """T-Vaccine's probabilities and active layers (decoder-layer indices via `active_layers()`)."""
        return self.vaccine_sampler.state if self.vaccine_sampler is not None else None

    def _check_vaccine_supported(self) -> None:
        dataset = getattr(self, "train_dataset", None)
        if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError(
                "train_dataset is empty: Vaccine has nothing to align on. Check the data path and any "
                "filtering (e.g. max_length or a template that drops rows)."
            )
        check_distributed_support(self)
        check_layer_sampling_support(self)

    # ------------------------------------------------------------------------------------ Algorithm 1

    def train(self, *args, **kwargs):
        """Train with the hooks registered for the whole run, so `torch.compile` sees them.

        `torch.compile` does not guard on module hooks by default: code it compiled for this model (an evaluation
        before `train`) or for another model of the same class (a plain run earlier in the process) would be
        reused without the hooks. So a compiled run starts from an empty compile cache, and during `train` the
        hooks are guarded on: code compiled with them is not reused once they are removed, nor the reverse.

        T-Vaccine's frozen layers are trainable again when `train` returns or fails. 4-bit layers keep the layout
        that trains (`quantized_layout`).
        """
        hooks = self._vaccine_hooks
        try:
            with trainable_4bit_layout(self.model):
                if hooks is None:
                    return super().train(*args, **kwargs)
                with hooks.installed_for(), compiled_with_hooks(self.args.torch_compile, self.model):
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
        """One micro-batch of Algorithm 1: eps from the clean batch (pass 1), then the parent's step with eps added
        to the hidden states (pass 2). T-Vaccine first picks the layers this step perturbs and trains."""
        hooks = self._vaccine_hooks
        if hooks is None:  # rho == 0: exactly the parent's step
            return super().training_step(model, inputs, num_items_in_batch)
        with hooks.installed_for():
            active = None
            if self.vaccine_sampler is not None:
                active = self.vaccine_sampler.active_at(
                    self.state.global_step, lambda rows: self._vaccine_probe_norms(model, rows))
            with hooks.restricted_to(active):
                perturbation = self._vaccine_pass_one(model, inputs, num_items_in_batch)
                return self._vaccine_pass_two(model, inputs, num_items_in_batch, perturbation)

    def _vaccine_pass_one(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None
    ) -> PerturbationResult:
        """eps, as SAM's first step: from the hidden-state gradients of the clean batch (Vaccine), or the `gaussian`
        ablation's noise.

        Under a dynamic loss scaler (fp16), a non-finite gradient is an overflow of the scale, not a bad batch: the
        result then carries an infinite eps (`LOSS_SCALE_OVERFLOW`), so that pass 2's gradients overflow too, on
        every process after the reduction, and the scaler skips the step and lowers its scale as it does for its
        own overflows. Without a scaler, the micro-batch trains unperturbed and is counted as skipped.
        """
        if self.vaccine_args.vaccine_perturbation == "gaussian":
            return PerturbationResult(gaussian_noise(math.sqrt(self.vaccine_args.rho)), grad_norm=0.0)
        scaler_scale = backend.loss_scale(self)
        loss_scale = 1.0 if scaler_scale is None else scaler_scale
        relative = self.vaccine_args.vaccine_norm == "relative"
        gradients, loss, hidden_norms = self._vaccine_hidden_state_gradients(
            model, inputs, num_items_in_batch, loss_scale, with_token_norms=relative)
        self._vaccine_metrics.add("clean_loss", backend.logged_loss(self, loss, num_items_in_batch))
        result = build_perturbation(gradients, self.vaccine_args.rho, self.vaccine_args.vaccine_norm, hidden_norms)
        if scaler_scale is not None and not math.isfinite(result.grad_norm):
            overflow = [None if g is None else torch.full_like(g, math.inf) for g in gradients]
            return PerturbationResult(overflow, result.grad_norm, LOSS_SCALE_OVERFLOW)
        # Logged on the scale of one process's loss: the AMP scale and compute_loss's factor for averaging
        # tokens across processes divided out, so the figure does not depend on the number of processes.
        result.grad_norm /= loss_scale * backend.process_factor(self, num_items_in_batch)
        if result.skipped_reason is None:
            self._vaccine_metrics.add("grad_norm", result.grad_norm)
        return result

    def _vaccine_pass_two(self, model: nn.Module, inputs: dict[str, torch.Tensor],
                          num_items_in_batch: torch.Tensor | int | None, perturbation: PerturbationResult
                          ) -> torch.Tensor:
        """The parent's step with eps added through the hooks, as SAM's second step; a pass 1 that was skipped
        trains clean, an overflow is carried to the loss scaler.

        The norm of what the hooks really added is summed for `vaccine/perturbation_norm`, and the median fraction
        of the intended eps each layer kept for `vaccine/perturbation_kept`. A backward that raised half way
        leaves a partial sum in `.grad`; rather than step on it, the window's gradients are cleared (set to None),
        so the next optimizer step starts clean.
        """
        eps, measure = perturbation.eps, True
        if perturbation.skipped_reason == LOSS_SCALE_OVERFLOW:
            logger.info(
                f"Vaccine: pass 1 overflowed at loss scale {backend.loss_scale(self):g}; pass 2 carries the "
                "overflow to the loss scaler, which skips this optimizer step and lowers its scale, as for any "
                "overflow."
            )
            measure = False
        elif perturbation.skipped_reason is not None:
            self._vaccine_state.skipped_steps += 1
            logger.warning(
                f"Vaccine: {perturbation.skipped_reason} in pass 1 (norm {perturbation.grad_norm}); this micro-batch "
                f"trains without perturbation ({self.vaccine_skipped_steps} skipped so far)."
            )
            eps = None
        hooks = self._vaccine_hooks
        adding = hooks.perturbing(eps) if eps is not None else contextlib.nullcontext()
        with _gradients_cleared_on_failure(model), adding:
            loss = super().training_step(model, inputs, num_items_in_batch)
            if eps is not None:
                hooks.check_called(None if callable(eps) else [e is not None for e in eps])
                if measure:
                    applied = hooks.applied_norm()
                    if applied is not None:  # a tensor: read back only when logging, not every step
                        self._vaccine_metrics.add("perturbation_norm", applied)
                    kept = (hooks.kept_fraction_median(perturbation.eps_norms) if perturbation.eps_norms is not None
                            else None)
                    if kept is not None:
                        self._vaccine_metrics.add("perturbation_kept", kept)
        return loss

    # ------------------------------------------------------------------------- pass 1's gradients

    def _vaccine_hidden_state_gradients(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None = None,
        loss_scale: float = 1.0, with_token_norms: bool = False,
    ) -> tuple[list[torch.Tensor | None], torch.Tensor, list[torch.Tensor | None] | None]:
        """The gradient of `loss * loss_scale` w.r.t. every hooked hidden state, the detached loss, and with
        `with_token_norms` each hidden state's per-token norms ||h_t|| (what the relative norm scales by).

        Shared by pass 1 and T-Vaccine's probe: no parameter `.grad` is made and no gradient is reduced
        across processes, whatever wraps the model.
        """
        model = backend.pass_one_model(self, model)
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
        with self._vaccine_pass_one_context(), backend.pass_one_without_sync(self, model), \
                hooks.capturing(gradient_hooks=reentrant):
            with self.compute_loss_context_manager(), backend.engine_autocast(self):
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            hooks.check_called()
            gradients = hidden_state_gradients(loss * loss_scale, hooks, trainable)
            hidden_norms = [None if h is None else token_norms(h) for h in hooks.outputs] if with_token_norms else None
        return gradients, loss.detach(), hidden_norms

    def _vaccine_pass_one_context(self):
        """Hook for subclasses: the contexts their `training_step` puts pass 2 in, and protection of state that
        `compute_loss` changes (e.g. TRL's metrics)."""
        return contextlib.nullcontext()

    # ---------------------------------------------------------------------------------- T-Vaccine

    def _vaccine_probe_norms(self, model: nn.Module, rows) -> list[float]:
        """T-Vaccine's probe: hidden-state gradient norm of every candidate layer on the probe rows `rows`.

        Averaged over processes, so every process draws from the same probabilities. The AMP scale keeps fp16
        gradients from underflowing; it cancels in the normalised probabilities.
        """
        dataset = self.vaccine_sampler.probe_dataset
        gradients, _, _ = self._vaccine_hidden_state_gradients(
            model, self.data_collator([dataset[i] for i in rows]), loss_scale=backend.loss_scale(self) or 1.0)
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) if g is not None
                             else torch.zeros((), device=self.args.device) for g in gradients]).to(self.args.device)
        if self.args.world_size > 1:
            norms = self.accelerator.reduce(norms, reduction="mean")
        return norms.tolist()

    def _prepare_probe_dataset(self, dataset):
        """T-Vaccine's probe rows as the collator expects them; trainers that tokenize (TRL) override this."""
        if hasattr(dataset, "column_names") and self.args.remove_unused_columns:
            return self._remove_unused_columns(dataset, description="probe")
        return dataset

    # ------------------------------------------------------------------- logs, state and the card

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

    def _load_callback_state(self) -> None:
        """On resume, restore Vaccine's counters and T-Vaccine's layers (`VaccineStateCallback.restore`). With
        `restore_callback_states_from_checkpoint`, the Trainer swaps in a new callback instance: `_vaccine_state`
        follows it."""
        super()._load_callback_state()
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, VaccineStateCallback):
                self._vaccine_state = callback
        self._vaccine_state.sampler = self.vaccine_sampler
        self._vaccine_state.restore(self.state.stateful_callbacks)

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
        if self.args.should_save:
            write_vaccine_config(output_dir if output_dir is not None else self.args.output_dir,
                                 self.vaccine_args.vaccine_kwargs(), self.vaccine_modules)

    def model_card_computed_sections(self) -> list[str]:
        """The card's Vaccine section: the settings, the perturbed modules, the micro-batches left unperturbed."""
        table = "\n".join(markdown_table(["setting", "value"], [
            [f"`{name}`", f"`{value}`"] for name, value in self.vaccine_args.vaccine_kwargs().items()], numeric_from=2))
        section = (
            "## Vaccine alignment\n\nTrained with Vaccine (perturbation-aware alignment, Huang et al., "
            "NeurIPS 2024, arXiv:2402.01109) using vaccine-trainer.\n\n"
            f"{table}\n\nPerturbed modules: {len(self.vaccine_modules)} "
            f"({_summarise(self.vaccine_modules)}).\nMicro-batches trained without perturbation "
            f"(non-finite or zero pass-1 gradient): {self.vaccine_skipped_steps}.\n"
        )
        return [*super().model_card_computed_sections(), section]


@contextlib.contextmanager
def _gradients_cleared_on_failure(model: nn.Module):
    """If the step raises, set every `.grad` to None: a half-run backward leaves a partial sum the next optimizer
    step must not apply."""
    try:
        yield
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
