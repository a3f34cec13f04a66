"""Cost of a Vaccine step where users run it: compiled (inductor) and in bf16, against the plain Trainer.

Step time: in ONE process, four steppers on the SmolLM2-135M architecture (LoRA, seq 128, batch 5, as
`step_cost.py`): plain eager, Vaccine eager, plain compiled, Vaccine compiled (`torch.compile(model,
backend="inductor")`, what `torch_compile=True` makes accelerate do). Plain and Vaccine have their own copy
of the model (the same weights), since Vaccine's hooks, compiled as graph breaks, stay installed on its copy
for the whole run as they do for a `train()`. Rounds are interleaved (order rotated) after warm-up steps
that include compiling; each ratio is formed within a round, and the median and IQR over rounds are reported.

Peak memory: one fresh process per (trainer, mode); after a first step (compiling, optimizer state) the peak
resident set (VmHWM) is reset, and the peak over the next steps is read. bf16 is `bf16=True, use_cpu=True` (autocast, as on a GPU), with eps built
in place (now) and with the former `grad.float().mul_(scale).to(dtype)` (before), on a longer sequence so a
hidden-state-sized tensor per layer is visible.

    python bench/compile_precision_cost.py --json bench/results/compile-precision.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_cost  # noqa: E402  (the model, batch and step of the committed step-cost benchmark)

STEPPERS = ("plain-eager", "vaccine-eager", "plain-compiled", "vaccine-compiled")
MEMORY_KINDS = ("plain-eager", "vaccine-eager", "plain-compiled", "vaccine-compiled",
                "plain-bf16", "vaccine-bf16", "vaccine-bf16-eps-copy")


def build(kind: str, output_dir: str, seq_len: int):
    """A trainer, and a Stepper on the (possibly compiled) model, as `Trainer.train` would run the step."""
    from vaccine_trainer import perturbation

    plain = kind.startswith("plain")
    model = step_cost.build_model("lora", "random")
    variant = step_cost.Variant(kind, "plain" if plain else "vaccine")
    trainer = step_cost.build_trainer(model, variant, output_dir, seq_len=seq_len)
    if "bf16" in kind:  # autocast around the forward: what accelerate's prepare does for bf16=True
        model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    if kind.endswith("eps-copy"):  # the former construction: an fp32 copy, then a second low-precision one
        original = perturbation.build_perturbation

        def with_copy(gradients, rho, norm="global"):
            copies = [None if g is None or g.dtype == torch.float32 else g.float() for g in gradients]
            result = original(gradients, rho, norm)
            result.eps = [e if c is None else c.mul_(rho / result.grad_norm).to(e.dtype)
                          for e, c in zip(result.eps, copies)]
            return result

        import vaccine_trainer.trainer as trainer_module
        trainer_module.build_perturbation = with_copy
    hooks = getattr(trainer, "vaccine_hooks", None)
    if hooks is not None:
        hooks.install()  # before compiling, and for the whole run, as `VaccineTrainer.train` does
    stepper = step_cost.Stepper(trainer)
    if "compiled" in kind:
        stepper.model = torch.compile(model, backend="inductor")
    return trainer, stepper


def time_steppers(rounds: int, warmup: int, seq_len: int, output_dir: str, log) -> dict:
    batch = step_cost.make_batch(seq_len)
    steppers, num_items = {}, None
    for kind in STEPPERS:
        trainer, steppers[kind] = build(kind, f"{output_dir}/{kind}", seq_len)
        num_items = trainer._get_num_items_in_batch([batch], trainer.args.device)
    warm = {}
    for kind in STEPPERS:
        start = time.perf_counter()
        for _ in range(warmup):
            steppers[kind](batch, num_items)
        warm[kind] = time.perf_counter() - start
        log(f"warm-up {kind}: {warm[kind]:.1f} s wall (compiling included)")
    cpu = {kind: [] for kind in STEPPERS}
    for round_index in range(rounds):
        order = STEPPERS[round_index % 4:] + STEPPERS[:round_index % 4]
        for kind in order:
            _, seconds = steppers[kind](batch, num_items)
            cpu[kind].append(seconds)
        log(f"round {round_index}: " + ", ".join(f"{k} {cpu[k][-1]:.2f}" for k in STEPPERS))

    def ratio(numerator: str, denominator: str) -> dict:
        values = [n / d for n, d in zip(cpu[numerator], cpu[denominator])]
        q1, q2, q3 = step_cost.quartiles(values)
        return {"median": q2, "q1": q1, "q3": q3, "per_round": values}

    return {
        "cpu_seconds": cpu, "warmup_wall_seconds": warm,
        "ratios": {
            "vaccine/plain, eager": ratio("vaccine-eager", "plain-eager"),
            "vaccine/plain, compiled": ratio("vaccine-compiled", "plain-compiled"),
            "compiled/eager, plain": ratio("plain-compiled", "plain-eager"),
            "compiled/eager, vaccine": ratio("vaccine-compiled", "vaccine-eager"),
        },
    }


def memory_worker(kind: str, seq_len: int, steps: int, output_dir: str) -> dict:
    trainer, stepper = build(kind, output_dir, seq_len)
    batch = step_cost.make_batch(seq_len)
    num_items = trainer._get_num_items_in_batch([batch], trainer.args.device)
    stepper(batch, num_items)  # compiles (compiled kinds) and allocates the optimizer state
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM): compiling is not the step's cost
    base = step_cost._proc_status_kib("VmRSS")
    for _ in range(steps):
        stepper(batch, num_items)
    peak = step_cost._proc_status_kib("VmHWM")
    return {"rss_after_first_step_mib": base / 1024, "peak_rss_mib": peak / 1024}


def measure_memory(seq_len: int, steps: int, output_dir: str, log) -> dict:
    result = {}
    for kind in MEMORY_KINDS:
        command = [sys.executable, __file__, "--memory-worker", kind, "--seq-len", str(seq_len),
                   "--memory-steps", str(steps), "--output-dir", f"{output_dir}/{kind}"]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result[kind] = json.loads(out.strip().splitlines()[-1])
        log(f"memory {kind}: {result[kind]}")
    peak = {kind: result[kind]["peak_rss_mib"] for kind in MEMORY_KINDS}
    return {
        "seq_len": seq_len, "steps_after_the_first": steps, "per_kind": result,
        "peak_ratios": {
            "vaccine/plain, eager": peak["vaccine-eager"] / peak["plain-eager"],
            "vaccine/plain, compiled": peak["vaccine-compiled"] / peak["plain-compiled"],
            "vaccine/plain, bf16 (eps in place)": peak["vaccine-bf16"] / peak["plain-bf16"],
            "vaccine/plain, bf16 (eps copied, before)": peak["vaccine-bf16-eps-copy"] / peak["plain-bf16"],
        },
        "bf16_eps_copy_minus_in_place_mib": peak["vaccine-bf16-eps-copy"] - peak["vaccine-bf16"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps of each stepper (compiling included).")
    parser.add_argument("--seq-len", type=int, default=128, help="Sequence length of the timed steps.")
    parser.add_argument("--memory-seq-len", type=int, default=512)
    parser.add_argument("--memory-steps", type=int, default=1, help="Steps measured after the first one.")
    parser.add_argument("--skip", choices=("time", "memory"), default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--output-dir", default="/tmp/vaccine-bench-compile")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # What VaccineTrainer.train does for a compiled run (the steppers bypass `train`): code is guarded on hooks,
    # so the plain model's compiled code is not reused for Vaccine's hooked copy, nor the reverse.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    torch.set_num_threads(1)  # one thread, as in step_cost.py (a shared 2-core machine)
    torch.set_num_interop_threads(1)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.seq_len, args.memory_steps, args.output_dir)))
        return

    def log(message: str) -> None:
        print(message, flush=True)

    started = time.time()
    results = {"command": "python " + " ".join([os.path.relpath(__file__), *(argv or sys.argv[1:])]),
               "machine": step_cost.machine()}
    if args.skip != "time":
        results["time"] = time_steppers(args.rounds, args.warmup, args.seq_len, args.output_dir, log)
        results["time"]["seq_len"] = args.seq_len
        for name, ratio in results["time"]["ratios"].items():
            log(f"{name}: {ratio['median']:.3f} (IQR {ratio['q1']:.3f}-{ratio['q3']:.3f})")
    if args.skip != "memory":
        results["memory"] = measure_memory(args.memory_seq_len, args.memory_steps, args.output_dir, log)
        for name, ratio in results["memory"]["peak_ratios"].items():
            log(f"peak {name}: {ratio:.3f}")
    results["wall_seconds"] = time.time() - started
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
