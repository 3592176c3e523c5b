"""Benchmark metrics as pure functions (OneReason §3.2 and appendix B.4; OpenOneRec §3.3).

Recommendation metrics work at item level: generated itemic patterns are first decoded to item ids (an
undecodable or illegal pattern becomes ``None``, which never hits). ``predictions`` is the ranked list, best first;
the top K are its first K *positions* — a duplicate takes a position but recovers nothing new — and a list shorter
than K is used whole. ``targets`` is the ground-truth item set (duplicates collapse).

- Pass@K: 1 if any of the top K is a target. Pass@1 is the position-1 pass: the best-ranked item is a target.
- Position1_Pass@K (RecIF-Bench): 1 if the *first* ground-truth item (the user's next interaction) is among the top K.
- Recall@K: the fraction of the unique targets found among the top K.
- F1 (multi-answer selection): ``2|P ∩ G| / (|P| + |G|)`` over the predicted and gold sets (1 when both are empty).
- Accuracy (single-answer choice): the fraction of questions whose predicted option equals the gold option.
"""
from __future__ import annotations

from typing import Collection, Hashable, Optional, Sequence


def _top_k(predictions: Sequence[Optional[Hashable]], k: int) -> Sequence[Optional[Hashable]]:
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    return predictions[:k]


def _target_set(targets: Collection[Hashable]) -> set:
    unique = set(targets)
    if not unique:
        raise ValueError("an empty target set has no Pass@K / Recall@K")
    if None in unique:
        raise ValueError("None is not a valid target item")
    return unique


def pass_at_k(predictions: Sequence[Optional[Hashable]], targets: Collection[Hashable], k: int) -> float:
    """1.0 if any of the first ``k`` predictions is a target, else 0.0."""
    gold = _target_set(targets)
    return float(any(p in gold for p in _top_k(predictions, k)))


def position1_pass_at_k(predictions: Sequence[Optional[Hashable]], targets: Sequence[Hashable], k: int) -> float:
    """1.0 if ``targets[0]`` (the ground truth's first item, in its recorded order) is among the first ``k``."""
    if not targets:
        raise ValueError("an empty target list has no Position1_Pass@K")
    return pass_at_k(predictions, targets[:1], k)


def recall_at_k(predictions: Sequence[Optional[Hashable]], targets: Collection[Hashable], k: int) -> float:
    """``|unique targets among the first k predictions| / |unique targets|``."""
    gold = _target_set(targets)
    return len(gold.intersection(_top_k(predictions, k))) / len(gold)


def selection_f1(predicted: Collection[Hashable], gold: Collection[Hashable]) -> float:
    """Set F1 of a multi-answer selection (e.g. Evolution Action Selection)."""
    p, g = set(predicted), set(gold)
    if not p and not g:
        return 1.0
    return 2 * len(p & g) / (len(p) + len(g))


def choice_accuracy(predicted: Sequence[Optional[Hashable]], gold: Sequence[Hashable]) -> float:
    """Fraction of single-answer questions answered with the gold option (``None``: no parsable answer)."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} questions")
    if not gold:
        raise ValueError("accuracy over zero questions is undefined")
    return sum(p == g for p, g in zip(predicted, gold)) / len(gold)
