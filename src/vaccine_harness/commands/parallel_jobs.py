"""Independent runs as parallel processes: how a sweep of a small model fills a GPU that one run leaves idle.

Each job is a command with at most one job it needs finished first. A failed job is retried (`retries` times); a job
whose prerequisite failed never starts. Past `stop_after_s` no job starts; past `kill_after_s` the running ones are
stopped (their work resumes on the next run, as the pipeline's phases do). Every try is recorded in `jobs.json`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vaccine_trainer.commands.common import logger

POLL_S = 2.0
STOPPED = "stopped"


@dataclass
class Job:
    """One command to run; `history` holds each try's exit code (or "stopped") and wall time."""

    name: str
    command: list[str]
    needs: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    tries: int = 0
    process: subprocess.Popen | None = None
    started: float = 0.0
    history: list[dict] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return bool(self.history) and self.history[-1]["rc"] == 0


def start(job: Job, log_dir: Path) -> None:
    """The job's command in its own process group (so stopping it stops its children), output to its own log."""
    log = open(log_dir / f"{job.name.replace(':', '_')}.log", "a")
    job.process = subprocess.Popen(job.command, env={**os.environ, **job.environment}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    log.close()  # the child holds its own copy
    job.started, job.tries = time.time(), job.tries + 1


def stop(job: Job) -> None:
    """SIGTERM to the job's process group, SIGKILL if it is still there 10 s later."""
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


def run_jobs(jobs: Sequence[Job], log_dir: Path, workers: int, retries: int = 1,
             stop_after_s: float | None = None, kill_after_s: float | None = None) -> list[Job]:
    """Run `jobs` in order, at most `workers` at a time, each once its prerequisite succeeded; returns them all."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}.")
    log_dir.mkdir(parents=True, exist_ok=True)
    stop_after = float("inf") if stop_after_s is None else stop_after_s
    kill_after = float("inf") if kill_after_s is None else kill_after_s
    began = time.time()
    waiting, running, ended = list(jobs), [], []
    succeeded, failed = set(), set()
    try:
        while waiting or running:
            elapsed = time.time() - began
            for job in list(running):
                rc = job.process.poll()
                if rc is None and elapsed >= kill_after:
                    stop(job)
                    rc = STOPPED
                if rc is None:
                    continue
                running.remove(job)
                job.history.append({"rc": rc, "wall_s": round(time.time() - job.started, 1)})
                logger().warning(f"[{elapsed:6.0f} s] {job.name}: exit {rc} after {job.history[-1]['wall_s']} s")
                if rc == 0:
                    succeeded.add(job.name)
                    ended.append(job)
                elif rc != STOPPED and job.tries <= retries:
                    waiting.insert(0, job)
                else:
                    failed.add(job.name)
                    ended.append(job)
            if elapsed >= stop_after:
                ended += waiting
                waiting = []
            for job in list(waiting):
                if job.needs in failed:  # its prerequisite failed: it cannot run, and counts as failed
                    waiting.remove(job)
                    ended.append(job)
                    failed.add(job.name)
                elif len(running) < workers and (job.needs is None or job.needs in succeeded):
                    waiting.remove(job)
                    start(job, log_dir)
                    running.append(job)
                    logger().warning(f"[{elapsed:6.0f} s] {job.name}: started (try {job.tries})")
            if waiting or running:
                time.sleep(POLL_S)
    finally:  # interrupted (Ctrl-C): no orphaned job keeps training
        for job in running:
            stop(job)
    record = [{"job": job.name, "needs": job.needs, "runs": job.history} for job in ended]
    (log_dir / "jobs.json").write_text(json.dumps({"wall_s": round(time.time() - began, 1), "jobs": record},
                                                  indent=1) + "\n")
    return ended
