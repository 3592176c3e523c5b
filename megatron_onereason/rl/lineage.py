"""What ties an RL checkpoint to its inputs and to its progress.

An RL save directory holds the megatron actor checkpoint (``iter_XXXXXXX/`` and the tracker file naming the complete
one, :mod:`megatron_onereason.training.checkpointing`) and, per actor iteration, the engine state
``rl_engine_state/iter_XXXXXXX.json``: the RL step reached and the fingerprint of the item catalog the run trained
with.

**One commit point.** The engine state of iteration ``I`` is written (atomically) *before* the actor saves iteration
``I``; the actor's tracker file, rewritten last, commits both. A run killed between the two writes resumes from the
previous tracker iteration and reads that iteration's engine state: no RL step is replayed on weights that already
took it (the old order — actor first, one engine-state file second — resumed a killed save with the new weights and
the old step, applying that step's updates twice).

**Catalog lineage.** Rewards compare generated codes with the targets' codes: a catalog of the same shape but another
code assignment (rebuilt tokenizer, other seed) is accepted by every shape check and silently turns the policy's
learned items into wrong ones. The fingerprint covers item ids, domains, codes and codebook size; resuming with
another catalog is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from megatron_onereason.checkpoint.mcore_io import checkpoint_iteration_dir
from megatron_onereason.tokenizer.item_catalog import ItemCatalog

ENGINE_STATE_DIR = "rl_engine_state"


def catalog_fingerprint(catalog: ItemCatalog) -> str:
    """sha256 of the catalog's content in row order: item ids, domains, codes (int64), codebook size."""
    digest = hashlib.sha256()
    digest.update(json.dumps([list(catalog.item_ids), list(catalog.domains), int(catalog.codebook_size)]).encode())
    digest.update(np.ascontiguousarray(catalog.codes, dtype="<i8").tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class EngineState:
    step: int  # RL steps completed
    catalog_fingerprint: str
    catalog: str  # the catalog directory the run trained with (for messages)


def engine_state_path(root: str, iteration: int) -> str:
    return os.path.join(root, ENGINE_STATE_DIR, f"iter_{iteration:07d}.json")


def write_engine_state(root: str, iteration: int, state: EngineState) -> None:
    """Write the engine state of actor iteration ``iteration``: before the actor saves it (module docstring)."""
    path = engine_state_path(root, iteration)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(state), f)
    os.replace(tmp, path)


def read_engine_state(root: str) -> EngineState:
    """The engine state of the actor iteration the tracker file commits."""
    iteration_dir = checkpoint_iteration_dir(root)
    path = os.path.join(root, ENGINE_STATE_DIR, os.path.basename(iteration_dir) + ".json")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing: {root} holds actor checkpoint {os.path.basename(iteration_dir)} without "
                         "its RL engine state (not a save directory of an RL run): use a new save directory")
    with open(path) as f:
        return EngineState(**json.load(f))


def check_catalog(state: EngineState, catalog: ItemCatalog, catalog_dir: str, root: str) -> None:
    """Refuse to resume ``root`` with a catalog other than the one it trained with."""
    fingerprint = catalog_fingerprint(catalog)
    if fingerprint != state.catalog_fingerprint:
        raise ValueError(f"data.catalog={catalog_dir}: fingerprint {fingerprint[:12]} differs from {root}'s "
                         f"({state.catalog_fingerprint[:12]}, trained with {state.catalog}): another code assignment "
                         "makes every reward wrong; resume with the run's catalog or use a new save directory")
