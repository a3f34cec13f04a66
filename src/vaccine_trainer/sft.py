"""Vaccine on TRL: the stage-1 `VaccineSFTTrainer` and the stage-2 `AlignedSFTTrainer`.

Stage 1 (the provider aligns the model) is Vaccine's two-pass step on top of `SFTTrainer`, so TRL's
data handling (conversational and prompt/completion data, completion-only loss, packing) applies
unchanged. Stage 2 (the user fine-tunes the aligned model) is the threat model of the paper: the
alignment adapter is merged into the base weights and a fresh LoRA is trained on user data, while
an optional callback measures how far the alignment drifts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedModel, TrainingArguments
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from . import checkpointing
from .callbacks import AlignmentDriftCallback
from .config import VaccineArguments
from .model_card import ModelCardSections
from .quantized_layout import trainable_4bit_layout
from .trainer import VaccineMixin
from .trl_internals import (
    check_trl_internals,
    compute_loss_records_undone,
    metrics_replaced_by,
    tokenize_like_training,
)

logger = logging.get_logger(__name__)

VACCINE_PAPER = {
    "title": "Vaccine: Perturbation-aware Alignment for Large Language Models against Harmful Fine-tuning Attack",
    "id": "2402.01109",
    "citation": """\
@inproceedings{huang2024vaccine,
    title     = {{Vaccine: Perturbation-aware Alignment for Large Language Models against Harmful Fine-tuning Attack}},
    author    = {Tiansheng Huang and Sihao Hu and Ling Liu},
    booktitle = {Advances in Neural Information Processing Systems},
    year      = 2024,
}""",
}


class PrecisionForTheHardware:
    """TRL's configs default to bf16, which a machine without a bf16 accelerator refuses at once.

    When neither ``bf16`` nor ``fp16`` was asked for, pick what the hardware runs: bf16 where supported,
    else fp32, on the CPU when there is no accelerator at all, and say so in one log line. An explicit
    ``bf16=True`` that cannot be met still fails with transformers' message.
    """

    def __post_init__(self) -> None:
        if self.bf16 is None and not self.fp16:
            import torch
            from transformers.utils import is_torch_bf16_gpu_available

            accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
            if not is_torch_bf16_gpu_available():
                self.bf16 = False
                if not accelerator:
                    self.use_cpu = True
                logger.warning("No bf16-capable accelerator and no precision asked for: training in fp32"
                               + (" on the CPU." if not accelerator else "."))
        super().__post_init__()


@dataclass
class VaccineSFTConfig(PrecisionForTheHardware, VaccineArguments, SFTConfig):
    """`trl.SFTConfig` plus Vaccine's settings (see [`VaccineArguments`]).

    `SFTTrainer` rebuilds any arguments that are not an `SFTConfig`, dropping unknown fields such as
    `rho`; this class keeps them, and `TrlParser` exposes them as `--rho`, `--vaccine_target`, ...
    on the command line and in a YAML `--config`. Packing stays off by default (TRL's default); with
    prompt/completion data the loss is on the completion only, as in the paper's code.
    """


def _as_config(args: TrainingArguments | None, config_class: type, default_output_dir: str):
    """Rebuild `args` as `config_class` so SFTTrainer keeps our extra fields (it rebuilds other classes)."""
    if args is None:
        return config_class(output_dir=default_output_dir)
    if isinstance(args, config_class):
        return args
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be a {config_class.__name__} or TrainingArguments, got {type(args).__name__}.")
    values = args.to_dict()
    values["hub_token"] = args.hub_token  # to_dict hides it
    known = set(config_class.__dataclass_fields__)
    return config_class(**{k: v for k, v in values.items() if k in known})


class VaccineSFTTrainer(VaccineMixin, SFTTrainer):
    """`trl.SFTTrainer` with Vaccine's perturbation-aware alignment step.

    Takes `VaccineSFTConfig` (or any `SFTConfig`/`TrainingArguments` plus Vaccine keyword arguments,
    e.g. `rho=2.0`). Pass 1 runs TRL's own `compute_loss`, which records token counts and metrics: the
    tokens are counted once per micro-batch, and `entropy` and `mean_token_accuracy` are those of the
    clean forward (pass 1), not of the perturbed one, so they are what a plain `SFTTrainer` logs on the
    same model and data. `loss` is the perturbed loss that is trained; `vaccine/clean_loss` the clean one.
    """

    _tag_names = ["trl", "sft", "vaccine"]
    _name = "Vaccine SFT"
    _paper = VACCINE_PAPER

    def __init__(self, model, args: TrainingArguments | None = None, *pos, **kwargs):
        if args is None or not isinstance(args, SFTConfig):
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = _as_config(args, VaccineSFTConfig, f"{Path(str(name)).name}-Vaccine")
        self._vaccine_clean_metrics: dict = {}
        super().__init__(model, args, *pos, **kwargs)

    def _check_vaccine_supported(self) -> None:
        check_trl_internals(self)
        super()._check_vaccine_supported()

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Report the clean forward's entropy and accuracy (what SFTTrainer logs), not the perturbed one's.
        with metrics_replaced_by(self, self._vaccine_clean_metrics):
            return super().training_step(model, inputs, num_items_in_batch)

    def _prepare_probe_dataset(self, dataset):
        """T-Vaccine's harmful probe rows, tokenized by TRL like the training data."""
        if "input_ids" not in dataset.column_names:
            dataset = tokenize_like_training(self, dataset, "probe")
        return super()._prepare_probe_dataset(dataset)

    @contextlib.contextmanager
    def _vaccine_pass_one_context(self) -> Iterator[None]:
        """Pass 1 in TRL's activation offloading, as `SFTTrainer.training_step` puts pass 2; and undo what TRL's
        `compute_loss` records in pass 1, keeping its values for `training_step`."""
        with compute_loss_records_undone(self, self._vaccine_clean_metrics), self.maybe_activation_offload_context:
            yield


@dataclass
class AlignedSFTConfig(PrecisionForTheHardware, SFTConfig):
    """`trl.SFTConfig` for stage 2: fine-tuning an aligned model with a fresh LoRA adapter.

    Defaults are the paper's stage-2 settings (LoRA r=8, alpha=1 -- 0.5 for GSM8K --, dropout 0.1 on
    every linear projection, lr 1e-5, 20 epochs).

    Parameters:
        lora_r (`int`, defaults to `8`): rank of the fresh adapter.
        lora_alpha (`float`, defaults to `1.0`): LoRA scaling numerator (scale = alpha / r).
        lora_dropout (`float`, defaults to `0.1`): dropout on the adapter's input.
        lora_target_modules (`list[str]`, *optional*): module names to adapt; default: every linear
            projection of the model except the output head (PEFT's `"all-linear"`), on any architecture.
        drift_target (`str`, defaults to `"layer"`): hidden states whose drift is measured: `"layer"`
            (each decoder layer's output) or `"attention"` (each self-attention block's output).
        drift_layers (`str`, *optional*): subset of decoder layers for the drift, e.g. `"0-3"`.
        drift_batch_size (`int`, defaults to `8`): batch size of the drift/alignment-loss passes.
        merge_alignment (`bool`, *optional*): merge the alignment adapter into the base weights; by default yes,
            unless the base is quantized (QLoRA), where it stays a frozen adapter trained beside.
    """

    learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate (paper: 1e-5)."})
    num_train_epochs: float = field(default=20.0, metadata={"help": "Training epochs (paper: 20)."})
    lora_r: int = field(default=8, metadata={"help": "Rank of the fresh stage-2 LoRA adapter."})
    lora_alpha: float = field(default=1.0, metadata={"help": "LoRA alpha (paper: 1; 0.5 for GSM8K)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules to adapt. Default: every linear projection except the output head."},
    )
    drift_target: str = field(
        default="layer", metadata={"help": "Hidden states for the drift.", "choices": ["layer", "attention"]}
    )
    drift_layers: str | None = field(default=None, metadata={"help": "Decoder layers for the drift, e.g. '0-3'."})
    drift_batch_size: int = field(default=8, metadata={"help": "Batch size of the drift evaluation."})
    merge_alignment: bool | None = field(default=None, metadata={
        "help": "Merge the alignment adapter into the base weights (default: unless the base is loaded in 4 or 8 "
                "bits, where it stays a frozen adapter beside the new one)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_r <= 0:
            raise ValueError(f"lora_r must be a positive integer, got {self.lora_r}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.drift_target not in ("layer", "attention"):
            raise ValueError(f"drift_target must be 'layer' or 'attention', got {self.drift_target!r}.")

    def lora_config(self):
        """The fresh adapter's `peft.LoraConfig`."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.lora_target_modules or "all-linear",
            bias="none",
            task_type="CAUSAL_LM",
        )


def load_causal_lm(name_or_path: str | os.PathLike, **kwargs: Any) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` with an error that says what to pass instead."""
    try:
        return AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load a causal language model from {str(name_or_path)!r}: it is not a folder written by "
            "`save_pretrained` and could not be fetched from the Hugging Face Hub. Pass a local model folder or a "
            f"hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct' (with network access). Cause: {error}"
        ) from error


def merge_alignment_adapter(model, adapter=None, **load_kwargs: Any) -> PreTrainedModel:
    """The aligned model as plain weights: base model with the alignment adapter merged in.

    `model` is a base model (or its path/hub id) or an aligned `PeftModel`; `adapter` is a folder
    written by `save_pretrained` (e.g. the output of `vaccine-trainer align`), or an aligned
    `PeftModel`. A `PeftModel` is merged in place: its base modules receive the merged weights.
    """
    from peft import PeftModel

    if isinstance(adapter, PeftModel):
        if model is not None and model is not adapter and model is not adapter.get_base_model():
            raise ValueError(
                "Both a model and an aligned PeftModel were given: pass the PeftModel alone (as `model` or "
                "`alignment_adapter`), or a base model with the path of its alignment adapter."
            )
        model, adapter = adapter, None
    if model is None:
        raise ValueError("No model given: pass a base model (or its path) with `alignment_adapter`, or a PeftModel.")
    folder = _adapter_folder(adapter) if adapter is not None else None  # fail before loading the model
    if isinstance(model, (str, os.PathLike)):
        model = load_causal_lm(model, **load_kwargs)
    if folder is not None:
        if isinstance(model, PeftModel):
            raise ValueError(
                "The model already carries a PEFT adapter and an alignment adapter path was given too: "
                "merge the first one (`model.merge_and_unload()`) or pass the base model."
            )
        model = PeftModel.from_pretrained(model, folder)
    if isinstance(model, PeftModel):
        return _merge_and_unload(model)
    return model  # no adapter: the model's own weights are the aligned ones


def _merge_and_unload(model) -> PreTrainedModel:
    """`merge_and_unload`, also where ZeRO-3 partitioned the base weights as they loaded (`zero3_init`): there
    each base weight is an empty placeholder, so every adapted layer's weight is gathered, merged and partitioned
    again, one layer at a time (no rank ever holds the whole model); the adapter's own weights are not partitioned.
    """
    from peft.tuners.lora import LoraLayer

    if not any(hasattr(p, "ds_id") for p in model.get_base_model().parameters()):
        return model.merge_and_unload(safe_merge=True)
    import deepspeed

    for module in model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            # Every rank merges the same gathered values; rank 0's are the ones partitioned back.
            with deepspeed.zero.GatheredParameters(list(base.parameters(recurse=False)), modifier_rank=0):
                module.merge(safe_merge=True)
    return model.unload()  # the merged base layers, partitioned, in place of the LoRA wrappers


def _adapter_folder(adapter: str | os.PathLike) -> str:
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        why = "does not exist" if not path.exists() else "has no adapter_config.json"
        raise FileNotFoundError(
            f"Alignment adapter {str(adapter)!r} {why}. Pass the output folder of `vaccine-trainer align` or of "
            "`trainer.save_model()` on a PEFT model (it holds adapter_config.json and adapter_model.safetensors)."
        )
    return str(path)


class AlignedSFTTrainer(ModelCardSections, SFTTrainer):
    """Stage 2: SFT of an aligned model with a fresh LoRA, optionally tracking alignment drift.

    Merges the alignment adapter (a path or a `PeftModel`) into the base weights, attaches a fresh
    LoRA adapter from `args` (or `peft_config`) and trains it with TRL on the user's data: only the
    new adapter trains. With `alignment_dataset` (held alignment data, in any format `SFTTrainer`
    accepts), an [`AlignmentDriftCallback`] logs the harmful embedding drift and the alignment loss
    at every logging and evaluation step.

    ```python
    trainer = AlignedSFTTrainer(model="base-model", alignment_adapter="aligned/",
                                args=AlignedSFTConfig("stage2"), train_dataset=user_data,
                                alignment_dataset=held_alignment_data)
    trainer.train()
    ```
    """

    _tag_names = ["trl", "sft", "vaccine-stage2"]
    _name = "SFT of an aligned model"
    _paper = VACCINE_PAPER

    def __init__(
        self,
        model=None,
        args: TrainingArguments | None = None,
        train_dataset: Dataset | None = None,
        *,
        alignment_adapter=None,
        alignment_dataset: Dataset | None = None,
        peft_config=None,
        **kwargs: Any,
    ):
        from .unmerged_alignment import attach_beside_alignment, is_quantized

        args = _as_config(args, AlignedSFTConfig, "aligned-sft")  # always an AlignedSFTConfig from here
        if peft_config is None:
            peft_config = args.lora_config()
        load_kwargs = dict(args.model_init_kwargs or {})
        folder = None
        if isinstance(alignment_adapter, (str, os.PathLike)):
            folder = _adapter_folder(alignment_adapter)  # fail before loading the model
            if isinstance(model, (str, os.PathLike)):
                model = load_causal_lm(model, **load_kwargs)
        merge = args.merge_alignment if args.merge_alignment is not None else not is_quantized(model)
        if folder is not None and not merge:  # a 4-bit base: the alignment adapter stays, frozen, beside the new one
            model = attach_beside_alignment(model, folder, peft_config, checkpointing.setting(args, default=False))
            peft_config = None
        elif folder is not None and is_quantized(model):
            raise ValueError("merge_alignment=True cannot merge the alignment adapter into a 4-bit or 8-bit base: "
                             "leave merge_alignment unset (the adapter then stays beside the new one) or load the "
                             "base unquantized.")
        else:
            model = merge_alignment_adapter(model, folder or alignment_adapter, **load_kwargs)
        super().__init__(model, args, train_dataset=train_dataset, peft_config=peft_config, **kwargs)
        self.drift_callback: AlignmentDriftCallback | None = None
        if alignment_dataset is not None:
            self.drift_callback = self._drift_callback(alignment_dataset)
            self.drift_callback.attach(self)

    def train(self, *args, **kwargs):
        """SFTTrainer's `train`, with 4-bit layers kept in the layout that trains: the drift measurement's eval
        forwards would otherwise repack them for inference on some CPUs (`quantized_layout`)."""
        with trainable_4bit_layout(self.model):
            return super().train(*args, **kwargs)

    def _drift_callback(self, alignment_dataset: Dataset) -> AlignmentDriftCallback:
        if len(alignment_dataset) == 0:
            raise ValueError("alignment_dataset is empty: pass at least one row of held alignment data.")
        if "input_ids" not in alignment_dataset.column_names:
            alignment_dataset = self._prepare_dataset(
                alignment_dataset, self.processing_class, self.args, False, self._formatting_func, "alignment"
            )
        from .unmerged_alignment import aligned_only, has_unmerged_alignment

        return AlignmentDriftCallback(alignment_dataset, data_collator=self.data_collator,
                                      target=self.args.drift_target, layers=self.args.drift_layers,
                                      batch_size=self.args.drift_batch_size, reference_without_adapter=True,
                                      aligned_model=aligned_only if has_unmerged_alignment(self.model) else None)


__all__ = [
    "AlignedSFTConfig",
    "AlignedSFTTrainer",
    "VaccineSFTConfig",
    "VaccineSFTTrainer",
    "load_causal_lm",
    "merge_alignment_adapter",
]
