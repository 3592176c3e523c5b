"""Per-file checksums of a checkpoint iteration directory: written at save, checked before a load.

``iter_XXXXXXX/onereason_checksums.json`` lists every file of the directory with its size and SHA-256. It is written
after all ranks finished writing (each rank hashes the files it wrote, while they are still in the page cache)
and before the tracker names the iteration, so it also marks the directory as complete. Verification splits the
files over all ranks (each byte is read by one rank, in parallel threads) and every rank gets the same verdict.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_onereason.fileio import atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = "onereason_checksums.json"
# In the common state (common.pt) of every checkpoint saved with a manifest: its manifest missing is then damage, not
# the mark of a checkpoint that predates checksums (which alone loads unverified).
SAVED_WITH_CHECKSUMS = "saved_with_checksums"
ALGORITHM = "sha256"
_BLOCK = 16 << 20
_THREADS = 4


def file_digest(path: str) -> Tuple[int, str]:
    """``(size, sha256 hex)`` of a file, read in blocks (hashlib releases the GIL: threads hash in parallel)."""
    h = hashlib.new(ALGORITHM)
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def _digests(directory: str, names: Sequence[str]) -> Dict[str, Tuple[int, str]]:
    if not names:
        return {}
    with concurrent.futures.ThreadPoolExecutor(min(_THREADS, len(names))) as pool:
        return dict(zip(names, pool.map(lambda n: file_digest(os.path.join(directory, n)), names)))


def _data_files(directory: str) -> List[str]:
    return sorted(n for n in os.listdir(directory) if n != MANIFEST and os.path.isfile(os.path.join(directory, n)))


def _writer(name: str, world: int) -> int:
    """The rank that wrote a file: ``torch_dist`` data files are ``__{rank}_{i}.distcp``; rank 0 writes the rest."""
    m = re.fullmatch(r"__(\d+)_\d+\.distcp", name)
    rank = int(m.group(1)) if m else 0
    return rank if rank < world else 0


def _world() -> Tuple[int, int]:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_gather(obj):
    import torch

    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def write_manifest(directory: str) -> Dict[str, Tuple[int, str]]:
    """Collective (or single-process): hash every file of ``directory`` and write the manifest (rank 0).

    Call after all ranks finished writing ``directory`` (and after a barrier).
    """
    rank, world = _world()
    names = _data_files(directory)
    mine = [n for n in names if _writer(n, world) == rank]
    merged: Dict[str, Tuple[int, str]] = {}
    for part in _all_gather(_digests(directory, mine)):
        merged.update(part)
    if rank == 0:
        atomic_write_text(os.path.join(directory, MANIFEST), json.dumps(
            {"algorithm": ALGORITHM, "files": {n: {"bytes": s, ALGORITHM: d} for n, (s, d) in sorted(merged.items())}},
            indent=1))
    return merged


def has_manifest(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MANIFEST))


def read_manifest(directory: str) -> Optional[Dict[str, Dict]]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        return dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {MANIFEST: {"error": f"unreadable ({e})"}}


def verify_directory(directory: str) -> Optional[List[str]]:
    """Problems of ``directory`` against its manifest (``[]``: intact), identical on every rank; ``None`` only when
    it has no manifest and its common state says it predates checksums (a missing manifest of a checkpoint saved
    with one is damage). Collective when distributed."""
    manifest = read_manifest(directory)
    if manifest is None:
        return _manifest_lost(directory)
    rank, world = _world()
    problems: List[str] = []
    if MANIFEST in manifest:
        problems.append(f"{MANIFEST}: {manifest[MANIFEST]['error']}")
        return problems
    present = set(_data_files(directory))
    expected = sorted(manifest)
    to_hash = []
    for i, name in enumerate(expected):
        if i % world != rank:
            continue
        path = os.path.join(directory, name)
        if name not in present:
            problems.append(f"{name}: missing")
        elif os.path.getsize(path) != manifest[name]["bytes"]:
            problems.append(f"{name}: {os.path.getsize(path)} bytes, {manifest[name]['bytes']} when saved (truncated "
                            "or overwritten)")
        else:
            to_hash.append(name)
    for name, (_, digest) in _digests(directory, to_hash).items():
        if digest != manifest[name][ALGORITHM]:
            problems.append(f"{name}: checksum mismatch (the file changed after it was saved)")
    if rank == 0:
        problems += [f"{n}: not listed in {MANIFEST} (from another save?)" for n in sorted(present - set(manifest))
                     if n.endswith(".distcp")]
    return sorted(p for part in _all_gather(problems) for p in part)


def _manifest_lost(directory: str) -> Optional[List[str]]:
    """Why a directory without a manifest is damaged, or None when its common state says it predates checksums."""
    from megatron.core import dist_checkpointing

    try:
        saved_with = dist_checkpointing.load_common_state_dict(directory).get(SAVED_WITH_CHECKSUMS, False)
    except Exception as e:  # noqa: BLE001 - any unreadable common state is damage, whatever torch.load raises
        return [f"{MANIFEST}: missing, and the common state is unreadable ({type(e).__name__}: {e})"]
    if saved_with:
        return [f"{MANIFEST}: missing (this checkpoint was saved with checksums: it was deleted)"]
    return None


def damaged_message(directory: str, problems: Sequence[str]) -> str:
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    return f"{directory} is damaged: {shown}"


def check_directory(directory: str) -> bool:
    """Raise ``UserError`` naming the damaged files; returns False (and logs) if there is no manifest to check."""
    from megatron_onereason.cli import UserError

    problems = verify_directory(directory)
    if problems is None:
        log.warning("%s has no %s (saved before checksums existed): not verified", directory, MANIFEST)
        return False
    if problems:
        raise UserError(damaged_message(directory, problems))
    return True
