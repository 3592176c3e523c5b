"""A map-style dataset of packed sequences over one or more blended preprocessed corpora, and its plan cache.

``build_packed_dataset`` opens each blend component's IndexedDataset pair, blends documents by token ratio
(:mod:`~megatron_onereason.data.blending`), plans packs over their lengths (:func:`~.packing.plan_packs`) and
returns a :class:`PackedDataset` whose item ``i`` is pack ``i`` materialised from the memory-mapped files.

Planning a pre-training blend (OneReason's 578B tokens: hundreds of millions of documents) takes minutes and GBs,
so the plans are built once and saved next to the data (:func:`cached_plans`): one directory per key, the key a
hash of the inputs' document lengths (all the plan depends on), the blend and the packing settings. Every rank
memory-maps the saved arrays (:func:`load_plans`) instead of planning: no per-rank copy, no per-rank start-up cost.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megatron_onereason.data.blending import BlendConfig, BlendPlan, blend_documents
from megatron_onereason.data.indexed import IndexedPair
from megatron_onereason.data.packing import (
    Pack,
    PackingConfig,
    PackingStats,
    PackPlan,
    assemble_pack,
    plan_packs,
)

log = logging.getLogger(__name__)


def pack_item(pack: Pack) -> Dict[str, Union[torch.Tensor, int]]:
    """A :class:`~.packing.Pack` as the dataset yields it: its arrays as tensors, ``num_documents`` as an int."""
    out: Dict[str, Union[torch.Tensor, int]] = {
        name: torch.from_numpy(getattr(pack, name))
        for name in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "source_ids")
    }
    out["num_documents"] = pack.num_documents
    return out


class PackedDataset(torch.utils.data.Dataset):
    """Item ``i``: a dict of 1-D tensors (one packed sequence; the model adds the batch dimension of 1).

    Keys: ``tokens``, ``labels``, ``loss_mask``, ``position_ids``, ``cu_seqlens``, ``source_ids`` (tensors, see
    :class:`~.packing.Pack`), and ``num_documents`` (int). ``source_names[k]`` names source id ``k``.
    """

    def __init__(self, sources: Sequence[IndexedPair], blend: BlendPlan, plan: PackPlan, pad_id: int) -> None:
        if len(sources) != len(blend.names):
            raise ValueError(f"{len(sources)} sources but the blend names {len(blend.names)}")
        self.sources = list(sources)
        self.blend = blend
        self.plan = plan
        self.pad_id = pad_id
        self.source_names = list(blend.names)

    def __len__(self) -> int:
        return len(self.plan)

    def pack(self, index: int) -> Pack:
        chunks = self.plan.pack_slice(index)
        tokens, targets, source_ids = [], [], []
        for doc, start, length in zip(self.plan.chunk_doc[chunks], self.plan.chunk_start[chunks],
                                      self.plan.chunk_length[chunks]):
            source = int(self.blend.source_of[doc])
            t, m = self.sources[source].read(int(self.blend.doc_of[doc]), int(start), int(length))
            tokens.append(t)
            targets.append(m)
            source_ids.append(source)
        return assemble_pack(tokens, targets, source_ids, self.plan.seq_length, self.pad_id)

    def __getitem__(self, index: int) -> Dict[str, Union[torch.Tensor, int]]:
        return pack_item(self.pack(index))

    def stats(self) -> Dict:
        return {"blend": self.blend.stats(), "packing": self.plan.stats.to_dict()}


PLAN_FORMAT = 1
PLAN_META = "plan.json"  # written last: a plan directory without it is incomplete
PLAN_DIR = "pack_plans"  # default cache: beside the first blend component's files
_BLEND_ARRAYS = ("source_of", "doc_of", "lengths")
_PACK_ARRAYS = ("chunk_doc", "chunk_start", "chunk_length", "pack_offsets")


def plan_dataset(lengths_per_source: Sequence[np.ndarray], blend: BlendConfig,
         packing: PackingConfig) -> Tuple[BlendPlan, PackPlan]:
    """Blend by token ratio, then plan packs over the blended documents' lengths (deterministic given the seeds)."""
    blended = blend_documents(lengths_per_source, [c.weight for c in blend.components],
                              [c.name for c in blend.components], blend.total_tokens, blend.seed)
    return blended, plan_packs(blended.lengths, packing)


def plan_key(lengths_per_source: Sequence[np.ndarray], blend: BlendConfig, packing: PackingConfig) -> str:
    """Fingerprint of everything a plan depends on: each source's document lengths (hashed, ~2 GB/s), the blend's
    names, weights, token budget and seed, and the packing settings."""
    h = hashlib.sha1(usedforsecurity=False)
    for lengths in lengths_per_source:
        data = np.ascontiguousarray(lengths)
        h.update(f"{data.dtype.str}:{data.size};".encode())
        h.update(memoryview(data).cast("B"))
    inputs = {"format": PLAN_FORMAT, "blend": [(c.name, c.weight) for c in blend.components],
              "total_tokens": blend.total_tokens, "blend_seed": blend.seed, "packing": asdict(packing)}
    h.update(json.dumps(inputs, sort_keys=True).encode())
    return h.hexdigest()[:20]


def _narrow(a: np.ndarray) -> np.ndarray:
    """The smallest signed integer dtype holding ``a`` (halves or quarters what is stored and mapped)."""
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
            return a.astype(dtype, copy=False)
    raise ValueError("integers out of int64 range")


def save_plans(directory: str, blended: BlendPlan, packs: PackPlan, key: str) -> None:
    """Write the plans into ``directory`` (created; must not exist) under a temporary name, then rename it into
    place: an interrupted save never leaves a directory that looks complete."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{directory}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for name in _BLEND_ARRAYS:
            np.save(os.path.join(tmp, f"blend_{name}.npy"), _narrow(getattr(blended, name)))
        for name in _PACK_ARRAYS:
            np.save(os.path.join(tmp, f"{name}.npy"), _narrow(getattr(packs, name)))
        meta = {"format": PLAN_FORMAT, "key": key, "names": blended.names,
                "tokens_per_source": blended.tokens_per_source.tolist(),
                "epochs_per_source": blended.epochs_per_source.tolist(),
                "seq_length": packs.seq_length, "packing_stats": packs.stats.to_dict()}
        with open(os.path.join(tmp, PLAN_META), "w") as f:
            json.dump(meta, f, indent=1)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_plans(directory: str, key: Optional[str] = None) -> Tuple[BlendPlan, PackPlan]:
    """Memory-map saved plans (read-only, shared by every process on a node through the page cache)."""
    meta_path = os.path.join(directory, PLAN_META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{meta_path}: no saved pack plan here") from None
    if meta.get("format") != PLAN_FORMAT or (key is not None and meta.get("key") != key):
        raise ValueError(f"{meta_path}: format {meta.get('format')} / key {meta.get('key')} is not the plan "
                         f"wanted (format {PLAN_FORMAT}, key {key}); delete the directory to re-plan")

    def array(name):
        return np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")

    blended = BlendPlan(**{name: array(f"blend_{name}") for name in _BLEND_ARRAYS}, names=meta["names"],
                        tokens_per_source=np.asarray(meta["tokens_per_source"], dtype=np.int64),
                        epochs_per_source=np.asarray(meta["epochs_per_source"], dtype=np.float64))
    packs = PackPlan(**{name: array(name) for name in _PACK_ARRAYS}, seq_length=meta["seq_length"],
                     stats=PackingStats(**meta["packing_stats"]))
    if packs.pack_offsets[-1] != packs.chunk_doc.size or blended.source_of.size != blended.doc_of.size:
        raise ValueError(f"{directory}: saved plan arrays disagree in size; delete the directory to re-plan")
    return blended, packs


def default_plan_cache(blend: BlendConfig) -> str:
    """``pack_plans/`` beside the first blend component's files."""
    return os.path.join(os.path.dirname(os.path.abspath(blend.components[0].prefix)), PLAN_DIR)


def cached_plans(sources: Sequence[IndexedPair], blend: BlendConfig, packing: PackingConfig,
                 cache: str) -> Tuple[str, bool]:
    """The directory holding the plans of these inputs under ``cache``, planning and saving them first if needed.

    Returns ``(directory, built)``. Run it in one process (rank 0, or ``tools/plan_packs.py`` ahead of the job);
    the others :func:`load_plans` the directory.
    """
    lengths = [np.asarray(s.lengths) for s in sources]
    key = plan_key(lengths, blend, packing)
    directory = os.path.join(cache, key)
    if os.path.exists(os.path.join(directory, PLAN_META)):
        return directory, False
    blended, packs = plan_dataset(lengths, blend, packing)
    try:
        save_plans(directory, blended, packs, key)
    except OSError as e:
        if os.path.exists(os.path.join(directory, PLAN_META)):  # another job saved the same plan first
            return directory, False
        raise OSError(f"cannot save the pack plan under {cache} ({e}); set data.plan_cache to a writable "
                      f"directory on storage every rank can read") from None
    return directory, True


def open_sources(blend: BlendConfig):
    return [IndexedPair.open(c.prefix) for c in blend.components]


def build_packed_dataset(blend: BlendConfig, packing: PackingConfig, pad_id: int,
                         plan_dir: Optional[str] = None) -> PackedDataset:
    """Open the blend's corpora and plan the packs in memory — or, with ``plan_dir`` (from :func:`cached_plans`),
    memory-map the saved plans."""
    sources = open_sources(blend)
    if plan_dir is None:
        blended, packs = plan_dataset([np.asarray(s.lengths) for s in sources], blend, packing)
    else:
        blended, packs = load_plans(plan_dir)
        if packs.seq_length != packing.seq_length or blended.names != [c.name for c in blend.components]:
            raise ValueError(f"{plan_dir}: saved plan is for other inputs (seq_length {packs.seq_length}, "
                             f"sources {blended.names})")
    dataset = PackedDataset(sources, blended, packs, pad_id)
    s = packs.stats
    log.info("packed %d documents (%d tokens) into %d packs of %d, fill %.4f; split %d, truncated %d (%d tokens), "
             "dropped %d (%d tokens), empty %d%s", s.documents, s.input_tokens, s.packs, packing.seq_length,
             s.fill_rate, s.split_documents, s.truncated_documents, s.truncated_tokens, s.dropped_documents,
             s.dropped_tokens, s.empty_documents, f" (plan {plan_dir})" if plan_dir else "")
    return dataset
