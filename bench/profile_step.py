"""Where the time of a Vaccine step goes, phase by phase, next to a plain Trainer step.

Wraps, on one trainer instance, the calls a step is made of (`compute_loss` = a forward,
`hidden_state_gradients` = pass 1's input-only backward, `build_perturbation`,
`accelerator.backward` = the parameter backward, optimizer step) and sums the process CPU time
of each, so the ratio of `bench/step_cost.py` can be read as forward/backward units.
Optionally writes a torch.profiler operator table of one Vaccine step.

    python bench/profile_step.py --finetune lora --seq-len 128
    python bench/profile_step.py --finetune full --seq-len 128 --ops
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_cost  # noqa: E402

import vaccine_trainer.trainer as trainer_module  # noqa: E402


class PhaseClock:
    """CPU seconds per named phase; nested phases are not subtracted from their parents."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.process_time()
        try:
            yield
        finally:
            self.seconds[name] += time.process_time() - start

    def wrap(self, name: str, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            with self.phase(name):
                return function(*args, **kwargs)

        return timed


def instrument(trainer, clock: PhaseClock, two_passes: bool = False) -> None:
    forward = trainer.compute_loss
    if two_passes:  # calls alternate: pass 1 (clean, capturing), pass 2 (perturbed)
        calls = iter(range(10**9))
        wrapped = {i: clock.wrap(name, forward) for i, name in enumerate(("pass-1 forward", "pass-2 forward"))}
        trainer.compute_loss = lambda *a, **k: wrapped[next(calls) % 2](*a, **k)
    else:
        trainer.compute_loss = clock.wrap("forward (compute_loss)", forward)
    trainer.accelerator.backward = clock.wrap("parameter backward (accelerator.backward)", trainer.accelerator.backward)
    optimizer_step = trainer.optimizer.step
    trainer.optimizer.step = clock.wrap("optimizer step", optimizer_step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--finetune", choices=("lora", "full"), default="lora")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--target", choices=("attention", "layer"), default="attention")
    parser.add_argument("--layers", default=None, help="vaccine_layers, e.g. 15-29 (default: all)")
    parser.add_argument("--steps", type=int, default=2, help="Measured steps of each trainer after one warm-up.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ops", action="store_true",
                        help="Also print torch.profiler's operator table of one Vaccine step.")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = step_cost.build_model(args.finetune, "random")
    batch = step_cost.make_batch(args.seq_len)
    plain = step_cost.build_trainer(model, step_cost.Variant("plain", "plain"), "/tmp/vaccine-bench")
    variant = step_cost.Variant("vaccine", "vaccine", args.target, args.layers)
    vaccine = step_cost.build_trainer(model, variant, "/tmp/vaccine-bench")  # own optimizer: wrapped per trainer
    num_items = plain._get_num_items_in_batch([batch], plain.args.device)
    steppers = {"plain": step_cost.Stepper(plain), "vaccine": step_cost.Stepper(vaccine, vaccine.vaccine_hooks)}
    for stepper in steppers.values():  # warm-up, not measured
        stepper(batch, num_items)

    clocks = {name: PhaseClock() for name in steppers}
    totals = {name: 0.0 for name in steppers}
    system = {name: 0.0 for name in steppers}  # kernel time: page faults of fresh large allocations
    original = {name: getattr(trainer_module, name) for name in ("hidden_state_gradients", "build_perturbation")}
    for name, trainer in (("plain", plain), ("vaccine", vaccine)):
        instrument(trainer, clocks[name], two_passes=name == "vaccine")
    trainer_module.hidden_state_gradients = clocks["vaccine"].wrap(
        "pass-1 input-only backward (autograd.grad)", original["hidden_state_gradients"])
    trainer_module.build_perturbation = clocks["vaccine"].wrap("build eps (norms, scale)",
                                                               original["build_perturbation"])
    try:
        for _ in range(args.steps):
            for name, stepper in steppers.items():
                before = os.times().system
                totals[name] += stepper(batch, num_items)[1]
                system[name] += os.times().system - before
        if args.ops:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steppers["vaccine"](batch, num_items)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    finally:
        trainer_module.hidden_state_gradients = original["hidden_state_gradients"]
        trainer_module.build_perturbation = original["build_perturbation"]

    report = {"finetune": args.finetune, "seq_len": args.seq_len, "target": args.target, "layers": args.layers or "all",
              "steps": args.steps, "threads": args.threads, "phases": {}}
    plain_step = totals["plain"] / args.steps
    print(f"{args.finetune}, seq {args.seq_len}, target {args.target}, layers {args.layers or 'all'}: "
          f"CPU s per step, mean of {args.steps} (unit = one plain step)")
    for name, clock in clocks.items():
        step = totals[name] / args.steps
        phases = {phase: seconds / args.steps for phase, seconds in clock.seconds.items()}
        phases["rest (hooks, clipping, zero_grad, bookkeeping)"] = step - sum(phases.values())
        report["phases"][name] = {"step_s": step, "of_which_kernel_s": system[name] / args.steps, **phases}
        print(f"  {name:8s} step {step:7.2f}s = {step / plain_step:.3f}  (of which kernel time "
              f"{system[name] / args.steps:.2f}s)")
        for phase, seconds in phases.items():
            print(f"    {phase:50s} {seconds:7.2f}s  {seconds / plain_step:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
