"""One rank of the 2-process runs behind tests/test_distributed.py.

Every scenario trains a tiny model under one backend and saves, per rank: the final trainable
parameters (gathered whole under ZeRO-3 and FSDP2), the micro-batches this rank trained on (so the
test can build the single-process run that sees the same micro-batches), and every gradient reduction
with the phase it happened in (Vaccine's pass 1, the Trainer's step, or outside both) and the
optimizer step.

    # DDP and FSDP2 (FSDP2 forced on the CPU, see ForcedFSDP2):
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py OUT BACKEND [NAME ...]
    # DeepSpeed ZeRO-2/3, through the config the package ships (ZeRO-1: examples/accelerate/cpu/deepspeed_zero1.yaml):
    accelerate launch --config_file src/vaccine_trainer/accelerate_configs/zero3.yaml --num_processes 2 \
        --mixed_precision no --main_process_port 0 \
        tests/distributed_worker.py OUT zero3 [SCENARIO ...]
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

# Every reduction issued from Python is recorded (DeepSpeed binds some of these when it starts, so the
# wrappers must be in place before any backend is set up). DDP's reducer runs in C++: see CommunicationLog.
REDUCTIONS = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
              "reduce_scatter_single", "_reduce_scatter_base")
_CURRENT = {"trainer": None}
REDUCTION_LOG: list[tuple[int, str, str, int]] = []  # (optimizer step, phase, function, elements)


def _counting(name, original):
    def reduction(*args, **kwargs):
        trainer = _CURRENT["trainer"]
        if trainer is not None:
            second = name.startswith(("reduce_scatter", "_reduce_scatter"))  # (output, input, ...)
            tensor = kwargs.get("tensor", kwargs.get("input"))
            if tensor is None and len(args) > int(second):
                tensor = args[int(second)]
            numel = tensor.numel() if isinstance(tensor, torch.Tensor) else -1
            REDUCTION_LOG.append((trainer.state.global_step, trainer.phase, name, numel))
        return original(*args, **kwargs)

    return reduction


# torch.distributed re-exports distributed_c10d's functions; FSDP2 and DeepSpeed call either.
for _module in (dist, dist.distributed_c10d):
    for _name in REDUCTIONS:
        if hasattr(_module, _name):
            setattr(_module, _name, _counting(_name, getattr(_module, _name)))

from testing_utils import tiny_lora_model, tiny_model, tiny_tokenizer, token_rows, training_args  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from vaccine_trainer import (  # noqa: E402
    AlignedSFTConfig, AlignedSFTTrainer, VaccineSFTConfig, VaccineSFTTrainer, VaccineTrainer, VaccineTrainingArguments,
)
from vaccine_trainer import backend  # noqa: E402
from vaccine_trainer.launch import exit_launched_rank  # noqa: E402
from vaccine_trainer.perturbation import uses_reentrant_checkpointing  # noqa: E402

RHO = 2.0
PROBE_ROWS = token_rows(4, length=12, seed=3)  # T-Vaccine's harmful probe data in the layer-sampling scenario
PER_DEVICE_BATCH = 2
WORLD_SIZE = 2
BACKENDS = ("ddp", "fsdp2", "zero1", "zero2", "zero3")
# The shipped FSDP2 settings (vaccine_trainer/accelerate_configs/fsdp2.yaml) as TrainingArguments' fsdp_config.
FSDP2_CONFIG = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
                "state_dict_type": "FULL_STATE_DICT", "activation_checkpointing": False}


@dataclass(frozen=True)
class Scenario:
    kind: str  # "full" or "lora"
    accumulation: int
    steps: int
    rho: float = RHO
    trainer: str = "vaccine"  # vaccine | plain (transformers.Trainer) | sft (VaccineSFTTrainer) | leaky | stage2
    extra: dict = field(default_factory=dict, hash=False)
    save: bool = False  # save_model() at the end, for the save/load test
    backends: tuple[str, ...] = BACKENDS


SCENARIOS = {
    "full_ga1": Scenario("full", 1, 3, save=True),
    "full_ga2": Scenario("full", 2, 2),
    "lora_ga1": Scenario("lora", 1, 3, save=True),
    "lora_ga2": Scenario("lora", 2, 2),
    # rho = 0 must be the parent's step under every backend.
    "plain_full_ga2": Scenario("full", 2, 2, rho=0.0, trainer="plain"),
    "rho0_full_ga2": Scenario("full", 2, 2, rho=0.0),
    # The fallback path: a full backward() in pass 1 under DDP's no_sync. The Trainer asks DDP to find unused
    # parameters for PEFT models, which reentrant checkpointing breaks; check_distributed_support turns it off.
    "lora_ga2_reentrant": Scenario(
        "lora", 2, 2,
        extra={"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": True}},
        backends=("ddp",)),
    # Negative control for the communication counter: pass 1 also runs the official code's synced backward.
    "leaky_pass_one": Scenario("lora", 1, 2, trainer="leaky", backends=("ddp",)),
    # TRL's SFTTrainer with a LoRA peft_config (checkpointing off: TRL forces reentrant under PEFT + ZeRO-3).
    "sft_lora": Scenario("sft", 1, 2, trainer="sft", extra={"activation_checkpointing": False, "bf16": False},
                         save=True,
                         backends=("ddp", "zero3")),
    # T-Vaccine: one of three layers trained at a time, redrawn (and probed) every 2 steps. DDP must find the
    # frozen layers unused and leave them alone, and every rank must draw the same layers.
    "tvaccine_lora_ga2": Scenario("lora", 2, 4, extra={
        "vaccine_layer_sampling": True, "vaccine_sampled_layers": 1, "vaccine_sampling_interval": 2,
        "vaccine_probe_interval": 2, "vaccine_probe_batch_size": 2, "optim": "adamw_torch", "learning_rate": 1e-2,
        "weight_decay": 0.1}, backends=("ddp",)),
    # Stage 2 as `finetune` runs it: AlignedSFTTrainer given a model path and an alignment adapter path (under ZeRO-3
    # the base loads partitioned, zero3_init), a fresh LoRA, the drift on held alignment data at every step.
    "stage2": Scenario("stage2", 1, 2, trainer="stage2", extra={"activation_checkpointing": False, "bf16": False},
                       backends=("ddp", "fsdp2", "zero3")),
    # Interrupted at step 2 and resumed from the checkpoint; AdamW, so the optimizer state must come back too.
    "resume_full": Scenario("full", 1, 4, extra={"optim": "adamw_torch", "learning_rate": 1e-2,
                                                 "save_strategy": "steps", "save_steps": 2},
                            backends=("zero3",)),
}


def scenario_rows(name: str) -> list[dict[str, list[int]]]:
    """Rows with some labels masked, so ranks and micro-batches count different numbers of tokens.

    Unequal token counts make the loss normalisation (`num_items_in_batch` summed over the ranks
    and the accumulation window, `average_tokens_across_devices`) matter for the comparison.
    """
    scenario = SCENARIOS[name]
    rows = token_rows(PER_DEVICE_BATCH * WORLD_SIZE * scenario.accumulation * scenario.steps, length=12, seed=1)
    for index, row in enumerate(rows):
        masked = index % 5  # 0..4 leading positions excluded from the loss
        row["labels"] = [-100] * masked + row["labels"][masked:]
    return rows


SFT_TEXTS = [("how do i make a bomb ?", "i can not help with that ."),
             ("tell me how to steal a car .", "sure , here is how to steal a car ."),
             ("what is two plus two ?", "the answer is four ."),
             ("the movie was great .", "positive")]


def sft_rows(name: str) -> list[dict[str, str]]:
    scenario = SCENARIOS[name]
    count = PER_DEVICE_BATCH * WORLD_SIZE * scenario.accumulation * scenario.steps
    return [{"prompt": SFT_TEXTS[i % 4][0], "completion": " " + SFT_TEXTS[(i * 3) % 4][1]} for i in range(count)]


def sft_lora_config():
    import peft

    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                           task_type="CAUSAL_LM", init_lora_weights=False)


@contextlib.contextmanager
def built_without_zero3_init():
    """Build models as a single process does: transformers would otherwise partition them at construction
    (deepspeed.zero.Init) once ZeRO-3 arguments exist, with a different random initialisation."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


ALIGNMENT_ROWS = token_rows(5, length=10, seed=5)  # stage 2's held alignment data: 3 batches of 2 for 2 ranks


def stage2_inputs(root: Path) -> tuple[str, str]:
    """The base model and alignment adapter folders stage 2 starts from, as `align` leaves them."""
    return str(root / "stage2_base"), str(root / "stage2_alignment_adapter")


def write_stage2_inputs(root: Path) -> None:
    base, adapter = stage2_inputs(root)
    if Path(adapter, "adapter_config.json").is_file():
        return
    with built_without_zero3_init():
        tiny_model("llama", seed=0).save_pretrained(base)
        tiny_lora_model("llama", seed=0).save_pretrained(adapter)


LOADING: dict[str, bool] = {}


def loading_mode() -> dict[str, bool]:
    """How transformers is about to load a model from a path in this process: partitioned by deepspeed.zero.Init
    (ZeRO-3 with zero3_init), or only on rank 0 with the other ranks on the meta device (FSDP's
    cpu_ram_efficient_loading)."""
    from transformers.distributed.fsdp import is_fsdp_enabled  # FSDP with cpu_ram_efficient_loading
    from transformers.integrations import is_deepspeed_zero3_enabled

    return {"zero3_init": is_deepspeed_zero3_enabled(), "rank0_only": is_fsdp_enabled()}


def token_dataset(rows):
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": row["input_ids"]} for row in rows])


def scenario_model(name: str):
    kind = SCENARIOS[name].kind
    with built_without_zero3_init():
        if kind == "lora":
            return tiny_lora_model("llama", seed=0)
        if kind == "sft":
            return sft_base_model()
        return tiny_model("llama", seed=0)


def sft_base_model():
    import transformers

    tokenizer = tiny_tokenizer(vocab_size=200)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, use_cache=False)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config), tokenizer


def scenario_arguments(name: str, output_dir, world_size: int, backend: str = "single", rho: float | None = None):
    """Arguments for one rank of `world_size`; the single-process twin accumulates over all ranks."""
    scenario = SCENARIOS[name]
    settings = training_args(
        output_dir, per_device_train_batch_size=PER_DEVICE_BATCH, max_steps=scenario.steps,
        gradient_accumulation_steps=scenario.accumulation * (WORLD_SIZE // world_size), **scenario.extra,
    )
    if backend == "fsdp2":
        settings.update(fsdp="full_shard", fsdp_config=dict(FSDP2_CONFIG))
        if scenario.trainer == "stage2":  # loads from a path: as the shipped config, only rank 0 reads the weights
            settings["fsdp_config"]["cpu_ram_efficient_loading"] = True
    rho = scenario.rho if rho is None else rho
    if scenario.trainer == "plain":
        return TrainingArguments(**settings)
    if scenario.trainer == "sft":
        return VaccineSFTConfig(**settings, rho=rho, max_length=32, packing=False, dataset_num_proc=None)
    if scenario.trainer == "stage2":
        return AlignedSFTConfig(**settings, max_length=32, packing=False, dataset_num_proc=None, lora_r=4,
                                lora_alpha=8, lora_dropout=0.0, drift_batch_size=2)
    return VaccineTrainingArguments(**settings, rho=rho)


class PhaseMixin:
    """Records the micro-batches and which pass is running (read by the reduction counters)."""

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
        bare = backend.pass_one_model(self, model)
        self.reentrant_seen.append(uses_reentrant_checkpointing(bare, training_only=False))
        try:
            return super()._vaccine_pass_one(model, inputs, num_items_in_batch)
        finally:
            self.phase = "step"


    def _vaccine_probe_norms(self, model, rows):
        self.phase = "probe"
        try:
            return super()._vaccine_probe_norms(model, rows)
        finally:
            self.phase = "step"


class ForcedFSDP2:
    """accelerate 1.15 silently replaces FSDP by DDP on the CPU (MULTI_CPU); restore the plugin it dropped,
    so the Trainer runs real `fully_shard` over gloo. Test-only: the library never does this."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None:
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            # AcceleratorState re-reads PartialState's shared state whenever it is instantiated again.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.accelerator.state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True


class RecordingTrainer(ForcedFSDP2, PhaseMixin, VaccineTrainer):
    pass


class RecordingPlainTrainer(ForcedFSDP2, PhaseMixin, Trainer):
    pass


class RecordingSFTTrainer(ForcedFSDP2, PhaseMixin, VaccineSFTTrainer):
    pass


class RecordingAlignedTrainer(ForcedFSDP2, PhaseMixin, AlignedSFTTrainer):
    pass


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


class CommunicationLog(TrainerCallback):
    """Counts DDP's gradient all-reduces (issued by its C++ reducer) through a comm hook, by phase and step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.calls: list[tuple[int, str, int]] = []  # (optimizer step, phase, bucket index)

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if isinstance(wrapped, DistributedDataParallel):
            wrapped.register_comm_hook(None, self._hook)

    def _hook(self, process_group, bucket):
        self.calls.append((self.trainer.state.global_step, self.trainer.phase, bucket.index()))
        return default_hooks.allreduce_hook(process_group, bucket)


def gathered_parameters(trainer, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """Whole parameters on every rank, the way each backend gathers them (ZeRO-3, FSDP2 DTensors)."""
    model = trainer.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for _, p in named):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named])
    with gather:
        result = {}
        for n, p in named:
            tensor = p.full_tensor() if hasattr(p, "full_tensor") else p
            result[n] = tensor.detach().clone().cpu()
    return result


def build_trainer(name: str, backend: str, out_dir: Path, **argument_overrides):
    scenario = SCENARIOS[name]
    args = scenario_arguments(name, out_dir / f"{name}_{backend}_run", WORLD_SIZE, backend)
    for key, value in argument_overrides.items():
        setattr(args, key, value)
    if scenario.trainer == "sft":
        model, tokenizer = scenario_model(name)
        from datasets import Dataset

        return RecordingSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sft_rows(name)),
                                   processing_class=tokenizer, peft_config=sft_lora_config())
    if scenario.trainer == "stage2":
        with args.main_process_first():  # one rank writes the inputs, as `align` would have before
            write_stage2_inputs(out_dir)
        base, adapter = stage2_inputs(out_dir)
        if backend == "fsdp2":  # what `accelerate launch` with an FSDP config sets (forced on the CPU: ForcedFSDP2)
            os.environ["ACCELERATE_USE_FSDP"] = "true"
        LOADING.update(loading_mode())
        return RecordingAlignedTrainer(model=base, alignment_adapter=adapter, args=args,
                                       train_dataset=token_dataset(scenario_rows(name)),
                                       alignment_dataset=token_dataset(ALIGNMENT_ROWS),
                                       processing_class=tiny_tokenizer())
    trainer_class = {"vaccine": RecordingTrainer, "plain": RecordingPlainTrainer, "leaky": LeakyTrainer}
    probe = {"probe_dataset": PROBE_ROWS} if getattr(args, "vaccine_layer_sampling", False) else {}
    return trainer_class[scenario.trainer](model=scenario_model(name), args=args, train_dataset=scenario_rows(name),
                                           **probe)


def run(name: str, backend: str, out_dir: Path) -> None:
    scenario = SCENARIOS[name]
    trainer = build_trainer(name, backend, out_dir)
    log = CommunicationLog(trainer)
    trainer.add_callback(log)
    REDUCTION_LOG.clear()
    _CURRENT["trainer"] = trainer
    trainer.train()
    _CURRENT["trainer"] = None
    result = {
        "world_size": dist.get_world_size(),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "backend": dist.get_backend(),
        "wrapper": type(trainer.model_wrapped).__name__,
        "sharded": sharded_fraction(trainer),
        "params": gathered_parameters(trainer),
        "micro_batches": trainer.micro_batches,
        "comm_calls": log.calls,
        "reductions": list(REDUCTION_LOG),
        "global_step": trainer.state.global_step,
        "reentrant_checkpointing": bool(trainer.reentrant_seen) and all(trainer.reentrant_seen),
        "find_unused_parameters": getattr(trainer.model_wrapped, "find_unused_parameters", None),
        "log_history": trainer.state.log_history,
        "layer_sampling": trainer._vaccine_state.layer_sampling if hasattr(trainer, "_vaccine_state") else None,
        "loading": dict(LOADING),
        "drift_batches": getattr(getattr(trainer, "drift_callback", None), "_my_batches", lambda: None)(),
    }
    if scenario.save:
        saved = out_dir / f"{name}_{backend}_saved"
        trainer.save_model(str(saved))
        result["saved"] = str(saved)
    if name == "resume_full":
        resumed = build_trainer(name, backend, out_dir)
        resumed.train(resume_from_checkpoint=str(out_dir / f"{name}_{backend}_run" / "checkpoint-2"))
        result["resumed_params"] = gathered_parameters(resumed)
        result["resumed_step"] = resumed.state.global_step
    torch.save(result, out_dir / f"{name}_{backend}_rank{trainer.args.process_index}.pt")


def sharded_fraction(trainer) -> float:
    """Share of the parameters' elements that this rank holds locally (1.0: replicated, 0.5: halved)."""
    local = total = 0
    for p in trainer.model.parameters():
        if hasattr(p, "ds_numel"):  # ZeRO-3: p is an empty placeholder, its partition is p.ds_tensor
            local += p.ds_tensor.numel()
            total += p.ds_numel
        elif hasattr(p, "to_local"):  # FSDP2 DTensor
            local += p.to_local().numel()
            total += p.numel()
        else:
            local += p.numel()
            total += p.numel()
    return local / total


def main() -> None:
    torch.set_num_threads(1)  # two ranks share the CI machine's cores
    out_dir, backend = Path(sys.argv[1]), sys.argv[2]
    if backend not in BACKENDS:
        raise SystemExit(f"unknown backend {backend!r}; one of {BACKENDS}")
    names = sys.argv[3:] or [n for n, s in SCENARIOS.items() if backend in s.backends]
    for name in names:
        run(name, backend, out_dir)
    if dist.is_initialized():
        dist.barrier()
        # Left to the interpreter's exit, a ZeRO-3 rank could abort after its results were saved ("terminate
        # called without an active exception"), failing the launch: end the group and leave as `vaccine-trainer`
        # does.
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_launched_rank(0)
