"""The molecular dataset: one compressed ``.npz`` file with a format version and a checksum, and its resumable builder.

Build, per molecule: SMILES -> RDKit molecule with explicit H -> ETKDGv3 conformer -> MMFF94 relaxation -> (optional
GFN2-xTB relaxation) -> GFN2-xTB single point with tblite at the stored (float32) geometry: total energy (Ha), dipole
(D), HOMO-LUMO gap (eV). Molecules are processed in shards; each finished shard is written to ``OUT/shards`` with its
failures, so a killed build continues where it stopped. Every failure is counted by cause (parse, element, charge,
size, embed, mmff, scf, too_close, xtb, implausible), never lost.

File layout (all molecules concatenated; ``*_ptr`` are offsets of length ``n + 1``):

=================  =========  ===============================================================
``numbers``        int8 [A]   atomic numbers, H explicit
``positions``      f4 [A, 3]  Angstrom, as used for the xTB labels
``charges``        int8 [A]   formal charges
``atom_ptr``       i8 [n+1]   molecule i has atoms ``atom_ptr[i]:atom_ptr[i+1]``
``bonds``          i2 [B, 2]  atom indices within the molecule
``bond_orders``    i1 [B]     1 single, 2 double, 3 triple, 4 aromatic
``bond_ptr``       i8 [n+1]   molecule i has bonds ``bond_ptr[i]:bond_ptr[i+1]``
``smiles``         str [n]    canonical SMILES (no H)
``energy``         f8 [n]     GFN2-xTB total energy, Hartree
``dipole``         f8 [n]     |dipole|, Debye
``gap``            f8 [n]     HOMO-LUMO gap, eV
``converged``      bool [n]   SCF converged (failures are not stored, so all True)
``n_heavy``        i2 [n]     heavy atoms
``meta``           str []     JSON: format version, checksum of every other array, build settings
=================  =========  ===============================================================
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from cfo.atomic import write_text_atomically
from cfo.results import json_text
from cfo.tasks.molecules.chem import ATOMIC_NUMBERS, ELEMENTS

__all__ = [
    "DATASET_VERSION", "BuildIncomplete", "DatasetError", "MoleculeDataset", "BuildConfig", "BuildSummary", "build_record", "build_dataset",
    "select_candidates", "FAILURE_CAUSES",
]

DATASET_VERSION = 1
FAILURE_CAUSES = ("parse", "element", "charge", "size", "embed", "mmff", "scf", "too_close", "xtb", "implausible", "input", "timeout")
ARRAYS = ("numbers", "positions", "charges", "atom_ptr", "bonds", "bond_orders", "bond_ptr", "smiles", "energy", "dipole", "gap", "converged", "n_heavy")


class BuildIncomplete(Exception):
    """A build stopped on purpose (``max_shards``) before every shard was done; rerun to continue."""


class DatasetError(Exception):
    """A dataset file that cannot be trusted: unreadable, wrong version, or a checksum mismatch."""


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(key.encode())
        h.update(a.dtype.str.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


class MoleculeDataset:
    """Molecules with 3D coordinates, bonds and GFN2-xTB labels (see the module docstring for the layout)."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
        missing = set(ARRAYS) - set(arrays)
        if missing:
            raise DatasetError(f"dataset arrays missing: {sorted(missing)}")
        self.arrays = {k: arrays[k] for k in ARRAYS}
        self.meta = dict(meta or {})
        n = len(self.arrays["smiles"])
        if len(self.arrays["atom_ptr"]) != n + 1 or len(self.arrays["bond_ptr"]) != n + 1:
            raise DatasetError("offset arrays do not match the number of molecules")

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.arrays["smiles"])

    def __getattr__(self, name: str) -> np.ndarray:
        if name in ARRAYS:
            return self.__dict__["arrays"][name]
        raise AttributeError(name)

    def molecule(self, i: int) -> dict:
        """Molecule ``i`` as a dict: numbers, positions, charges, bonds, bond_orders, smiles and its labels."""
        a, b = self.arrays["atom_ptr"][i : i + 2]
        c, d = self.arrays["bond_ptr"][i : i + 2]
        return {
            "numbers": self.arrays["numbers"][a:b].astype(np.int64),
            "positions": self.arrays["positions"][a:b],
            "charges": self.arrays["charges"][a:b].astype(np.int64),
            "bonds": self.arrays["bonds"][c:d].astype(np.int64),
            "bond_orders": self.arrays["bond_orders"][c:d].astype(np.int64),
            "smiles": str(self.arrays["smiles"][i]),
            **{k: float(self.arrays[k][i]) for k in ("energy", "dipole", "gap")},
            "n_heavy": int(self.arrays["n_heavy"][i]),
        }

    def n_atoms(self) -> np.ndarray:
        return np.diff(self.arrays["atom_ptr"])

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_records(cls, records: Sequence[dict], meta: dict | None = None) -> "MoleculeDataset":
        """Concatenate per-molecule records (as made by :func:`build_record`)."""
        def cat(key: str, dtype, shape_tail: tuple = ()) -> np.ndarray:
            parts = [np.asarray(r[key], dtype=dtype).reshape((-1, *shape_tail)) for r in records]
            return np.concatenate(parts) if parts else np.zeros((0, *shape_tail), dtype=dtype)

        atom_ptr = np.concatenate([[0], np.cumsum([len(r["numbers"]) for r in records])]).astype(np.int64)
        bond_ptr = np.concatenate([[0], np.cumsum([len(r["bond_orders"]) for r in records])]).astype(np.int64)
        arrays = {
            "numbers": cat("numbers", np.int8),
            "positions": cat("positions", np.float32, (3,)),
            "charges": cat("charges", np.int8),
            "atom_ptr": atom_ptr,
            "bonds": cat("bonds", np.int16, (2,)),
            "bond_orders": cat("bond_orders", np.int8),
            "bond_ptr": bond_ptr,
            "smiles": np.asarray([r["smiles"] for r in records], dtype=str),
            "energy": np.asarray([r["energy"] for r in records], dtype=np.float64),
            "dipole": np.asarray([r["dipole"] for r in records], dtype=np.float64),
            "gap": np.asarray([r["gap"] for r in records], dtype=np.float64),
            "converged": np.asarray([r["converged"] for r in records], dtype=bool),
            "n_heavy": np.asarray([r["n_heavy"] for r in records], dtype=np.int16),
        }
        return cls(arrays, meta)

    @classmethod
    def concatenate(cls, parts: Sequence["MoleculeDataset"], meta: dict | None = None) -> "MoleculeDataset":
        return cls.from_records([p.molecule(i) | {"converged": bool(p.converged[i])} for p in parts for i in range(len(p))], meta)

    # ---------------------------------------------------------------- files
    def save(self, path: str | Path) -> str:
        """Write the compressed file (atomically) and return its checksum."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, "format_version": DATASET_VERSION, "sha256": _checksum(self.arrays), "n": len(self)}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, meta=np.asarray(json_text(meta, indent=None)), **self.arrays)
        tmp.replace(path)
        self.meta = meta
        return meta["sha256"]

    @classmethod
    def load(cls, path: str | Path) -> "MoleculeDataset":
        """Read and verify a dataset file; ``DatasetError`` names what is wrong with a corrupted or foreign file."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no dataset at {path}; build one with `cfo mol build-data --out DIR`")
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as err:  # zipfile.BadZipFile, zlib.error, ValueError, EOFError ...
            raise DatasetError(f"{path} is not a readable dataset file ({type(err).__name__}: {err})") from err
        if "meta" not in arrays:
            raise DatasetError(f"{path} has no metadata; not a cfo molecule dataset")
        meta = json.loads(str(arrays.pop("meta")))
        if meta.get("format_version") != DATASET_VERSION:
            raise DatasetError(f"{path} has format version {meta.get('format_version')}, this cfo reads version {DATASET_VERSION}")
        if set(ARRAYS) - set(arrays):
            raise DatasetError(f"{path} lacks arrays {sorted(set(ARRAYS) - set(arrays))}")
        found = _checksum({k: arrays[k] for k in ARRAYS})
        if found != meta.get("sha256"):
            raise DatasetError(f"{path}: checksum mismatch (stored {meta.get('sha256', '?')[:12]}..., computed {found[:12]}...); the file is corrupted")
        return cls(arrays, meta)

    # ---------------------------------------------------------------- statistics
    def summary(self) -> dict:
        """Counts, sizes, elements and label percentiles (p5, p25, p50, p75, p95), for docs and for choosing B."""
        def pct(v: np.ndarray) -> dict:
            if len(v) == 0:
                return {}
            q = np.percentile(v, [0, 5, 25, 50, 75, 95, 100])
            return {"mean": float(v.mean()), "std": float(v.std()), **{k: float(x) for k, x in zip(("min", "p5", "p25", "p50", "p75", "p95", "max"), q)}}

        elements = Counter(int(z) for z in self.arrays["numbers"])
        symbols = {z: s for s, z in ATOMIC_NUMBERS.items()}
        return {
            "n": len(self),
            "atoms": pct(self.n_atoms().astype(float)),
            "heavy_atoms": pct(self.arrays["n_heavy"].astype(float)),
            "elements": {symbols.get(z, str(z)): c for z, c in sorted(elements.items())},
            "energy_Ha": pct(self.arrays["energy"]),
            "dipole_D": pct(self.arrays["dipole"]),
            "gap_eV": pct(self.arrays["gap"]),
        }


# -------------------------------------------------------------------------------------------------------- builder


class BuildConfig(BaseModel):
    """Settings of ``cfo mol build-data`` (stored in ``OUT/manifest.json``; a resumed build must use the same)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field("moses", description="'moses' (the molsets wheel) or a SMILES file / SDF")
    n: int = Field(200, ge=1, description="candidate molecules to build (failures are counted, not replaced)")
    max_heavy: int = Field(18, ge=1, description="largest heavy-atom count")
    min_heavy: int = Field(2, ge=1)
    elements: list[str] = Field(default_factory=lambda: list(ELEMENTS))
    seed: int = 0
    shard_size: int = Field(250, ge=1, description="molecules per resumable shard")
    mmff_iters: int = Field(2000, ge=0)
    xtb_relax_steps: int = Field(0, ge=0, description="GFN2-xTB L-BFGS relaxation steps after MMFF (0: single point on MMFF)")
    xtb_max_iter: int = Field(250, ge=1, description="SCF iteration limit")

    @field_validator("elements")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [e for e in v if e not in ATOMIC_NUMBERS]
        if unknown:
            raise ValueError(f"unknown elements {unknown}; supported: {list(ATOMIC_NUMBERS)}")
        return v


class BuildSummary(BaseModel):
    attempted: int
    built: int
    failed: dict[str, int]
    failure_examples: list[dict]
    scanned: int
    skipped_by_size: int
    wall_s: float
    cpu_s_per_molecule: float
    wall_s_per_molecule: float
    shards_reused: int
    shards_built: int
    dataset: str
    sha256: str


def build_record(smiles: str, config: BuildConfig) -> dict:
    """Build one molecule's record, or raise ``BuildError`` naming the cause."""
    from cfo.tasks.molecules.conformers import BuildError, bond_arrays, check_composition, embed_conformer, parse_smiles
    from cfo.tasks.molecules.xtb import xtb_relax, xtb_singlepoint

    from rdkit import Chem

    mol = parse_smiles(smiles)
    check_composition(mol, config.elements, config.max_heavy, config.min_heavy)
    mol = embed_conformer(mol, seed=config.seed, mmff_iters=config.mmff_iters)
    numbers = np.asarray([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    positions = mol.GetConformer().GetPositions().astype(np.float32)
    if config.xtb_relax_steps > 0:
        relaxed = xtb_relax(numbers, positions.astype(np.float64), steps=config.xtb_relax_steps, max_iter=config.xtb_max_iter)
        if not relaxed.ok:
            raise BuildError(relaxed.error, relaxed.message)
        positions = relaxed.positions.astype(np.float32)
    # the label belongs to the stored float32 geometry exactly
    result = xtb_singlepoint(numbers, positions.astype(np.float64), max_iter=config.xtb_max_iter)
    if not result.ok:
        raise BuildError(result.error, result.message)
    bonds, orders = bond_arrays(mol)
    return {
        "numbers": numbers,
        "positions": positions,
        "charges": np.asarray([a.GetFormalCharge() for a in mol.GetAtoms()]),
        "bonds": bonds,
        "bond_orders": orders,
        "smiles": Chem.MolToSmiles(Chem.RemoveHs(mol)),
        "energy": result.energy,
        "dipole": result.dipole,
        "gap": result.gap,
        "converged": result.converged,
        "n_heavy": mol.GetNumHeavyAtoms(),
    }


def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def _build_one(args: tuple[str, dict]) -> dict:
    from cfo.tasks.molecules.conformers import BuildError

    smiles, cfg = args
    t0 = time.perf_counter()
    try:
        record = build_record(smiles, BuildConfig.model_validate(cfg))
        return {"ok": True, "record": record, "seconds": time.perf_counter() - t0}
    except BuildError as err:
        return {"ok": False, "cause": err.cause, "smiles": smiles, "message": str(err)[:300], "seconds": time.perf_counter() - t0}
    except Exception as err:  # anything unexpected is still one molecule's failure, not the build's
        return {"ok": False, "cause": "xtb" if "tblite" in repr(type(err)).lower() else "error", "smiles": smiles,
                "message": f"{type(err).__name__}: {err}"[:300], "seconds": time.perf_counter() - t0}


def select_candidates(smiles: Sequence[str], config: BuildConfig) -> tuple[list[str], int, int]:
    """The first ``n`` distinct SMILES, in a seeded random order, whose heavy-atom count is in range (a cheap
    pre-filter on the unsanitised parse; SMILES that do not parse pass through and fail as 'parse' later).
    Returns ``(candidates, scanned, skipped_by_size)``."""
    from cfo.tasks.molecules.conformers import heavy_atom_count
    from cfo.tasks.molecules.source import shuffled

    import re

    token = re.compile(r"\[[^\]]*\]|Cl|Br|[BCNOSPFI]|[bcnosp]")
    out, seen, scanned, skipped = [], set(), 0, 0
    for s in shuffled(list(smiles), config.seed):
        scanned += 1
        if s in seen:
            continue
        seen.add(s)
        # regex token count first (exact for organic-subset SMILES, about 50x cheaper than parsing); RDKit confirms
        rough = sum(1 for t in token.findall(s) if not re.fullmatch(r"\[H\d*[+-]?\d*\]", t))
        if rough > config.max_heavy + 2 or rough < config.min_heavy - 2:
            skipped += 1
            continue
        heavy = heavy_atom_count(s)
        if heavy is not None and not (config.min_heavy <= heavy <= config.max_heavy):
            skipped += 1
            continue
        out.append(s)
        if len(out) == config.n:
            break
    return out, scanned, skipped


def _manifest(out: Path, config: BuildConfig, cache_dir: str | Path | None, progress: bool) -> dict:
    from cfo.tasks.molecules.source import load_source

    path = out / "manifest.json"
    key = config.model_dump()
    if path.exists():
        manifest = json.loads(path.read_text())
        same_but_n = {k: v for k, v in manifest["config"].items() if k != "n"} == {k: v for k, v in key.items() if k != "n"}
        if same_but_n and config.n < len(manifest["candidates"]):
            # a smaller n with the same settings selects a prefix of the same candidates: finished shards stay valid
            manifest = {**manifest, "config": key, "candidates": manifest["candidates"][: config.n], "truncated_from": len(manifest["candidates"])}
            write_text_atomically(path, json_text(manifest, indent=None))
            return manifest
        if manifest["config"] != key:
            raise ValueError(f"{out} holds a build with other settings ({manifest['config']}); use another --out or the same settings")
        return manifest
    if progress:
        print(f"reading source {config.source!r} and selecting {config.n} molecules with {config.min_heavy}-{config.max_heavy} heavy atoms ...", flush=True)
    smiles = load_source(config.source, cache_dir)
    candidates, scanned, skipped = select_candidates(smiles, config)
    manifest = {"config": key, "candidates": candidates, "scanned": scanned, "skipped_by_size": skipped, "source_size": len(smiles)}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json_text(manifest, indent=None))
    return manifest


def build_dataset(
    config: BuildConfig,
    out_dir: str | Path,
    workers: int = 2,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    max_shards: int | None = None,
) -> BuildSummary:
    """Build (or resume) the dataset in ``out_dir``: ``dataset.npz``, ``summary.json``, ``failures.json``.

    ``max_shards`` stops after building that many new shards (to split a long build across sessions); rerun to go on.
    """
    out = Path(out_dir)
    manifest = _manifest(out, config, cache_dir, progress)
    candidates = manifest["candidates"]
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    shards = [candidates[i : i + config.shard_size] for i in range(0, len(candidates), config.shard_size)]
    done = {i for i in range(len(shards)) if (shard_dir / f"shard_{i:05d}.json").exists()}
    todo = [i for i in range(len(shards)) if i not in done]
    if max_shards is not None:
        todo = todo[:max_shards]
    t0 = time.perf_counter()
    cfg_dict = config.model_dump()
    bar = tqdm(total=len(candidates), initial=sum(len(shards[i]) for i in done), desc="build-data", unit="mol", disable=not progress)
    pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init) if workers > 1 and todo else None
    try:
        for i in todo:
            args = [(s, cfg_dict) for s in shards[i]]
            results = []
            iterator = pool.imap(_build_one, args, chunksize=4) if pool is not None else map(_build_one, args)
            shard_t0 = time.perf_counter()
            for r in iterator:
                results.append(r)
                bar.update()
            records = [r["record"] for r in results if r["ok"]]
            failures = [{k: r[k] for k in ("cause", "smiles", "message")} for r in results if not r["ok"]]
            MoleculeDataset.from_records(records).save(shard_dir / f"shard_{i:05d}.npz")
            info = {"attempted": len(results), "built": len(records), "failures": failures,
                    "cpu_s": sum(r["seconds"] for r in results), "wall_s": time.perf_counter() - shard_t0}
            write_text_atomically(shard_dir / f"shard_{i:05d}.json", json_text(info, indent=None))  # written last: marks the shard done
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()
    finished = [i for i in range(len(shards)) if (shard_dir / f"shard_{i:05d}.json").exists()]
    if len(finished) < len(shards):
        raise BuildIncomplete(f"stopped after {len(finished)} of {len(shards)} shards (max_shards); rerun the same command to continue")
    infos = [json.loads((shard_dir / f"shard_{i:05d}.json").read_text()) for i in finished]
    parts = [MoleculeDataset.load(shard_dir / f"shard_{i:05d}.npz") for i in finished]
    meta = {"build": cfg_dict, "source_size": manifest["source_size"], "created": time.strftime("%Y-%m-%d")}
    dataset = MoleculeDataset.concatenate(parts, meta)
    sha = dataset.save(out / "dataset.npz")
    failures = [f for info in infos for f in info["failures"]]
    attempted = sum(info["attempted"] for info in infos)
    summary = BuildSummary(
        attempted=attempted,
        built=len(dataset),
        failed=dict(Counter(f["cause"] for f in failures)),
        failure_examples=failures[:20],
        scanned=manifest["scanned"],
        skipped_by_size=manifest["skipped_by_size"],
        wall_s=time.perf_counter() - t0,
        cpu_s_per_molecule=sum(info["cpu_s"] for info in infos) / max(1, attempted),
        wall_s_per_molecule=sum(info["wall_s"] for info in infos) / max(1, attempted),
        shards_reused=len(done),
        shards_built=len(todo),
        dataset=str(out / "dataset.npz"),
        sha256=sha,
    )
    (out / "failures.json").write_text(json_text(failures, indent=1))
    (out / "summary.json").write_text(json_text({**summary.model_dump(), "labels": dataset.summary()}, indent=2))
    return summary
