"""Loss of packed sequences: one sum per global target token, with itemic / text / per-source breakdowns."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch


def loss_breakdown(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, labels: torch.Tensor,
                   source_ids: torch.Tensor, itemic_ranges: Sequence[Tuple[int, int]], num_sources: int) -> torch.Tensor:
    """Sums and counts of one micro-batch, as one vector so they reduce in one collective.

    Layout: ``[loss, n, itemic_loss, n_itemic, text_loss, n_text, src_0_loss .. src_{k-1}_loss, src_0_n ..]``.
    A token is *itemic* when the token it predicts (its label) is an itemic token: in one of the half-open id runs
    ``itemic_ranges`` (:attr:`ItemicVocab.id_ranges`; empty without itemic tokens). Sums are float64 so that the
    means logged over a global batch do not depend on how it is split into micro-batches and ranks.
    """
    loss = per_token_loss.reshape(-1).double()
    mask = loss_mask.reshape(-1).double()
    lab = labels.reshape(-1)
    is_itemic = torch.zeros_like(lab, dtype=torch.bool)
    for lo, hi in itemic_ranges:
        is_itemic |= (lab >= lo) & (lab < hi)
    itemic = is_itemic.double() * mask
    text = mask - itemic
    src = source_ids.reshape(-1).clamp(min=0)  # padding (-1) carries no loss: any bin works
    src_loss = torch.zeros(num_sources, dtype=torch.float64, device=loss.device).index_add_(0, src, loss * mask)
    src_n = torch.zeros(num_sources, dtype=torch.float64, device=loss.device).index_add_(0, src, mask)
    head = torch.stack([(loss * mask).sum(), mask.sum(), (loss * itemic).sum(), itemic.sum(), (loss * text).sum(),
                        text.sum()])
    return torch.cat([head, src_loss, src_n])


def breakdown_metrics(totals: torch.Tensor, source_names: List[str]) -> Dict[str, float]:
    """Means from summed :func:`loss_breakdown` vectors (a mean over no tokens is omitted)."""
    t = totals.tolist()
    k = len(source_names)
    out: Dict[str, float] = {"tokens_with_loss": t[1]}
    for name, (s, n) in {"loss": t[0:2], "loss_itemic": t[2:4], "loss_text": t[4:6]}.items():
        if n > 0:
            out[name] = s / n
    for i, src in enumerate(source_names):
        if t[6 + k + i] > 0:
            out[f"loss_source/{src}"] = t[6 + i] / t[6 + k + i]
    return out
