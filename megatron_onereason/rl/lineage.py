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

**Tokenizer lineage** (:func:`check_tokenizers`, before Ray starts): the rollout tokenizer (``rollout.model_dir``)
is the run's reference; the actor checkpoint, the MOPD / RFT teachers (the KL reference is ``rollout.model_dir``
itself) must have been made with the same one, the general teacher must give its tokens the student's ids, and the
catalog's codes must be the ones the tokenizer writes (its levels and codebook size): the same ids meaning other
tokens trains silently. ``actor.model.allow_other_tokenizer=true`` accepts a known-compatible case.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass

import numpy as np

from megatron_onereason.checkpoint.mcore_io import HF_ASSETS, MODEL_JSON, CheckpointModelInfo, checkpoint_iteration_dir
from megatron_onereason.tokenizer.fingerprint import (
    check_same_tokenizer,
    describe,
    has_tokenizer_files,
    tokenizer_fingerprint,
)
from megatron_onereason.tokenizer.item_catalog import MANIFEST_FILE, ItemCatalog, catalog_manifest
from megatron_onereason.tokenizer.itemic_tokens import TokenizerFiles

ENGINE_STATE_DIR = "rl_engine_state"
log = logging.getLogger("megatron_onereason.rl")


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


OVERRIDE = "actor.model.allow_other_tokenizer"


def check_tokenizers(cfg) -> None:
    """Refuse an actor checkpoint, teachers or a catalog made for another tokenizer than ``rollout.model_dir``'s
    (module docstring), each in one line naming both sides and what makes them agree. Paths that do not exist are
    left to the checks that name them."""
    from megatron_onereason.cli import UserError

    rollout = cfg.rollout.model_dir
    if not has_tokenizer_files(rollout):
        return
    ours, where = tokenizer_fingerprint(rollout), f"rollout.model_dir={rollout}"
    allowed = cfg.actor.model.allow_other_tokenizer
    load = cfg.actor.model.load
    if load and os.path.isfile(os.path.join(load, MODEL_JSON)):
        from megatron_onereason.model.qwen3_config import Qwen3Config

        export = (f"export this checkpoint (checkpoints_convert/mcore_to_hf.py --mcore-dir {load} --out-dir DIR) and "
                  "set rollout.model_dir=DIR")
        assets = os.path.join(load, HF_ASSETS)
        if has_tokenizer_files(assets):
            check_same_tokenizer("actor.model.load", load, tokenizer_fingerprint(assets), ours, where,
                                 f"{export}, or load the checkpoint trained from rollout.model_dir", OVERRIDE, allowed,
                                 made_by=assets)
        actor_vocab = CheckpointModelInfo.load(load).config.vocab_size
        rollout_vocab = Qwen3Config.from_hf_dir(rollout).vocab_size
        if actor_vocab != rollout_vocab:  # no override: the rollout serves the actor's weights
            raise UserError(f"actor.model.load={load}: a model of {actor_vocab} tokens, but {where} has "
                            f"{rollout_vocab}: {export}")
    teachers = {} if cfg.algorithm == "grpo" else cfg.mopd.teachers
    for domain, teacher in sorted(teachers.items()):
        if has_tokenizer_files(teacher):
            check_same_tokenizer(f"mopd.teachers.{domain}", teacher, tokenizer_fingerprint(teacher), ours, where,
                                 f"use a teacher trained from the student's model ({rollout})", OVERRIDE, allowed)
    general = cfg.mopd.general_teacher if cfg.algorithm == "mopd" else None
    if has_tokenizer_files(general) and not allowed:
        student = TokenizerFiles(rollout).vocab()
        moved = [(token, i) for token, i in TokenizerFiles(general).vocab().items() if student.get(token) != i]
        if moved:
            token, i = min(moved, key=lambda t: t[1])
            theirs = "absent" if student.get(token) is None else f"id {student.get(token)}"
            raise UserError(f"mopd.general_teacher={general}: {len(moved)} of its tokens have other ids in the "
                            f"student's tokenizer ({where}), e.g. {token!r}: id {i} in the teacher, {theirs} in the "
                            f"student: use the base model {rollout} was extended from, or set {OVERRIDE}=true if they "
                            "mean the same text")
    check_catalog_codes(cfg.data.catalog, rollout, ours, allowed)


def check_catalog_codes(catalog_dir: str, rollout: str, fingerprint: dict, allowed: bool) -> None:
    """The catalog's levels and codebook size must be the rollout tokenizer's: items are written with its tokens."""
    from megatron_onereason.cli import UserError

    itemic = fingerprint.get("itemic")
    if not itemic or not os.path.isfile(os.path.join(catalog_dir or "", MANIFEST_FILE)):
        return
    manifest = catalog_manifest(catalog_dir)
    levels, size = int(manifest["levels"]), int(manifest["codebook_size"])
    if (levels, size) == (itemic["levels"], itemic["codebook_size"]):
        return
    fits = levels == itemic["levels"] and size < itemic["codebook_size"]  # every code has a token, if not its own
    message = (f"data.catalog={catalog_dir}: items of {levels} levels x {size} codes, but the rollout tokenizer "
               f"(rollout.model_dir={rollout}) has {describe(fingerprint)}: use the catalog that tokenizer was "
               f"extended for, or extend the base model for this catalog (tools/extend_vocab.py --levels {levels} "
               f"--codebook-size {size}) and train from it")
    if not fits:
        raise UserError(message)
    if not allowed:
        raise UserError(f"{message}; or set {OVERRIDE}=true if the codes mean the same items")
    log.warning("%s: used anyway (%s)", message, OVERRIDE)
