"""Cost of a Vaccine step on a CUDA GPU, against the plain Trainer measured in the same run.

Real `Trainer.train()` runs (bf16 autocast, LoRA r=8 on every projection as in the paper, AdamW, batch 8 of random
tokens), plain `Trainer` and `VaccineTrainer` (rho 2, attention outputs), eager and `torch_compile=True` (inductor).
Two model shapes with random weights in bf16, no network: SmolLM2-135M's and Llama-3.2-1B's. Step times come from a
callback that synchronizes the device at each step's start and end; the first `--warmup` steps (compiling) are not
timed. Each setting runs (plain, Vaccine) pairs in turn; a ratio is formed within each (plain, Vaccine) pair and the
median step time of each run is used. Peak memory: `torch.cuda.max_memory_allocated` over the timed steps, and what
the step adds above the memory held before it.

    python bench/cuda_step_cost.py --json bench/results/cuda-step-cost.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_cost  # noqa: E402  (SmolLM2-135M's shape and the paper's LoRA targets)

BATCH = 8


def llama_1b_config() -> transformers.LlamaConfig:
    """Llama-3.2-1B's shape (its hub config, written out: no network)."""
    return transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, hidden_act="silu", use_cache=False, bos_token_id=0, eos_token_id=0,
    )


SHAPES = {"smollm2-135m": step_cost.smollm2_135m_config, "llama-3.2-1b": llama_1b_config}


class StepTimer(TrainerCallback):
    """Device-synchronized wall time of each step; peak memory from the first timed step on."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.started = warmup, [], 0.0
        self.held_before = self.peak = 0

    def on_step_begin(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        if state.global_step == self.warmup:
            self.held_before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.started)

    def on_train_end(self, args, state, control, **kwargs):
        self.peak = torch.cuda.max_memory_allocated()


def run(shape: str, vaccine: bool, compiled: bool, seq_len: int, warmup: int, steps: int) -> dict:
    import peft

    from vaccine_trainer import VaccineTrainer

    torch.manual_seed(0)
    with torch.device("cuda"):  # initialised on the device: a 1B random init on the host takes longer than the run
        model = transformers.AutoModelForCausalLM.from_config(SHAPES[shape](), dtype=torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=4, lora_dropout=0.0,
                                                       target_modules=step_cost.LORA_TARGETS, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rows = [{"input_ids": ids, "attention_mask": [1] * seq_len, "labels": ids}
            for ids in torch.randint(3, vocab, (BATCH * (warmup + steps), seq_len), generator=generator).tolist()]
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=BATCH, max_steps=warmup + steps,
                                 learning_rate=1e-4, bf16=True, torch_compile=compiled, report_to="none",
                                 save_strategy="no", logging_steps=10_000, disable_tqdm=True,
                                 dataloader_num_workers=0, lr_scheduler_type="constant")
        if vaccine:
            trainer = VaccineTrainer(model=model, args=args, train_dataset=rows, callbacks=[timer], rho=2.0)
        else:
            trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[timer])
        trainer.train()
    result = {"shape": shape, "trainer": "vaccine" if vaccine else "plain", "compiled": compiled,
              "seq_len": seq_len, "step_s_median": statistics.median(timer.times), "step_s": timer.times,
              "peak_gib": timer.peak / 2 ** 30, "step_added_gib": (timer.peak - timer.held_before) / 2 ** 30}
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache()
    torch.compiler.reset()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--settings", default="smollm2-135m:eager:2,llama-3.2-1b:eager:2,smollm2-135m:compiled:1,"
                                              "llama-3.2-1b:compiled:1",
                        help="shape:mode:pairs, comma-separated; each pair is a plain run then a Vaccine run.")
    args = parser.parse_args(argv)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": transformers.__version__, "batch": BATCH, "seq_len": args.seq_len,
               "command": "python bench/cuda_step_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "runs": [], "ratios": []}
    for setting in args.settings.split(","):
        shape, mode, pairs = setting.split(":")
        pair = []
        for vaccine in (False, True) * int(pairs):
            row = run(shape, vaccine, mode == "compiled", args.seq_len, args.warmup, args.steps)
            results["runs"].append(row)
            print(f"{shape} {mode} {row['trainer']}: {row['step_s_median'] * 1e3:.1f} ms/step, "
                  f"peak {row['peak_gib']:.2f} GiB (+{row['step_added_gib']:.2f})", flush=True)
            pair.append(row)
            if vaccine:
                plain, vac = pair
                results["ratios"].append({"shape": shape, "mode": mode,
                                          "time_ratio": vac["step_s_median"] / plain["step_s_median"],
                                          "peak_ratio": vac["peak_gib"] / plain["peak_gib"],
                                          "step_added_ratio": vac["step_added_gib"] / plain["step_added_gib"]})
                print(f"  ratio Vaccine/plain: time {results['ratios'][-1]['time_ratio']:.3f}, "
                      f"peak {results['ratios'][-1]['peak_ratio']:.3f}", flush=True)
                pair = []
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")  # after every run: a cut run keeps its rows


if __name__ == "__main__":
    main()
