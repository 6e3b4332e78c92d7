"""Atomic file writes: a run killed mid-write leaves the previous file whole, never half of a new one.

Each writer puts the content into ``<name>.tmp`` beside the target and then renames it over the target
(:func:`os.replace`, atomic on POSIX and Windows within one file system)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["write_text_atomically", "torch_save_atomically"]


def _tmp_beside(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename; returns ``path``."""
    path = Path(path)
    tmp = _tmp_beside(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def torch_save_atomically(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` through a temporary file and a rename; returns ``path``."""
    path = Path(path)
    tmp = _tmp_beside(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path
