"""A map-style dataset of packed sequences over one or more blended preprocessed corpora.

``build_packed_dataset`` opens each blend component's IndexedDataset pair, blends documents by token ratio
(:mod:`~megatron_onereason.data.blending`), plans packs over their lengths (:func:`~.packing.plan_packs`) and
returns a :class:`PackedDataset` whose item ``i`` is pack ``i`` materialised from the memory-mapped files.
"""
from __future__ import annotations

import logging
from typing import Dict, Sequence, Union

import numpy as np
import torch

from megatron_onereason.data.blending import BlendConfig, BlendPlan, blend_documents
from megatron_onereason.data.indexed import IndexedPair
from megatron_onereason.data.packing import Pack, PackingConfig, PackPlan, assemble_pack, plan_packs

log = logging.getLogger(__name__)


class PackedDataset(torch.utils.data.Dataset):
    """Item ``i``: a dict of 1-D tensors (one packed sequence; the model adds the batch dimension of 1).

    Keys: ``tokens``, ``labels``, ``loss_mask``, ``position_ids``, ``cu_seqlens``, ``source_ids`` (tensors, see
    :class:`~.packing.Pack`), ``num_documents`` and ``max_seqlen`` (ints). ``source_names[k]`` names source id ``k``.
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
        pack = self.pack(index)
        out: Dict[str, Union[torch.Tensor, int]] = {
            name: torch.from_numpy(getattr(pack, name))
            for name in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "source_ids")
        }
        out["num_documents"] = pack.num_documents
        out["max_seqlen"] = pack.max_seqlen
        return out

    def stats(self) -> Dict:
        return {"blend": self.blend.stats(), "packing": self.plan.stats.to_dict()}


def build_packed_dataset(blend: BlendConfig, packing: PackingConfig, pad_id: int) -> PackedDataset:
    """Open the blend's corpora, blend by token ratio and plan the packs (deterministic given the seeds)."""
    sources = [IndexedPair.open(c.prefix) for c in blend.components]
    plan = blend_documents([np.asarray(s.lengths) for s in sources], [c.weight for c in blend.components],
                           [c.name for c in blend.components], blend.total_tokens, blend.seed)
    packs = plan_packs(plan.lengths, packing)
    dataset = PackedDataset(sources, plan, packs, pad_id)
    s = packs.stats
    log.info("packed %d documents (%d tokens) into %d packs of %d, fill %.4f; split %d, truncated %d (%d tokens), "
             "dropped %d (%d tokens), empty %d", s.documents, s.input_tokens, s.packs, packing.seq_length,
             s.fill_rate, s.split_documents, s.truncated_documents, s.truncated_tokens, s.dropped_documents,
             s.dropped_tokens, s.empty_documents)
    return dataset
