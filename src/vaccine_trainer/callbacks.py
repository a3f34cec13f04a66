"""Alignment drift during fine-tuning: the paper's two diagnostics as a `TrainerCallback`.

Vaccine's premise is that harmful fine-tuning breaks alignment by moving the hidden states of
alignment data ("harmful embedding drift"). This callback measures that, on a held set of alignment
data, at every logging and evaluation step of any `transformers.Trainer`:

- `alignment/drift`: sum over hooked layers and samples of ||h_now - h_aligned||^2, with h_aligned the
  hidden states of the model when training begins (the aligned model, cached once);
- `alignment/drift_fraction`: that drift divided by sum ||h_aligned||^2 over the same layers and tokens,
  so that models whose hidden states differ in scale (e.g. aligned by SFT or by Vaccine) can be compared;
- `alignment/median_token_drift`: the median over tokens and layers of ||h_now - h_aligned||^2 /
  ||h_aligned||^2, how far a typical token moved. Both sums above are dominated by the few tokens with
  massive activations (hidden states orders of magnitude larger than the rest, e.g. the first positions
  of SmolLM2 or Llama); the median is not;
- `alignment/drift_excluding_first_token`: the drift summed over every token but each row's first. In
  a causal model the first token's hidden state does not depend on the rest of the row (it is the same
  vector in every row that opens with the same token, e.g. a chat template's `<|im_start|>`), and it is
  where the massive activations sit, so it can carry most of the summed drift without saying anything
  about how the alignment data's embeddings moved;
- `alignment/loss`: the token-averaged language-modelling loss on the same set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from .layers import find_vaccine_modules
from .perturbation import hidden_output

logger = logging.get_logger(__name__)

DRIFT_KEY = "alignment/drift"
LOSS_KEY = "alignment/loss"
DRIFT_FRACTION_KEY = "alignment/drift_fraction"
MEDIAN_TOKEN_DRIFT_KEY = "alignment/median_token_drift"
DRIFT_EXCLUDING_FIRST_TOKEN_KEY = "alignment/drift_excluding_first_token"


class AlignmentDriftCallback(TrainerCallback):
    """Logs harmful embedding drift and alignment loss on held alignment data.

    Args:
        dataset: tokenized rows with `input_ids` (and optionally `attention_mask`, and `labels` with
            -100 on tokens outside the loss, e.g. the prompt); a `datasets.Dataset` or a list of dicts.
        target: `"layer"` (output of each decoder layer) or `"attention"` (each self-attention block).
        layers: decoder-layer subset, e.g. `"0-3"`; `modules`: explicit names or a regex, overriding both.
        batch_size: rows per forward pass.
        data_collator: turns a list of rows into a padded batch; default: TRL's
            `DataCollatorForLanguageModeling` (labels padded with -100).
        reference_without_adapter: take h_aligned from the model with its PEFT adapters disabled, for
            stage 2 where the alignment is merged into the base weights and the adapter is the new,
            fine-tuned one. The reference is then right even when training resumes from a checkpoint,
            whose weights are loaded before `on_train_begin`.
        aligned_model: with `reference_without_adapter`, a function of the model giving the context in which it
            is the aligned model (default: `model.disable_adapter()`; stage 2 over a 4-bit base keeps the
            alignment adapter active there, `unmerged_alignment.aligned_only`).

    With `reference_without_adapter`, h_aligned is computed again at each measurement, batch by batch, with
    the adapter disabled, and reduced on the model's device: nothing grows with the rows, and host memory holds
    only per-token scalars (at 70B, a cache would take about 40 GB a process). Otherwise h_aligned is cached
    when training begins (or by calling `cache_reference(model)` earlier), on the CPU in fp32: about rows x
    tokens x layers x hidden x 4 bytes. The passes run in eval mode under `no_grad`, and the model's
    train/eval mode is restored after.

    Values are added to the Trainer's logs in `on_log`, so they are kept in `state.log_history`; the
    `report_to` integrations see them when this callback runs before them: add it with
    `callback.attach(trainer)` rather than `trainer.add_callback(callback)`.
    """

    def __init__(
        self,
        dataset,
        *,
        target: str = "layer",
        layers: str | Sequence[int] | None = None,
        modules: str | Sequence[str] | None = None,
        batch_size: int = 8,
        data_collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
        reference_without_adapter: bool = False,
        aligned_model: Callable[[nn.Module], Any] | None = None,
    ):
        if target not in ("layer", "attention"):
            raise ValueError(f"target must be 'layer' or 'attention', got {target!r}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        rows = [dict(row) for row in dataset]
        if not rows:
            raise ValueError("The alignment dataset for the drift is empty: pass at least one tokenized row.")
        if "input_ids" not in rows[0]:
            raise ValueError(
                f"The alignment dataset must be tokenized (an 'input_ids' column); got columns {sorted(rows[0])}. "
                "Tokenize it first, or pass it to AlignedSFTTrainer(alignment_dataset=...), which does."
            )
        keep = ("input_ids", "attention_mask", "labels")
        self.rows = [{k: row[k] for k in keep if k in row} for row in rows]
        self.target, self.layers, self.modules = target, layers, modules
        self.batch_size = batch_size
        self.data_collator = data_collator
        self.reference_without_adapter = reference_without_adapter
        # With reference_without_adapter: the context in which the model is the aligned one (default: its adapter
        # disabled; stage 2 over a 4-bit base keeps the alignment adapter active, see unmerged_alignment).
        self.aligned_model = aligned_model or (lambda model: model.disable_adapter())
        self.reference: list[torch.Tensor] | None = None  # cached mode, per batch: [valid tokens, layers, hidden]
        self.ready = False  # a reference is there (cached) or can be recomputed (reference_without_adapter)
        self.reference_energy: float | None = None  # sum ||h_aligned||^2 over this rank's batches (cached mode)
        self.reference_token_energy: list[torch.Tensor] | None = None  # per batch: [valid tokens, layers]
        self.history: list[dict[str, float]] = []
        self._last: tuple[int, dict[str, float]] | None = None

    def attach(self, trainer) -> AlignmentDriftCallback:
        """Add this callback first in `trainer`'s list, so `report_to` integrations see its values."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    @torch.no_grad()
    def cache_reference(self, model: nn.Module) -> None:
        """Record h_aligned: the hidden states of `model` as it is now (call before fine-tuning), or of its
        base weights with `reference_without_adapter`."""
        if self.reference_without_adapter and not hasattr(model, "disable_adapter"):
            raise ValueError("reference_without_adapter needs a PEFT model (one with `disable_adapter`), got "
                             f"{type(model).__name__}.")
        self.ready, self._last = True, None
        if self.reference_without_adapter:
            return  # recomputed at each measurement: the base weights do not change
        self.reference = [torch.stack([h.float().cpu() for h in hidden], dim=1)
                          for hidden, _, _, _ in self._passes(model, self._my_rows())]
        self._idle_rounds(model, reference_pass=False)
        self.reference_token_energy = [hidden.double().pow(2).sum(-1) for hidden in self.reference]
        self.reference_energy = sum(energy.sum().item() for energy in self.reference_token_energy)

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, float]:
        """Drift (absolute, and as a fraction of the reference's energy) and alignment loss of `model` now."""
        if not self.ready:
            raise RuntimeError("No reference hidden states: call cache_reference(model) before fine-tuning.")
        device = next(model.parameters()).device
        drift = torch.zeros((), dtype=torch.float64, device=device)
        drift_after_first = torch.zeros((), dtype=torch.float64, device=device)
        reference_energy = torch.zeros((), dtype=torch.float64, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        loss_tokens = 0
        token_drifts = []
        for hidden, batch_loss, tokens, first, reference, energy in self._against_reference(model):
            moved = torch.stack([(h.float() - r.float()).double().pow(2).sum(-1)
                                 for h, r in zip(hidden, reference)], dim=1)  # [valid tokens, layers]
            drift += moved.sum()
            drift_after_first += moved[~first].sum()
            reference_energy += energy.sum()
            token_drifts.append((moved / energy.where(energy > 0, torch.nan)).flatten().cpu())  # scalars per token
            loss_sum += batch_loss
            loss_tokens += tokens
        self._idle_rounds(model, reference_pass=self.reference_without_adapter)
        # Every rank measured its own batches: the sums add up, the per-token values are pooled for the median.
        totals = torch.stack([drift, drift_after_first, reference_energy, loss_sum,
                              torch.tensor(float(loss_tokens), dtype=torch.float64, device=device)])
        token_values = torch.cat(token_drifts) if token_drifts else torch.empty(0, dtype=torch.float64)
        world, _ = _world()
        if world > 1:
            torch.distributed.all_reduce(totals)
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, token_values)
            token_values = torch.cat(gathered)
        drift, drift_after_first, reference_energy, loss_sum, loss_tokens = totals.tolist()
        loss = loss_sum / loss_tokens if loss_tokens else float("nan")
        fraction = drift / reference_energy if reference_energy else float("nan")
        return {DRIFT_KEY: drift, DRIFT_FRACTION_KEY: fraction, MEDIAN_TOKEN_DRIFT_KEY: _median(token_values),
                DRIFT_EXCLUDING_FIRST_TOKEN_KEY: drift_after_first, LOSS_KEY: loss}

    def _my_batches(self) -> tuple[list[int], int]:
        """The starts of this rank's batches (batch i goes to rank i mod world size), and the number of forward
        rounds every rank must run: a sharded model (ZeRO-3, FSDP2) gathers its weights in each forward, a
        collective that every rank must join."""
        world, rank = _world()
        starts = list(range(0, len(self.rows), self.batch_size))
        return starts[rank::world], -(-len(starts) // world)

    def _my_rows(self) -> list[dict[str, Any]]:
        mine, _ = self._my_batches()
        return [row for start in mine for row in self.rows[start:start + self.batch_size]]

    def _idle_rounds(self, model: nn.Module, reference_pass: bool) -> None:
        """Forwards whose results are dropped, so a rank with fewer batches joins every collective of the others:
        the same passes as a real batch (the reference with the adapter disabled first, where it is recomputed),
        since a sharded model gathers different weights with and without its adapter."""
        mine, rounds = self._my_batches()
        for _ in range(rounds - len(mine)):
            if reference_pass:
                with self.aligned_model(model):
                    for _ in self._passes(model, self.rows[:1]):
                        pass
            for _ in self._passes(model, self.rows[:1]):
                pass

    def collate(self, rows: list[dict[str, Any]], model: nn.Module) -> dict[str, torch.Tensor]:
        """Drift rows batched as the measurement batches them (the trainer's collator, or TRL's)."""
        if self.data_collator is None:
            from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

            pad = getattr(getattr(model, "config", None), "pad_token_id", None)
            self.data_collator = DataCollatorForLanguageModeling(pad_token_id=pad if isinstance(pad, int) else 0)
        return self.data_collator(rows)

    def _against_reference(self, model: nn.Module):
        """Per batch: what `_passes` yields, then the reference's hidden states of the same tokens (a list per
        layer) and their squared norms [valid tokens, layers] -- recomputed with the adapter disabled, or cached."""
        if not self.reference_without_adapter:
            for (hidden, *rest), reference, energy in zip(self._passes(model, self._my_rows()), self.reference,
                                                          self.reference_token_energy, strict=True):
                yield (hidden, *rest, reference.to(hidden[0].device).unbind(1), energy.to(hidden[0].device))
            return
        for start in self._my_batches()[0]:
            rows = self.rows[start:start + self.batch_size]
            with self.aligned_model(model):
                (reference, *_), = self._passes(model, rows)
            energy = torch.stack([r.float().double().pow(2).sum(-1) for r in reference], dim=1)
            (current,) = self._passes(model, rows)
            yield (*current, reference, energy)

    def _passes(self, model: nn.Module, rows: list[dict[str, Any]] | None = None):
        """Yield (hidden states of valid tokens, a list per layer on the model's device, summed token loss,
        loss tokens, which valid tokens open their row) per batch of `rows` (default: all of them)."""
        modules = [module for _, module in find_vaccine_modules(model, self.target, self.layers, self.modules)]
        device = next(model.parameters()).device
        was_training = model.training
        captured: list[torch.Tensor | None] = [None] * len(modules)

        def hook(index):
            def store(module, args, output):
                captured[index] = hidden_output(output)
            return store

        rows = self.rows if rows is None else rows
        handles = [module.register_forward_hook(hook(i)) for i, module in enumerate(modules)]
        model.eval()
        try:
            for start in range(0, len(rows), self.batch_size):
                batch = self.collate(rows[start : start + self.batch_size], model)
                input_ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
                labels = batch.get("labels")
                labels = input_ids.masked_fill(mask == 0, -100) if labels is None else labels.to(device)
                captured[:] = [None] * len(modules)
                logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
                missing = [i for i, h in enumerate(captured) if h is None]
                if missing:
                    raise RuntimeError(f"Drift hooks on modules {missing} did not run; check `target`/`modules`.")
                valid = mask.bool()
                hidden = [h[valid] for h in captured]
                captured[:] = [None] * len(modules)
                shift_labels = labels[:, 1:]
                token_loss = nn.functional.cross_entropy(
                    logits[:, :-1].float().flatten(0, 1), shift_labels.flatten(), ignore_index=-100, reduction="sum"
                )
                first = valid & (valid.cumsum(dim=1) == 1)  # whatever side the padding is on
                yield hidden, token_loss.double(), int((shift_labels != -100).sum()), first[valid]
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)

    def _values(self, model: nn.Module, step: int) -> dict[str, float]:
        if self._last is None or self._last[0] != step:
            values = self.measure(model)
            self._last = (step, values)
            self.history.append({"step": step, **values})
        return self._last[1]

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = kwargs["model"]
        if not self.ready:
            self.cache_reference(model)
        values = self._values(model, state.global_step)
        state.log_history.append({**values, "step": state.global_step})
        logger.info(f"Alignment drift at step {state.global_step}: {values}")

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if logs is None or not self.ready or "train_runtime" in logs:
            return
        values = self._values(kwargs["model"], state.global_step)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)  # Trainer.log appended a copy of `logs` before calling us


def _world() -> tuple[int, int]:
    """(world size, rank) of the running distributed job; (1, 0) in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _median(values: torch.Tensor) -> float:
    """Median of the non-NaN values, the middle two averaged (numpy's; `torch.nanmedian` takes the lower one
    and `torch.quantile` stops at 2^24 values)."""
    present = values[~values.isnan()]
    return float(np.median(present.numpy())) if len(present) else float("nan")


__all__ = ["AlignmentDriftCallback", "DRIFT_FRACTION_KEY", "DRIFT_KEY", "LOSS_KEY", "MEDIAN_TOKEN_DRIFT_KEY"]
