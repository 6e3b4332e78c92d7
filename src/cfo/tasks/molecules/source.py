"""Source molecules: the MOSES training set read straight from the ``molsets`` wheel, or a user's SMILES file or SDF.

The wheel is fetched once with ``pip download --no-deps molsets==0.3.1`` into a cache folder (51.6 MB); ``molsets``
itself is never installed or imported (its dependencies are old and heavy).
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["MOSES_VERSION", "default_cache_dir", "moses_wheel", "read_moses_smiles", "read_smiles_file", "read_sdf_smiles", "load_source", "shuffled"]

MOSES_VERSION = "0.3.1"
MOSES_MEMBER = "moses/dataset/data/train.csv.gz"


def default_cache_dir() -> Path:
    """``$CFO_CACHE`` or ``~/.cache/cfo``."""
    return Path(os.environ.get("CFO_CACHE", Path.home() / ".cache" / "cfo"))


def moses_wheel(cache_dir: str | Path | None = None) -> Path:
    """The ``molsets`` wheel in ``cache_dir`` (downloaded with pip on first use; needs the package registry)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"molsets-{MOSES_VERSION}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"molsets=={MOSES_VERSION}", "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob(f"molsets-{MOSES_VERSION}-*.whl"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"could not download the molsets wheel (MOSES SMILES) with `{' '.join(cmd)}`:\n{proc.stderr[-2000:]}")
    return found[0]


def read_moses_smiles(wheel: str | Path) -> list[str]:
    """The 1,584,663 MOSES training SMILES from the wheel's ``train.csv.gz`` (header ``SMILES``)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            lines = gzip.decompress(zf.read(MOSES_MEMBER)).decode().splitlines()
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise RuntimeError(f"{wheel} is not a molsets wheel holding {MOSES_MEMBER}: {err}") from err
    if not lines or lines[0].strip().upper() != "SMILES":
        raise RuntimeError(f"unexpected header in {MOSES_MEMBER}: {lines[:1]}")
    return [s.strip() for s in lines[1:] if s.strip()]


def read_smiles_file(path: str | Path) -> list[str]:
    """SMILES from a text file: one per line (first whitespace- or comma-separated field; a header ``smiles`` and
    lines starting with ``#`` are skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        first = line.replace(",", " ").split()[0]
        if first.lower() == "smiles":
            continue
        out.append(first)
    if not out:
        raise ValueError(f"{path} holds no SMILES")
    return out


def read_sdf_smiles(path: str | Path) -> list[str]:
    """Canonical SMILES of every readable molecule of an SDF (unreadable records are skipped and counted in a warning)."""
    import logging

    from rdkit import Chem

    supplier = Chem.SDMolSupplier(str(path), removeHs=False)
    out, bad = [], 0
    for mol in supplier:
        if mol is None:
            bad += 1
            continue
        out.append(Chem.MolToSmiles(Chem.RemoveHs(mol)))
    if bad:
        logging.getLogger(__name__).warning("%s: %d unreadable SDF records skipped", path, bad)
    if not out:
        raise ValueError(f"{path} holds no readable molecule")
    return out


def load_source(source: str, cache_dir: str | Path | None = None) -> list[str]:
    """``moses`` (the wheel's training set), or a path to a SMILES file (.smi/.txt/.csv) or an SDF (.sdf)."""
    if source == "moses":
        return read_moses_smiles(moses_wheel(cache_dir))
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"source {source!r} is neither 'moses' nor an existing file")
    return read_sdf_smiles(path) if path.suffix.lower() in (".sdf", ".sd") else read_smiles_file(path)


def shuffled(smiles: list[str], seed: int) -> Iterator[str]:
    """The SMILES in a seeded random order (the same seed gives the same order)."""
    order = np.random.default_rng(seed).permutation(len(smiles))
    for i in order:
        yield smiles[int(i)]
