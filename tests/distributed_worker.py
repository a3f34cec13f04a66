"""One rank of the 2-process DDP runs behind tests/test_distributed.py (launched with torchrun).

Every scenario trains a tiny model with `VaccineTrainer` under DDP (gloo, CPU) and saves, per rank:
the final trainable parameters, the micro-batches this rank trained on (so the test can build the
single-process run that sees the same micro-batches), and every gradient communication with the
phase it happened in (Vaccine's pass 1 or the Trainer's own step) and the optimizer step.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT_DIR [SCENARIO ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import tiny_lora_model, tiny_model, token_rows, training_args
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from transformers import TrainerCallback

from vaccine_trainer import VaccineTrainer, VaccineTrainingArguments
from vaccine_trainer.perturbation import uses_reentrant_checkpointing

RHO = 2.0
PER_DEVICE_BATCH = 2
WORLD_SIZE = 2

# name: (model kind, gradient accumulation, optimizer steps, extra training arguments)
SCENARIOS = {
    "full_ga1": ("full", 1, 3, {}),
    "lora_ga2": ("lora", 2, 2, {}),
    # The fallback path: a full backward() in pass 1 under DDP's no_sync. The Trainer asks DDP to find unused
    # parameters for PEFT models, which reentrant checkpointing breaks; check_distributed_support turns it off.
    "lora_ga2_reentrant": (
        "lora", 2, 2, {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": True}},
    ),
}
# Negative control for the communication counter: pass 1 also runs the official code's synced backward.
CONTROL_SCENARIOS = {"leaky_pass_one": ("lora", 1, 2, {})}
ALL_SCENARIOS = {**SCENARIOS, **CONTROL_SCENARIOS}


def scenario_rows(name: str) -> list[dict[str, list[int]]]:
    """Rows with some labels masked, so ranks and micro-batches count different numbers of tokens.

    Unequal token counts make the loss normalisation (`num_items_in_batch` summed over the ranks
    and the accumulation window, `average_tokens_across_devices`) matter for the comparison.
    """
    _, accumulation, steps, _ = ALL_SCENARIOS[name]
    rows = token_rows(PER_DEVICE_BATCH * WORLD_SIZE * accumulation * steps, length=12, seed=1)
    for index, row in enumerate(rows):
        masked = index % 5  # 0..4 leading positions excluded from the loss
        row["labels"] = [-100] * masked + row["labels"][masked:]
    return rows


def scenario_model(name: str):
    kind = ALL_SCENARIOS[name][0]
    return tiny_lora_model("llama", seed=0) if kind == "lora" else tiny_model("llama", seed=0)


def scenario_arguments(name: str, output_dir, world_size: int, rho: float = RHO) -> VaccineTrainingArguments:
    """Arguments for one rank of `world_size`; the single-process twin accumulates over all ranks."""
    _, accumulation, steps, extra = ALL_SCENARIOS[name]
    return VaccineTrainingArguments(
        **training_args(
            output_dir, per_device_train_batch_size=PER_DEVICE_BATCH, max_steps=steps,
            gradient_accumulation_steps=accumulation * (WORLD_SIZE // world_size), **extra,
        ),
        rho=rho,
    )


class CommunicationLog(TrainerCallback):
    """Counts DDP gradient all-reduces through a comm hook on the wrapped model, by phase and step."""

    def __init__(self, trainer: RecordingTrainer):
        self.trainer = trainer
        self.calls: list[tuple[int, str, int]] = []  # (optimizer step, phase, bucket index)
        self.python_all_reduces: list[tuple[int, str]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if not isinstance(wrapped, DistributedDataParallel):
            raise RuntimeError(f"expected the Trainer to wrap the model in DDP, got {type(wrapped).__name__}")
        wrapped.register_comm_hook(None, self._hook)

    def _hook(self, process_group, bucket):
        self.calls.append((self.trainer.state.global_step, self.trainer.phase, bucket.index()))
        return default_hooks.allreduce_hook(process_group, bucket)


class RecordingTrainer(VaccineTrainer):
    """VaccineTrainer that records its micro-batches and which pass is running."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.phase = "outside"
        self.micro_batches: list[dict[str, torch.Tensor]] = []
        self.reentrant_seen: list[bool] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.micro_batches.append({k: inputs[k].detach().cpu().clone() for k in ("input_ids", "labels")})
        self.phase = "step"
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self.phase = "outside"

    def _vaccine_pass_one(self, model, inputs, num_items_in_batch):
        self.phase = "pass1"
        model.train()  # as pass 1 does first; checkpointing only applies in training mode
        self.reentrant_seen.append(uses_reentrant_checkpointing(model))
        try:
            return super()._vaccine_pass_one(model, inputs, num_items_in_batch)
        finally:
            self.phase = "step"


class LeakyTrainer(RecordingTrainer):
    """Pass 1 followed by a synchronised backward of the clean loss, as the paper's code does."""

    def _vaccine_pass_one(self, model, inputs, num_items_in_batch):
        result = super()._vaccine_pass_one(model, inputs, num_items_in_batch)
        self.phase = "pass1"
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, self._prepare_inputs(dict(inputs)), num_items_in_batch=num_items_in_batch)
        self.accelerator.backward(loss)
        model.zero_grad()
        self.phase = "step"
        return result


_ORIGINAL_ALL_REDUCE = dist.all_reduce


def count_python_all_reduce(log: CommunicationLog) -> None:
    """Also record any `torch.distributed.all_reduce` issued from Python (e.g. by a library hook)."""
    original = _ORIGINAL_ALL_REDUCE

    def counting_all_reduce(*args, **kwargs):
        log.python_all_reduces.append((log.trainer.state.global_step, log.trainer.phase))
        return original(*args, **kwargs)

    dist.all_reduce = counting_all_reduce


def run(name: str, out_dir: Path) -> None:
    model = scenario_model(name)
    args = scenario_arguments(name, out_dir / f"{name}_run", WORLD_SIZE)
    trainer_class = LeakyTrainer if name in CONTROL_SCENARIOS else RecordingTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=scenario_rows(name))
    log = CommunicationLog(trainer)
    trainer.add_callback(log)
    count_python_all_reduce(log)
    trainer.train()
    torch.save(
        {
            "world_size": dist.get_world_size(),
            "distributed_type": str(trainer.accelerator.distributed_type),
            "backend": dist.get_backend(),
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad},
            "micro_batches": trainer.micro_batches,
            "comm_calls": log.calls,
            "python_all_reduces": log.python_all_reduces,
            "global_step": trainer.state.global_step,
            "reentrant_checkpointing": all(trainer.reentrant_seen) and bool(trainer.reentrant_seen),
            "find_unused_parameters": trainer.model_wrapped.find_unused_parameters,
        },
        out_dir / f"{name}_rank{trainer.args.process_index}.pt",
    )


def main() -> None:
    torch.set_num_threads(1)  # two ranks share the CI machine's cores
    out_dir = Path(sys.argv[1])
    names = sys.argv[2:] or list(ALL_SCENARIOS)
    for name in names:
        run(name, out_dir)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
