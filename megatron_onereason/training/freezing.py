"""Which parameters a stage trains (OneReason §4.4: stage 1 trains only the itemic vocabulary rows).

Whole parameters are frozen with ``requires_grad=False`` before the DDP wrapper and the optimizer are built, so
they get no gradient buffer and no optimizer state. Row-level freezing (``itemic_rows``) keeps the embedding and
untied output layer trainable on the rows of the itemic token ids — whatever ids the scheme's tokens have, as runs
of consecutive rows (:attr:`ItemicVocab.id_ranges`: one run for a contiguous block, several for scattered
tokens) — but:

* zeroes the frozen rows of ``main_grad`` after ``finalize_model_grads`` — where megatron actually accumulates
  gradients (a ``.grad`` hook would miss the fused wgrad path) and after the DP/embedding all-reduces — so they
  add nothing to the gradient norm and Adam's moments for them stay exactly 0 (update 0/(√0+ε) = 0);
* disables weight decay on those matrices (decoupled weight decay cannot be restricted to rows and would move
  frozen rows); the new rows therefore train without weight decay in stage 1.
The fp32 master copy starts equal to the weights and only ever receives zero updates on frozen rows, so the
frozen rows stay bit-identical in the model, the master copy and exported checkpoints.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab

log = logging.getLogger(__name__)

ROW_RANGE_ATTR = "onereason_trainable_rows"  # [(start, end), ...]: trainable row runs of this rank's shard
VOCAB_MATRICES = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass(frozen=True)
class TrainableSummary:
    # This rank's share of the model's elements (row-masked matrices count their trainable rows). Parameters
    # replicated over TP count on TP rank 0 only and the last pipeline stage's copy of a tied embedding not at all,
    # so the sum over the TP x PP ranks is the model's count whatever the layout.
    trainable_params: int
    total_params: int


def counted_here(param: torch.nn.Parameter, tp_rank: int) -> bool:
    """Whether this rank's copy of ``param`` counts toward the model's parameter count (see TrainableSummary)."""
    if getattr(param, "shared", False) and getattr(param, "shared_embedding", False):
        return False  # megatron's duplicate of the tied word embeddings on the last stage
    return tp_rank == 0 or getattr(param, "tensor_model_parallel", False)


def local_row_range(global_start: int, global_end: int, shard_rows: int, tp_rank: int):
    """Rows ``[global_start, global_end)`` of a vocab-parallel matrix as local rows of TP shard ``tp_rank``."""
    lo = min(max(global_start - tp_rank * shard_rows, 0), shard_rows)
    hi = min(max(global_end - tp_rank * shard_rows, 0), shard_rows)
    return lo, max(lo, hi)


def local_row_ranges(global_ranges: Sequence[Tuple[int, int]], shard_rows: int,
                     tp_rank: int) -> List[Tuple[int, int]]:
    """The parts of ``global_ranges`` on TP shard ``tp_rank``, as local rows; ``[(0, 0)]`` (train no row) when none
    falls there — never an empty list, which megatron's ``ParamKey(attr=...)`` would read as "not row-frozen"."""
    local = (local_row_range(lo, hi, shard_rows, tp_rank) for lo, hi in global_ranges)
    return [(lo, hi) for lo, hi in local if hi > lo] or [(0, 0)]


def apply_trainable(model_chunks: Sequence[torch.nn.Module], trainable: Sequence[str],
                    itemic: Optional[ItemicVocab]) -> TrainableSummary:
    """Set ``requires_grad`` (and row ranges) for ``trainable`` = ["all"] | ["itemic_rows"] | name regexes."""
    from megatron.core import parallel_state

    trainable = list(trainable)
    rows_mode = trainable == ["itemic_rows"]
    if rows_mode and itemic is None:
        raise ValueError("train.trainable=[itemic_rows] needs an itemic vocabulary (itemic_tokens.json)")
    if "itemic_rows" in trainable and not rows_mode:
        raise ValueError(f"itemic_rows cannot be combined with other trainable patterns: {trainable}")
    patterns = [] if rows_mode else [re.compile(p) for p in trainable if p != "all"]
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    trained = total = matched = 0
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            share = 1 if counted_here(param, tp_rank) else 0
            total += share * param.numel()
            if rows_mode:
                is_vocab = name.endswith(VOCAB_MATRICES)
                param.requires_grad_(is_vocab)
                if is_vocab:
                    ranges = local_row_ranges(itemic.id_ranges, param.shape[0], tp_rank)
                    setattr(param, ROW_RANGE_ATTR, ranges)
                    trained += share * sum(hi - lo for lo, hi in ranges) * param[0].numel()
            elif patterns:
                param.requires_grad_(any(p.search(name) for p in patterns))
                matched += param.requires_grad
                trained += share * param.numel() if param.requires_grad else 0
            else:
                param.requires_grad_(True)
                trained += share * param.numel()
    if patterns and matched == 0:
        raise ValueError(f"train.trainable={trainable} matches no parameter on this rank")
    return TrainableSummary(trained, total)


def row_frozen_params(model_chunks: Sequence[torch.nn.Module]) -> List[torch.nn.Parameter]:
    return [p for chunk in model_chunks for p in chunk.parameters() if hasattr(p, ROW_RANGE_ATTR)]


def mask_frozen_row_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Zero the gradient rows outside each parameter's trainable row runs (call after finalize_model_grads)."""
    for param in params:
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        if grad is None:
            continue
        start = 0
        for lo, hi in getattr(param, ROW_RANGE_ATTR):
            grad[start:lo].zero_()
            start = hi
        grad[start:].zero_()


def no_weight_decay_for_row_frozen():
    """Optimizer override (megatron ``ParamKey``): no weight decay on row-frozen matrices."""
    from megatron.core.optimizer.optimizer_config import ParamKey
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    return {ParamKey(attr=ROW_RANGE_ATTR): ParamGroupOverride(wd_mult=0.0)}
