"""Task-agnostic bookkeeping of experiment runs: one :class:`Job` per (method, seed, variant), finished jobs stored as
JSON records (so a re-run skips them), and the ``machine.json`` that says where wall times were measured."""

from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Job", "machine_info", "store_record", "load_record", "JOB_PRIORITY"]

# Longest first when jobs are scheduled: CFO, then fixed-weight Lagrangian, unconstrained, pre-trained.
JOB_PRIORITY = {"CFO_AM": 0, "CFO_NFT": 1, "LAG_AM": 2, "LAG_NFT": 3, "AM": 4, "NFT": 5, "PRE": 6}


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
        return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.+-]", "_", self.label)).strip("_") + f"_seed{self.seed}"


def store_record(out: Path, job: Job, record: dict) -> Path:
    """Write ``out/jobs/<job.name>.json`` atomically (a killed run never leaves half a record)."""
    folder = out / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job.name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    return path


def load_record(out: Path, job: Job) -> dict | None:
    """The stored record of ``job``, or ``None`` when it has not finished."""
    path = out / "jobs" / f"{job.name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def machine_info(device: str = "cpu") -> dict:
    """Where a run ran (stored as ``machine.json`` so reports can say which machine gave the wall times)."""
    info = {"host": f"{platform.system()} {platform.machine()}", "cpu_count": os.cpu_count(), "torch": torch.__version__, "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
