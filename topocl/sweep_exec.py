"""Executing the runs of a sweep: one run = one `python -m topocl <kind> CONFIG k=v ...` subprocess.

    execute_run(run, env)        runs one run, writes RUN/sweep.log and, on success only, RUN/DONE.json
                                 (atomically, last): the marker that makes a re-launch skip the run; its
                                 result has the run's wall and CPU seconds (os.wait4: the child's own usage)
    run_local(runs, ex, ...)     N parallel slots on this machine; slot i gets CUDA_VISIBLE_DEVICES = its GPU
                                 (or "" for a CPU slot)
    run_submitit(runs, ex, ...)  Slurm through submitit (ex.kind=slurm), or submitit's LocalExecutor /
                                 DebugExecutor (kind=submitit-local / submitit-debug, for tests)

A run that exits non-zero is reported (status failed, return code, log path) and does not stop the others.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from topocl.checkpoint import write_json_atomic

DONE = "DONE.json"
LOG = "sweep.log"


@dataclass
class SlurmConfig:
    partition: str = ""
    timeout_min: int = 240
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 32
    array_parallelism: int = 64  # runs of one wave running at once
    additional: dict[str, Any] = field(default_factory=dict)  # passed as slurm_additional_parameters


@dataclass
class ExecutorConfig:
    kind: str = "local"  # local | slurm | submitit-local | submitit-debug
    workers: int = 0  # local: parallel slots; 0 = one per visible GPU (gpus), or 1 without a GPU
    gpus: list[str] = field(default_factory=list)  # local: CUDA_VISIBLE_DEVICES value per slot; [] = all visible
    threads: int = 0  # OMP_NUM_THREADS per run (0 = leave it)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


def is_done(run_dir: Path) -> bool:
    return (run_dir / DONE).is_file()


def resume_needed(run: dict) -> bool:
    """A run started before (and not done) continues where it stopped instead of being refused."""
    out = Path(run["out_dir"])
    if run["kind"] == "pretrain":
        return (out / "checkpoints" / "LATEST").is_file()
    return (out / "results.jsonl").is_file()


def command(run: dict) -> list[str]:
    extra = ["resume=true"] if resume_needed(run) else []
    return [sys.executable, "-m", "topocl", run["kind"], run["config"], *run["overrides"], *extra]


def _wait(proc: subprocess.Popen, f, echo: bool) -> tuple[int, float]:
    """(exit code, CPU seconds of the child and its waited-for children) of `proc`; with `echo` its output goes
    to stderr as well as to the log `f` (so the run's own progress bar shows)."""
    try:
        if echo:
            for chunk in iter(lambda: proc.stdout.read1(1 << 14), b""):
                f.write(chunk)
                f.flush()
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
            proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # interrupted: do not leave the run behind
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def run_logged(cmd: list[str], log: Path, env: dict[str, str] | None = None, echo: bool = False,
               cwd: str | None = None) -> tuple[int, float]:
    """Run `cmd` to completion, appending a timestamped command line and its output to `log` (and to stderr with
    `echo`); returns (exit code, CPU seconds of the child and its waited-for children)."""
    with open(log, "ab") as f:
        f.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if echo else f, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, cwd=cwd)
        return _wait(proc, f, echo)


def execute_run(run: dict, env: dict[str, str] | None = None, echo: bool = False) -> dict:
    """Run one sweep run to completion in a subprocess; returns {status, returncode, wall_s, cpu_s, log}."""
    out = Path(run["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    log = out / LOG
    t0 = time.perf_counter()
    rc, cpu = run_logged(command(run), log, env, echo, run.get("cwd"))
    res = {"status": "done" if rc == 0 else "failed", "returncode": rc, "wall_s": time.perf_counter() - t0,
           "cpu_s": cpu, "log": str(log)}
    if rc == 0:
        write_json_atomic(out / DONE, {**res, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return res


def _gpu_slots(ex: ExecutorConfig) -> list[str]:
    if ex.gpus:
        return list(ex.gpus)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover
        return []


def slot_envs(ex: ExecutorConfig) -> list[dict[str, str]]:
    """Environment per local slot: one slot per GPU (round-robin when workers > GPUs), else CPU slots."""
    gpus = _gpu_slots(ex)
    n = ex.workers or max(1, len(gpus))
    base = {"OMP_NUM_THREADS": str(ex.threads)} if ex.threads > 0 else {}
    return [{**base, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)] if gpus else ""} for i in range(n)]


Callback = Callable[[dict, dict], None]


def run_local(runs: list[dict], ex: ExecutorConfig, on_finish: Callback,
              should_start: Callable[[dict], bool] | None = None, echo: bool = False,
              execute: Callable[..., dict] | None = None) -> None:
    """Execute `runs` on parallel local slots; `on_finish(run, result)` is called (serialised) per run.
    `should_start(run)` (serialised), when given, is asked just before a run starts: False leaves it unstarted
    (on_finish gets status "not started"). `echo`: each run's output goes to stderr too (one slot only).
    `execute(run, env, echo=)`: what runs in the slot (default execute_run; topocl study adds its analyses)."""
    envs = slot_envs(ex)
    free = list(range(len(envs)))
    lock = threading.Lock()

    def work(run: dict) -> None:
        with lock:
            if should_start is not None and not should_start(run):
                on_finish(run, {"status": "not started"})
                return
            slot = free.pop()
        try:
            res = (execute or execute_run)(run, envs[slot], echo=echo and len(envs) == 1)
        except Exception as e:  # noqa: BLE001 - a broken run must not stop the sweep
            res = {"status": "failed", "returncode": -1, "wall_s": 0.0, "log": str(Path(run["out_dir"]) / LOG),
                   "error": repr(e)}
        finally:
            with lock:
                free.append(slot)
        with lock:
            on_finish(run, {**res, "slot": slot})

    with ThreadPoolExecutor(max_workers=len(envs)) as pool:
        list(pool.map(work, runs))


def run_submitit(runs: list[dict], ex: ExecutorConfig, folder: Path, on_finish: Callback,
                 poll_s: float = 1.0) -> None:
    """Submit `runs` as one job each (a job array on Slurm) and wait for them."""
    try:
        import submitit
    except ImportError:
        raise RuntimeError("executor.kind=" + ex.kind + " needs submitit: pip install -e '.[sweep]'") from None
    if ex.kind == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        s = ex.slurm
        params: dict[str, Any] = {"timeout_min": s.timeout_min, "gpus_per_node": s.gpus_per_node,
                                  "cpus_per_task": s.cpus_per_task, "mem_gb": s.mem_gb, "tasks_per_node": 1,
                                  "nodes": 1, "slurm_array_parallelism": s.array_parallelism}
        if s.partition:
            params["slurm_partition"] = s.partition
        if s.additional:
            params["slurm_additional_parameters"] = dict(s.additional)
        executor.update_parameters(**params)
    elif ex.kind == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=ex.slurm.timeout_min)
    elif ex.kind == "submitit-debug":
        executor = submitit.DebugExecutor(folder=folder)
    else:
        raise ValueError(f"executor.kind={ex.kind!r}: use local | slurm | submitit-local | submitit-debug")
    env = {"OMP_NUM_THREADS": str(ex.threads)} if ex.threads > 0 else {}
    if ex.kind == "slurm":
        with executor.batch():
            jobs = [executor.submit(execute_run, run, env) for run in runs]
    else:
        jobs = [executor.submit(execute_run, run, env) for run in runs]
    pending = dict(zip(range(len(jobs)), jobs))
    while pending:
        for i, job in list(pending.items()):
            if not job.done():
                continue
            del pending[i]
            try:
                res = job.result()
            except Exception as e:  # noqa: BLE001 - the job itself failed (killed, timeout)
                res = {"status": "failed", "returncode": -1, "wall_s": 0.0,
                       "log": str(Path(runs[i]["out_dir"]) / LOG), "error": repr(e)[:500]}
            on_finish(runs[i], {**res, "job_id": str(job.job_id)})
        if pending:
            time.sleep(poll_s)
