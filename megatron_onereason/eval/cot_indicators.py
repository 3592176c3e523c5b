"""CoT analysis indicators (OneReason §7, Table 10): two probabilistic checks and two symbolic ones.

- C1, CoT likelihood gain (eq. 21): ``ΔLL = log p(y|x, c) − log p(y|x)``. As in the paper, ``log p(y|x, c)`` is
  the thinking-mode likelihood after the generated CoT and ``log p(y|x)`` the non-thinking-mode likelihood.
- C2, log-likelihood progression (eqs. 22–23): ``ℓ_t = log p(y|x, c_1..c_t)`` for each CoT prefix of t segments,
  ``t = 0`` being the thinking mode with an empty CoT. The paper segments with an LLM; :func:`segment_boundaries`
  cuts at sentence ends — ``. ! ?`` and the CJK ``。！？`` of the report's Chinese CoTs — and line breaks instead
  (pass your own boundaries to use another segmentation).
- C3, item legality (eq. 24): ``γ_legal = |S(c) ∩ V_item| / |S(c)|``.
- C4, history validity given legality (eq. 25): ``γ_hist|legal = |S(c) ∩ V_item ∩ S(x_hist)| / |S(c) ∩ V_item|``.

``S(c)`` is the *set* of itemic patterns the CoT writes (:func:`cot_item_references`); a malformed one (a begin
token not followed by one code per level, or without the scheme's end token) is in ``S(c)`` and never legal. The ratios are ``None`` when their
denominator is empty (a CoT citing no item says nothing about legality).
"""
from __future__ import annotations

from typing import AbstractSet, Container, List, Optional, Sequence

import torch

from megatron_onereason.generation.prompts import ChatTokens
from megatron_onereason.tokenizer.item_catalog import ItemCatalog, UnknownItemError
from megatron_onereason.tokenizer.itemic_tokens import ItemicPatternError, ItemicScheme

_SEGMENT_END = (".", "!", "?")  # ends a segment at the end of a token (not inside "3.5" or a URL)
_CJK_SEGMENT_END = ("。", "！", "？")  # ends a segment anywhere in a token (closing quotes may follow)


@torch.inference_mode()
def target_log_likelihoods(model, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                           batch_size: int = 8) -> torch.Tensor:
    """``Σ_i log p(target_i | context, target_<i)`` per pair (float64 [n]), teacher-forced with ``model``."""
    if len(contexts) != len(targets):
        raise ValueError(f"{len(contexts)} contexts but {len(targets)} targets")
    if any(not c for c in contexts) or any(not t for t in targets):
        raise ValueError("contexts and targets must be non-empty")
    device = next(model.parameters()).device
    out = torch.zeros(len(contexts), dtype=torch.float64)
    for start in range(0, len(contexts), batch_size):
        pairs = list(zip(contexts[start:start + batch_size], targets[start:start + batch_size]))
        seqs = [list(c) + list(t) for c, t in pairs]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, s in enumerate(seqs):  # right padding: positions start at 0 in every row
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.double(), -1)
        for row, (context, target) in enumerate(pairs):
            positions = torch.arange(len(context) - 1, len(context) - 1 + len(target))
            out[start + row] = logp[row, positions, torch.tensor(list(target))].sum().cpu()
    return out


def cot_context(thinking_prompt_ids: Sequence[int], reasoning_ids: Sequence[int], chat: ChatTokens) -> List[int]:
    """``x, c`` in thinking mode: the prompt (ending ``<think>\\n``), the reasoning, ``</think>`` and the separator."""
    return list(thinking_prompt_ids) + list(reasoning_ids) + [chat.think_end_id] + list(chat.answer_separator_ids)


def cot_likelihood_gain(model, thinking_contexts: Sequence[Sequence[int]], plain_contexts: Sequence[Sequence[int]],
                        targets: Sequence[Sequence[int]], batch_size: int = 8) -> torch.Tensor:
    """Eq. 21 per sample: ``log p(y | x, c) − log p(y | x)`` (float64 [n]).

    ``thinking_contexts``: :func:`cot_context`; ``plain_contexts``: the non-thinking prompt (empty think block).
    """
    with_cot = target_log_likelihoods(model, thinking_contexts, targets, batch_size)
    return with_cot - target_log_likelihoods(model, plain_contexts, targets, batch_size)


def decoded_token_texts(tokenizer, token_ids: Sequence[int]) -> List[str]:
    """The text each token completes, for :func:`segment_boundaries`: a character split over several byte-level
    tokens (a CJK character is 3 UTF-8 bytes, often several tokens) belongs to the token that completes it; the
    tokens before it get ``""``. Joined, the texts are ``tokenizer.decode(token_ids)``."""
    texts: List[str] = []
    start = 0
    for i in range(len(token_ids)):
        text = tokenizer.decode(list(token_ids[start:i + 1]))
        if text.endswith("\ufffd") and i + 1 < len(token_ids):
            texts.append("")  # an incomplete character: wait for the token that completes it
            continue
        texts.append(text)
        start = i + 1
    return texts


def segment_boundaries(token_texts: Sequence[str]) -> List[int]:
    """End offsets (exclusive) of the CoT segments ``c_1..c_T`` (eq. 22) over the reasoning tokens.

    A segment ends after a token that contains a newline or a CJK sentence end (``。！？``), or whose text ends with
    ``. ! ?``; the last segment ends at the end. ``token_texts``: per-token text (:func:`decoded_token_texts`).
    """
    ends = [i + 1 for i, text in enumerate(token_texts)
            if "\n" in text or any(c in text for c in _CJK_SEGMENT_END) or text.rstrip().endswith(_SEGMENT_END)]
    if token_texts and (not ends or ends[-1] != len(token_texts)):
        ends.append(len(token_texts))
    return ends


def likelihood_progression(model, thinking_prompt_ids: Sequence[int], reasoning_ids: Sequence[int],
                           boundaries: Sequence[int], target_ids: Sequence[int], chat: ChatTokens,
                           batch_size: int = 8) -> List[float]:
    """Eq. 23: ``[ℓ_0, ℓ_1, …, ℓ_T]``, ``ℓ_t`` the target log-likelihood after the first t segments."""
    if list(boundaries) != sorted(set(boundaries)) or any(not 0 < b <= len(reasoning_ids) for b in boundaries):
        raise ValueError(f"boundaries must increase within (0, {len(reasoning_ids)}], got {list(boundaries)}")
    contexts = [cot_context(thinking_prompt_ids, reasoning_ids[:end], chat) for end in [0, *boundaries]]
    return target_log_likelihoods(model, contexts, [target_ids] * len(contexts), batch_size).tolist()


def cot_item_references(text: str, scheme: ItemicScheme) -> set:
    """``S(c)``: the distinct itemic patterns written in ``text``, malformed ones included as written."""
    return set(m.group(0) for m in scheme.loose_item_re.finditer(text))


class CatalogPatterns:
    """``V_item`` as a container of pattern strings: ``pattern in CatalogPatterns(catalog, scheme)``."""

    def __init__(self, catalog: ItemCatalog, scheme: ItemicScheme):
        self.catalog = catalog
        self.scheme = scheme

    def __contains__(self, pattern: object) -> bool:
        if not isinstance(pattern, str):
            return False
        try:
            self.catalog.item_id_from_text(pattern, self.scheme)
        except (ItemicPatternError, UnknownItemError):
            return False
        return True


def item_legality(references: AbstractSet[str], catalog: Container[str]) -> Optional[float]:
    """Eq. 24: ``|S(c) ∩ V_item| / |S(c)|``; None when the CoT cites no item."""
    if not references:
        return None
    return sum(r in catalog for r in references) / len(references)


def history_validity(references: AbstractSet[str], catalog: Container[str],
                     history: AbstractSet[str]) -> Optional[float]:
    """Eq. 25: ``|S(c) ∩ V_item ∩ S(x_hist)| / |S(c) ∩ V_item|``; None when the CoT cites no legal item."""
    legal = {r for r in references if r in catalog}
    if not legal:
        return None
    return len(legal & set(history)) / len(legal)
