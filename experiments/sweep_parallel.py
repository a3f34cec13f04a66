"""Issue 30's sweep with its cells run as parallel processes, for one GPU that a 135M model leaves mostly idle.

The cells of `vaccine-trainer sweep` are independent once stage 1 is done: this runs the same cells in the same
folders (stage 1 per seed and arm, then each arm's p = 0 reference and every attacker setting, one process each,
seed by seed), so `vaccine-trainer sweep --summary_only true` with the same flags summarises them and a cell finished
here is skipped there. Each job gets one CPU thread and its own datasets cache and logs to `<output_dir>/jobs/`.
Past `--stop_after_s` no job starts; past `--kill_after_s` running jobs are stopped (their cells resume on the next
run). Then the sweep's summary is written from whatever finished.

    python experiments/sweep_parallel.py --config experiments/replication.yaml --output_dir outputs/durability \\
        --methods sft,vaccine --seeds 42,43 --harmful_ratios 0.1 --learning_rates 5e-4,1e-3,2e-3,4e-3 \\
        --epochs 2,4,6 --workers 12
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from vaccine_trainer.commands.grid import cell_dir
from vaccine_trainer.commands.pipeline import PipelineArguments, resolve_model, run_pipeline
from vaccine_trainer.commands.sweep import SweepArguments, attack_cell, run_sweep

POLL_S = 2.0


@dataclass
class Job:
    name: str  # align:SEED:METHOD, reference:SEED:METHOD or cell:SEED:METHOD:P:LR:EPOCHS
    needs: str | None = None
    tries: int = 0
    process: subprocess.Popen | None = None
    started: float = 0.0
    history: list[dict] = field(default_factory=list)


def parse(argv: list[str]) -> tuple[argparse.Namespace, PipelineArguments, SweepArguments]:
    from trl import TrlParser

    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--workers", type=int, default=8)
    own.add_argument("--stop_after_s", type=float, default=float("inf"))
    own.add_argument("--kill_after_s", type=float, default=float("inf"))
    own.add_argument("--retries", type=int, default=1)
    own.add_argument("--job", default=None)
    scheduling, rest = own.parse_known_args(argv)
    args, sweep = TrlParser((PipelineArguments, SweepArguments)).parse_args_and_config(rest)
    return scheduling, args, sweep


def run_job(args: PipelineArguments, job: str) -> None:
    """One job, in this process: the same `run_pipeline` call as `run_sweep` makes, for one arm."""
    kind, seed, method, *setting = job.split(":")
    root, seed = Path(args.output_dir), int(seed)
    common = dict(seed=seed, methods=method, alignment_dir=str(root / f"seed{seed}"),
                  model_name_or_path=resolve_model(args))
    if kind in ("align", "reference"):
        run_pipeline(replace(args, output_dir=str(cell_dir(root, seed, 0.0)), harmful_ratio=0.0,
                             align_only=kind == "align", **common))
    elif kind == "cell":
        ratio, rate, epochs = (float(value) for value in setting)
        run_pipeline(replace(args, output_dir=str(attack_cell(root, seed, ratio, rate, epochs, args)),
                             harmful_ratio=ratio, finetune_learning_rate=rate, finetune_epochs=epochs, **common))
    else:
        raise ValueError(f"Unknown job {job!r}.")


def jobs_of(args: PipelineArguments, sweep: SweepArguments) -> list[Job]:
    """Stage 1 of every seed first (they run side by side), then seed by seed its references and cells."""
    methods = [method for method in args.method_list() if method != "non-aligned"]
    seeds = sweep.seed_list()
    jobs = [Job(f"align:{seed}:{method}") for seed in seeds for method in methods]
    for seed in seeds:
        for method in methods:
            jobs.append(Job(f"reference:{seed}:{method}", needs=f"align:{seed}:{method}"))
        for ratio in sweep.ratio_list():
            for rate, epochs in sweep.settings():
                for method in methods:
                    jobs.append(Job(f"cell:{seed}:{method}:{ratio:g}:{rate:g}:{epochs:g}",
                                    needs=f"align:{seed}:{method}"))
    return jobs


def start(job: Job, argv: list[str], log_dir: Path) -> None:
    safe = job.name.replace(":", "_")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(log_dir / "datasets_cache" / safe)}
    log = open(log_dir / f"{safe}.log", "a")
    job.process = subprocess.Popen([sys.executable, __file__, *argv, "--job", job.name], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    job.started, job.tries = time.time(), job.tries + 1


def stop(job: Job) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(job.process.pid, sig)
        except ProcessLookupError:
            return
        try:
            job.process.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def schedule(argv: list[str], scheduling: argparse.Namespace, args: PipelineArguments,
             sweep: SweepArguments) -> list[Job]:
    log_dir = Path(args.output_dir) / "jobs"
    log_dir.mkdir(parents=True, exist_ok=True)
    began = time.time()
    waiting, running, ended = jobs_of(args, sweep), [], []
    done, failed = set(), set()
    while waiting or running:
        elapsed = time.time() - began
        for job in list(running):
            rc = job.process.poll()
            if rc is None and elapsed > scheduling.kill_after_s:
                stop(job)
                rc = "stopped"
            if rc is None:
                continue
            running.remove(job)
            job.history.append({"rc": rc, "wall_s": round(time.time() - job.started, 1)})
            print(f"[{elapsed:6.0f} s] {job.name}: rc {rc} after {job.history[-1]['wall_s']} s", flush=True)
            if rc == 0:
                done.add(job.name)
                ended.append(job)
            elif rc != "stopped" and job.tries <= scheduling.retries:
                waiting.insert(0, job)
            else:
                failed.add(job.name)
                ended.append(job)
        if elapsed > scheduling.stop_after_s:
            ended += waiting
            waiting = []
        for job in list(waiting):
            if job.needs in failed:
                waiting.remove(job)
                ended.append(job)
                failed.add(job.name)
            elif len(running) < scheduling.workers and (job.needs is None or job.needs in done):
                waiting.remove(job)
                start(job, argv, log_dir)
                running.append(job)
                print(f"[{elapsed:6.0f} s] {job.name}: started (try {job.tries})", flush=True)
        time.sleep(POLL_S)
    status = [{"job": job.name, "runs": job.history} for job in ended]
    (log_dir / "jobs.json").write_text(json.dumps({"wall_s": round(time.time() - began, 1), "jobs": status},
                                                  indent=1) + "\n")
    return ended


def main(argv: list[str]) -> int:
    scheduling, args, sweep = parse(argv)
    if scheduling.job:
        run_job(args, scheduling.job)
        return 0
    ended = schedule(argv, scheduling, args, sweep)
    finished = sum(1 for job in ended if job.history and job.history[-1]["rc"] == 0)
    print(f"{finished} of {len(ended)} jobs finished", flush=True)
    try:
        run_sweep(args, replace(sweep, summary_only=True))
    except ValueError as error:  # nothing evaluated yet
        print(f"no summary: {error}", flush=True)
    return 0 if finished == len(ended) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
