"""What the parent's `training_step` does for each backend, done alike in pass 1.

Pass 2 is the Trainer's own step, so the AMP loss scale, DeepSpeed's engine, gradient synchronisation and the token
averaging across processes are the Trainer's there. Pass 1 takes its own forward and backward, and must meet the
same conditions: the same precision and loss scale, no gradient reduced across processes, and figures logged on the
scale of one process's loss. Each function here takes the trainer and answers one of these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def pass_one_model(trainer: Any, model: nn.Module) -> nn.Module:
    """The module pass 1 runs through: never one whose backward reduces gradients.

    `DeepSpeedEngine.forward` registers backward hooks on its output that run the engine's gradient
    reduction after any backward from that loss, `autograd.grad` included (ZeRO-2 then crashes, ZeRO-3
    reduces stale buffers into the update). Its `.module` is the model itself: ZeRO-3's module hooks
    still gather the partitioned parameters in forward and in the partial backward, and no gradient
    hook fires because `autograd.grad` accumulates nothing into `.grad`.
    """
    if getattr(trainer, "is_deepspeed_enabled", False) and isinstance(getattr(model, "module", None), nn.Module):
        return model.module
    return model


def engine_autocast(trainer: Any) -> contextlib.AbstractContextManager:
    """DeepSpeed's `torch_autocast`: its engine's forward enters it, and pass 1 (through `.module`) must too,
    or the two passes run at different precisions."""
    if getattr(trainer, "is_deepspeed_enabled", False) and callable(getattr(trainer.model_wrapped, "module", None)):
        from deepspeed.runtime.torch_autocast import autocast_if_enabled

        return autocast_if_enabled(trainer.model_wrapped)
    return contextlib.nullcontext()


def process_factor(trainer: Any, num_items_in_batch: torch.Tensor | int | None) -> float:
    """The factor `Trainer.compute_loss` multiplies the loss by under `average_tokens_across_devices`."""
    if (trainer.args.average_tokens_across_devices and num_items_in_batch is not None
            and (trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None)):
        tp_size = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
        return float(max(trainer.accelerator.num_processes // tp_size, 1))
    return 1.0


def loss_scale(trainer: Any) -> float | None:
    """The loss scale pass 2's backward uses (fp16), for pass 1 too; None where no loss scaling runs.

    fp16 gradients of hidden states underflow like weight gradients. The Trainer's own AMP keeps the scale in
    the accelerator's `GradScaler`; DeepSpeed scales fp16 losses itself, and every fp16 optimizer it builds
    (ZeRO-1/2/3 and the non-ZeRO fused and unfused ones) exposes the scale in use as `loss_scale`.
    """
    engine = trainer.model_wrapped if getattr(trainer, "is_deepspeed_enabled", False) else None
    # DeepSpeed's `torch_autocast` in fp16 without ZeRO scales with a GradScaler of its own engine.
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None) or getattr(trainer.accelerator, "scaler", None)
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


def logged_loss(trainer: Any, loss: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """Pass 1's loss normalised as `Trainer.training_step` normalises the loss it logs, so that
    `vaccine/clean_loss` is comparable to `loss`."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)  # transformers < 5.2x has no such attribute
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            trainer.compute_loss_func is not None
        )
    if not scaled:
        loss = loss / getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)
    # Each micro-batch's share of its window times the window's length: the scale of the logged loss.
    return loss.float().mean() * trainer.args.gradient_accumulation_steps


def pass_one_without_sync(trainer: Any, model: nn.Module) -> contextlib.AbstractContextManager:
    """The context pass 1 runs in so that the backend synchronises no gradient, whatever pass 1 crosses.

    * DDP: `no_sync`, which the reentrant-checkpointing fallback (a full `backward()`) needs.
    * FSDP2: every group's post-backward hook that the partial backward crosses would reduce-scatter the
      gradients accumulated by earlier micro-batches of the window, i.e. sync early. Sync is paused, then set
      to what the Trainer chose for this micro-batch's pass 2: on for the window's last micro-batch (or with
      `sync_each_batch`), off inside its `no_sync` for the others.
    * DeepSpeed: nothing; pass 1 runs through the engine's module, whose backward reduces nothing.
    """
    if trainer.accelerator.is_fsdp2:
        plugin_kwargs = trainer.accelerator.gradient_state.plugin_kwargs
        return fsdp2_gradient_sync_paused(
            model, sync_after=trainer.accelerator.sync_gradients or plugin_kwargs.get("sync_each_batch", False))
    if getattr(trainer, "is_deepspeed_enabled", False):
        return contextlib.nullcontext()
    return trainer.accelerator.no_sync(model)


@contextlib.contextmanager
def fsdp2_gradient_sync_paused(model: nn.Module, sync_after: bool) -> Iterator[None]:
    """Turn off FSDP2's gradient reduction in every `fully_shard` module of `model`, then set it to `sync_after`.

    Through the public `FSDPModule.set_requires_gradient_sync` (torch >= 2.6), which has no getter: the caller
    says which state the next backward expects.
    """
    from torch.distributed.fsdp import FSDPModule

    sharded = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in sharded:
        module.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for module in sharded:
            module.set_requires_gradient_sync(sync_after, recurse=False)


__all__ = [
    "engine_autocast", "fsdp2_gradient_sync_paused", "logged_loss", "loss_scale", "pass_one_model",
    "pass_one_without_sync", "process_factor",
]
