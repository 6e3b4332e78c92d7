"""Task-agnostic bookkeeping of experiment runs: one :class:`Job` per (method, seed, variant), finished jobs stored as
JSON records (so a re-run skips them), and the ``machine.json`` that says where wall times were measured."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel
from tqdm.auto import tqdm

from cfo.atomic import write_text_atomically
from cfo.results import json_text

__all__ = ["JOB_PRIORITY", "Job", "execute_jobs", "load_record", "load_run_config", "machine_info", "machine_record", "prepare_run_folder", "slug", "store_record"]

# Longest first when jobs are scheduled: CFO, then fixed-weight Lagrangian, unconstrained, pre-trained.
JOB_PRIORITY = {"CFO_AM": 0, "CFO_NFT": 1, "LAG_AM": 2, "LAG_NFT": 3, "AM": 4, "NFT": 5, "PRE": 6}


def slug(label: str) -> str:
    """A file-safe form of a table label: ``LAG_AM (mu=0.01)`` -> ``LAG_AM_mu_0.01``."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.+-]", "_", label)).strip("_")


@dataclass(frozen=True)
class Job:
    """One (method, seed, variant) run; the variant is a fixed ``mu``, a ``(K, N)`` split or a bound ``B``."""

    method: str
    seed: int
    mu: float | None = None
    split: tuple[int, int] | None = None
    bound: float | None = None

    @property
    def variant(self) -> str:
        parts = []
        if self.mu is not None:
            parts.append(f"mu={self.mu:.3g}")
        if self.split is not None:
            parts.append(f"K={self.split[0]},N={self.split[1]}")
        if self.bound is not None:
            parts.append(f"B={self.bound:g}")
        return " ".join(parts)

    @property
    def label(self) -> str:
        """The row name in tables, e.g. ``LAG_AM (mu=0.01)``."""
        return f"{self.method} ({self.variant})" if self.variant else self.method

    @property
    def name(self) -> str:
        """A file-safe job name, e.g. ``LAG_AM_mu_0.01_seed0``."""
        return slug(self.label) + f"_seed{self.seed}"


def store_record(out: Path, job: Job, record: dict) -> Path:
    """Write ``out/jobs/<job.name>.json`` atomically (a killed run never leaves half a record)."""
    folder = out / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job.name}.json"
    return write_text_atomically(path, json_text(record))


def load_record(out: Path, job: Job) -> dict | None:
    """The stored record of ``job``, or ``None`` when it has not finished."""
    path = out / "jobs" / f"{job.name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def cpu_model_name() -> str:
    """The CPU's model name as the operating system gives it (``/proc/cpuinfo`` on Linux), else ``platform.processor()``
    ("" where neither says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info(device: str = "cpu") -> dict:
    """Where a run ran (stored as ``machine.json`` so reports can say which machine gave the wall times): the host,
    CPU count and model, the vector instruction set PyTorch's CPU kernels use (``cpu_capability``: runs on machines
    that differ in it round differently, so molecular runs, whose decoding turns small differences into other
    molecules, repeat bit-for-bit only on the same kind of machine), PyTorch's version and thread count, the device."""
    info = {"host": f"{platform.system()} {platform.machine()}", "cpu_count": os.cpu_count(), "cpu_model": cpu_model_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def load_run_config(path: str | Path, model: type[BaseModel]) -> BaseModel:
    """Read a YAML run configuration into the pydantic ``model``; unreadable YAML, a non-mapping, unknown keys and bad
    values raise ``ValueError`` naming the file and the problem."""
    from pydantic import ValidationError

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"{path}: invalid configuration:\n{err}") from err


def prepare_run_folder(cfg: BaseModel, out: Path, device: str) -> None:
    """Create ``out``, refuse it if it holds finished jobs of another configuration, and write ``config.yaml`` (which
    reproduces the run) and ``machine.json``."""
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "config.yaml"
    if cfg_file.exists() and (out / "jobs").exists() and any((out / "jobs").iterdir()):
        saved = load_run_config(cfg_file, type(cfg))
        if saved.model_dump() != cfg.model_dump():
            raise ValueError(f"{out} holds a run with another configuration; use another --out or the same --config {cfg_file}")
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    write_text_atomically(out / "machine.json", json_text(machine_record(out / "machine.json", machine_info(device)), indent=2))


def machine_record(path: Path, current: dict) -> dict:
    """What ``machine.json`` holds after an invocation on the machine ``current``: that machine, and under
    ``"earlier"`` every other machine an earlier invocation of the same run folder recorded (oldest first).

    A resumed run may continue on another kind of machine, whose kernels round differently, so its later rounds need
    not repeat what the first machine would have given; overwriting the record would hide that. A record that is not
    valid JSON is kept under ``"earlier"`` as its text."""
    earlier: list = []
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError:
            previous = {"unreadable": path.read_text()}
        if isinstance(previous, dict):
            earlier = list(previous.pop("earlier", []))
        if previous != current and previous not in earlier:
            earlier.append(previous)
    return current | {"earlier": earlier} if earlier else dict(current)


def _run_in_worker(run_job: Callable[[tuple], str], name: str, args: tuple) -> str:
    """Run one job in a worker process, where no progress bar is shown: its log lines carry the job's name, and the
    start, the end and every CFO round (``lambda_k``, ``rho_k``, ``G_k``) are logged, so a parallel run reports more
    than the count of finished jobs."""
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(levelname)s %(name)s: %(message)s", force=True)
    for logger in ("cfo.loop", __name__):
        logging.getLogger(logger).setLevel(logging.INFO)
    log = logging.getLogger(__name__)
    t0 = time.perf_counter()
    log.info("started")
    done = run_job(args)
    log.info("finished in %.0f s", time.perf_counter() - t0)
    return done


def execute_jobs(
    jobs: list[Job],
    out: Path,
    run_job: Callable[[tuple], str],
    job_args: Callable[[Job, int, bool], tuple],
    workers: int,
    progress: bool,
    desc: str,
) -> dict[Job, dict]:
    """Run every job without a stored record (longest methods first) and return every job's record.

    ``run_job(args)`` (a module-level function: it may run in another process) trains, evaluates and stores one job;
    ``job_args(job, threads, show_progress)`` builds its picklable arguments. With ``workers > 1`` the jobs run in
    spawned processes of one thread each; these are not daemonic (``concurrent.futures``), so a job may start its own
    worker processes (the molecular task's xTB pool), and they log each job's start, CFO rounds and end, prefixed with
    the job's name, in place of the progress bars they cannot show."""
    order = sorted(jobs, key=lambda j: JOB_PRIORITY[j.method])
    todo = [j for j in order if load_record(out, j) is None]
    n_workers = min(workers, max(1, len(todo)))
    args = [job_args(j, 1 if n_workers > 1 else torch.get_num_threads(), progress and n_workers == 1) for j in todo]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, disable=not progress)
    if n_workers == 1:
        for job, a in zip(todo, args):
            bar.set_postfix(job=job.name)
            run_job(a)
            bar.update()
    else:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(_run_in_worker, run_job, j.name, a) for j, a in zip(todo, args)]):
                bar.set_postfix(done=fut.result())
                bar.update()
    bar.close()
    records = {j: load_record(out, j) for j in jobs}
    missing = [j.name for j, r in records.items() if r is None]
    if missing:
        raise RuntimeError(f"jobs finished without a stored record: {missing}")
    return records  # type: ignore[return-value]
