"""Start-up checks for running Vaccine under the Trainer's distributed backends.

Vaccine's pass 1 takes `torch.autograd.grad` of the loss with respect to hidden states: no parameter
gradient exists, so no backend (DDP, FSDP, DeepSpeed) has anything to communicate, and pass 2 is the
Trainer's own synchronised step. Two things need care, and both are decided before training starts
rather than discovered mid-run:

* Reentrant activation checkpointing rejects `autograd.grad`, so pass 1 falls back to a full
  `backward()` whose parameter gradients are stashed and restored. That only works where the
  gradients stay in `p.grad`: DeepSpeed's gradient hooks reduce them into its own buffers as they
  are produced (ZeRO-2/3, `overlap_comm`, bf16 immediate updates) and FSDP accumulates into its
  flat/sharded buffers, so pass 1 would leak into the update. Those combinations are refused.
* Under DDP, the Trainer asks DDP to find unused parameters for models that are not a
  `PreTrainedModel` (PEFT), which reentrant checkpointing breaks ("marked ready twice", the plain
  Trainer too). When the user did not choose, it is switched off here.
"""

from __future__ import annotations

from typing import Any

from accelerate.utils import DistributedType
from transformers.utils import logging

from .checkpointing import setting
from .perturbation import uses_reentrant_checkpointing

logger = logging.get_logger(__name__)

_DOCS = "`--accelerate_config multi_gpu|fsdp2|zero2|zero3` on `vaccine-trainer align` and `finetune`"


def describe_backend(trainer: Any) -> str:
    """The data-parallel backend the Trainer's accelerator runs, in words (for logs and errors)."""
    state = trainer.accelerator.state
    if getattr(trainer, "is_deepspeed_enabled", False):
        return f"DeepSpeed ZeRO-{state.deepspeed_plugin.zero_stage}"
    if getattr(trainer, "is_fsdp_enabled", False):
        return f"FSDP{getattr(state.fsdp_plugin, 'fsdp_version', 1)}"
    if trainer.args.world_size > 1:
        return f"DDP ({trainer.args.world_size} processes, {state.backend})"
    return "single process"


def reentrant_checkpointing_requested(trainer: Any) -> bool:
    """True when pass 1 will run under reentrant activation checkpointing (the full-backward path).

    Decided from the arguments (the Trainer enables checkpointing only in `train()`) and from the
    model, which a user may have set up beforehand. A missing `use_reentrant` means reentrant: it
    is torch's default when the key is absent from the kwargs.
    """
    args = trainer.args
    if setting(args, default=False):  # the Trainer (re-)enables checkpointing with these kwargs
        kwargs = setting(args, "_kwargs")
        # None: transformers' own default, {"use_reentrant": False}
        return kwargs is not None and kwargs.get("use_reentrant") is not False
    return uses_reentrant_checkpointing(trainer.model, training_only=False)


def check_distributed_support(trainer: Any) -> None:
    """Refuse, at start-up, backend combinations that Vaccine cannot run correctly; adjust the rest.

    Call once from the trainer's `__init__`, after `Trainer.__init__` created the accelerator and
    after `trainer.vaccine_args` is set. Raises `ValueError` with what to change instead.
    """
    _refuse_batch_splitting(trainer)
    settings = trainer.vaccine_args
    two_pass = settings.rho > 0 and settings.vaccine_perturbation == "gradient"
    backend = describe_backend(trainer)
    logger.info(f"Vaccine runs under {backend}.")
    if two_pass and backend == "FSDP1":
        raise ValueError(
            "Vaccine supports FSDP2 (`fully_shard`), not FSDP1: accelerate runs FSDP1 only on GPUs, so Vaccine's "
            "pass 1 has never been verified under it, and FSDP1 is deprecated. Set `fsdp_version: 2` in the "
            "accelerate config (`--accelerate_config fsdp2`) or `fsdp_config={'version': 2}` in the training "
            "arguments."
        )
    if two_pass and reentrant_checkpointing_requested(trainer):
        _check_reentrant_checkpointing(trainer, backend)


def _refuse_batch_splitting(trainer: Any) -> None:
    """DataParallel, context and sequence parallelism split the batch differently in the two passes."""
    args = trainer.args
    if args.n_gpu > 1:
        raise ValueError(
            f"Vaccine does not support torch.nn.DataParallel ({args.n_gpu} GPUs in one process): it splits "
            "the batch differently in the two passes. Launch one process per GPU instead: "
            f"`accelerate launch --num_processes N your_script.py ...` (see {_DOCS})."
        )
    for size_of, what in (("get_cp_size", "context"), ("get_sp_size", "sequence")):
        size = getattr(trainer, size_of, lambda: 1)()
        if isinstance(size, int) and size > 1:
            raise ValueError(
                f"Vaccine does not support {what} parallelism ({what} size {size}): it reshards the batch "
                "between the two passes. Use data parallelism (DDP, FSDP or DeepSpeed) through "
                f"`accelerate launch` (see {_DOCS})."
            )


def _check_reentrant_checkpointing(trainer: Any, backend: str) -> None:
    """Reentrant checkpointing makes pass 1 a full backward(): refused where the backend takes gradients as they
    are produced (DeepSpeed, FSDP); under DDP, DDP must not look for unused parameters."""
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        trl_hint = (
            " TRL forces `use_reentrant=True` for PEFT models under ZeRO-3, so with a TRL trainer use FSDP2 "
            "(`--accelerate_config fsdp2`) or turn activation checkpointing off."
            if getattr(trainer, "is_deepspeed_enabled", False)
            else ""
        )
        raise ValueError(
            f"Vaccine cannot use reentrant activation checkpointing under {backend}: reentrant checkpointing "
            "rejects torch.autograd.grad, so pass 1 would need a full backward(), and this backend moves "
            "parameter gradients into its own buffers (and communicates them) as they are produced, so the "
            "clean pass-1 gradient would leak into the update. Use non-reentrant checkpointing "
            "(`activation_checkpointing_kwargs={'use_reentrant': False}`, transformers' default; with FSDP, "
            f"`fsdp_activation_checkpointing: true` is non-reentrant too) or turn checkpointing off.{trl_hint}"
        )
    args = trainer.args
    if trainer.accelerator.distributed_type == DistributedType.NO or args.world_size <= 1:
        return
    handler = getattr(trainer.accelerator, "ddp_handler", None)
    if handler is None or not handler.find_unused_parameters:
        return
    if args.ddp_find_unused_parameters:
        raise ValueError(
            "Reentrant activation checkpointing under DDP cannot run with `ddp_find_unused_parameters=True` "
            "(DDP then marks checkpointed parameters ready twice). Set `ddp_find_unused_parameters=False` or "
            "use non-reentrant checkpointing (`activation_checkpointing_kwargs={'use_reentrant': False}`)."
        )
    handler.find_unused_parameters = False
    logger.warning(
        "Vaccine: reentrant activation checkpointing under DDP; setting DDP's find_unused_parameters=False "
        "(the Trainer picks True for models that are not a PreTrainedModel, e.g. PEFT, which reentrant "
        "checkpointing breaks). Pass `ddp_find_unused_parameters=False` to silence this."
    )


def check_layer_sampling_support(trainer: Any) -> None:
    """T-Vaccine changes which parameters train every few steps: allowed where the backend copes with that.

    DDP does when it looks for unused parameters: a layer frozen on every process is then "globally
    unused" and DDP leaves its `.grad` untouched (None), so the optimizer skips it. FSDP and DeepSpeed fix
    the trained parameters when they wrap the model (flat, sharded gradient buffers), so they are refused.
    """
    if not trainer.vaccine_args.vaccine_layer_sampling:
        return
    backend = describe_backend(trainer)
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError(
            f"T-Vaccine (vaccine_layer_sampling) cannot run under {backend}: it freezes and unfreezes layers "
            "during training, and this backend fixes the parameters it trains (and their sharded gradient "
            "buffers) when it wraps the model. Run it on one process or under DDP (`accelerate launch "
            f"--num_processes N`, `--accelerate_config multi_gpu`), or use plain Vaccine under {backend}.")
    if trainer.accelerator.distributed_type == DistributedType.NO or trainer.args.world_size <= 1:
        return
    if reentrant_checkpointing_requested(trainer):
        raise ValueError(
            "T-Vaccine under DDP needs DDP to find unused parameters (the frozen layers), which reentrant "
            "activation checkpointing breaks: use non-reentrant checkpointing "
            "(`activation_checkpointing_kwargs={'use_reentrant': False}`) or turn checkpointing off.")
    if trainer.args.ddp_find_unused_parameters is False:
        raise ValueError(
            "T-Vaccine under DDP needs `ddp_find_unused_parameters=True`: the frozen layers produce no gradient, "
            "and without it DDP waits for them. Leave the flag unset or set it to True.")
    handler = getattr(trainer.accelerator, "ddp_handler", None)
    if handler is not None and not handler.find_unused_parameters:
        handler.find_unused_parameters = True
        logger.info("T-Vaccine: DDP looks for unused parameters (the layers frozen until the next draw).")


__all__ = [
    "check_distributed_support", "check_layer_sampling_support", "describe_backend",
    "reentrant_checkpointing_requested",
]
