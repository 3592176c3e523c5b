"""Constrained itemic decoding: once ``<|domain_begin|>`` is emitted, only catalog continuations a → b → c.

The state of a sequence is read from its last ``levels + 1`` tokens — the last begin token there and the code
tokens after it — so the same rule serves the batched transformers loop (:class:`ItemicConstraint`) and the vLLM
logits processors (:class:`TokenRule` and :func:`rule_masks`), with no per-request state to keep in sync. The
catalog lookups are :class:`~megatron_onereason.tokenizer.item_trie.ItemTrie`'s.

Outside an itemic pattern every token stays allowed except the begin tokens of domains with no catalog item (no
continuation would exist). At an *item start* (the first item token when the begin token is not forced) only the
begin tokens of domains with items are allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab

ItemState = Tuple[str, Tuple[int, ...]]  # (domain, codes so far), fewer codes than levels


def decode_code(vocab: ItemicVocab, token_id: int) -> Optional[Tuple[int, int]]:
    """``(level, code)`` of a code token, else None."""
    offset = int(token_id) - vocab.code_id(0, 0)
    if not 0 <= offset < vocab.levels * vocab.codebook_size:
        return None
    return divmod(offset, vocab.codebook_size)


def decode_begin(vocab: ItemicVocab, token_id: int) -> Optional[str]:
    """The domain of a begin token, else None."""
    index = int(token_id) - vocab.first_id
    return vocab.domains[index] if 0 <= index < len(vocab.domains) else None


def decode_item(vocab: ItemicVocab, token_ids: Sequence[int]) -> Optional[ItemState]:
    """``(domain, codes)`` when ``token_ids`` is exactly one complete itemic pattern, else None."""
    if len(token_ids) != vocab.levels + 1:
        return None
    domain = decode_begin(vocab, token_ids[0])
    codes = [decode_code(vocab, t) for t in token_ids[1:]]
    if domain is None or any(c is None or c[0] != level for level, c in enumerate(codes)):
        return None
    return domain, tuple(c[1] for c in codes)


class ItemicConstraint:
    def __init__(self, trie: ItemTrie, vocab: ItemicVocab, vocab_size: int):
        """``vocab_size``: width of the logits (the model's, padding rows included)."""
        if vocab.levels != trie.levels or vocab.codebook_size < trie.codebook_size:
            raise ValueError(f"vocabulary has {vocab.levels} levels x {vocab.codebook_size} codes, the catalog "
                             f"{trie.levels} x {trie.codebook_size}")
        if vocab_size < vocab.end_id:
            raise ValueError(f"logits width {vocab_size} is smaller than the itemic token range end {vocab.end_id}")
        self.trie = trie
        self.vocab = vocab
        self.vocab_size = vocab_size
        live = [vocab.begin_id(d) for d in vocab.domains if d in trie.domains]
        if not live:
            raise ValueError("the catalog has no item in any domain of the vocabulary")
        self.live_begin_ids = tuple(live)
        self.free_row = torch.ones(vocab_size, dtype=torch.bool)
        self.free_row[[vocab.begin_id(d) for d in vocab.domains if vocab.begin_id(d) not in live]] = False
        self.item_start_row = torch.zeros(vocab_size, dtype=torch.bool)  # an item's first token: a live begin
        self.item_start_row[list(live)] = True

    def item_state(self, token_ids: Sequence[int]) -> Optional[ItemState]:
        """``(domain, codes)`` when ``token_ids`` ends inside an unfinished itemic pattern, else None."""
        tail = [int(t) for t in token_ids[-(self.vocab.levels + 1):]]
        for pos in range(len(tail) - 1, -1, -1):
            domain = decode_begin(self.vocab, tail[pos])
            if domain is not None:
                break
        else:
            return None
        codes = []
        for level, tok in enumerate(tail[pos + 1:]):
            decoded = decode_code(self.vocab, tok)
            if decoded is None or decoded[0] != level:
                return None  # a broken pattern: nothing to continue
            codes.append(decoded[1])
        return (domain, tuple(codes)) if len(codes) < self.vocab.levels else None

    def pattern_rows(self, histories: Sequence[Sequence[int]]) -> Tuple[List[int], Optional[torch.Tensor]]:
        """The indices of the histories that end inside an itemic pattern, and their allowed tokens
        ``[len(indices), vocab_size]`` from the trie (``None`` when there is none)."""
        inside, domains, prefixes = [], [], []
        for b, history in enumerate(histories):
            state = self.item_state(history)
            if state is not None:
                inside.append(b)
                domains.append(state[0])
                prefixes.append(state[1])
        if not inside:
            return inside, None
        rows = self.trie.allowed_token_mask(self.vocab, domains, prefixes, vocab_size=self.vocab_size)
        empty = (~rows.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            b = empty[0]
            raise ValueError(f"row {inside[b]}: no catalog item of domain {domains[b]!r} continues codes "
                             f"{list(prefixes[b])} (the pattern was generated without the constraint?)")
        return inside, rows

    def allowed(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Boolean ``[B, vocab_size]``: the tokens allowed after each history (its last ``levels + 1`` tokens)."""
        mask = self.free_row.expand(len(histories), -1).clone()
        inside, rows = self.pattern_rows(histories)
        if inside:
            mask[inside] = rows
        return mask


def check_prompt_domains(domains: Sequence[Optional[str]], constrained: bool, vocab: ItemicVocab,
                         constraint: Optional[ItemicConstraint]) -> None:
    """Refuse requests a backend cannot serve: constrained decoding without a catalog, a prompt domain the vocabulary
    lacks, or (constrained) one with no catalog item. ``domains``: each prompt's target domain (None: any)."""
    if constrained and constraint is None:
        raise ValueError("constrained decoding needs a catalog (pass the catalog / trie, or constrained=False)")
    for i, domain in enumerate(domains):
        if domain is not None:
            vocab.begin_id(domain)  # raises for a domain the vocabulary lacks
            if constrained and domain not in constraint.trie.domains:
                raise ValueError(f"prompt {i}: the catalog has no item of domain {domain!r}")


@dataclass(frozen=True)
class TokenRule:
    """What one engine request may emit at each output step (vLLM requests; the batched loop builds its own masks).

    Output step ``s < len(forced)`` allows exactly ``forced[s]`` (the tokens that close a reasoning trace, or given
    tokens being scored). At step ``len(forced)``, ``first`` — when set — lists the allowed tokens (an item start:
    the live begin tokens, or the one begin token the prompt's domain forces). Every other step allows the valid
    tokens (ids below the tokenizer size) except ``banned`` (stop tokens inside a reasoning trace) and, with
    ``trie``, only what :meth:`ItemicConstraint.allowed` allows (catalog continuations inside itemic patterns).
    """

    forced: Tuple[int, ...] = ()
    first: Optional[Tuple[int, ...]] = None
    banned: Tuple[int, ...] = ()
    trie: bool = False

    def to_args(self) -> Dict[str, object]:
        """Plain lists and scalars (travels in ``SamplingParams.extra_args``)."""
        return {"forced": list(self.forced), "first": None if self.first is None else list(self.first),
                "banned": list(self.banned), "trie": self.trie}

    @classmethod
    def from_args(cls, args: Dict[str, object]) -> "TokenRule":
        first = args.get("first")
        return cls(tuple(args.get("forced", ())), None if first is None else tuple(first),
                   tuple(args.get("banned", ())), bool(args.get("trie", False)))


def rule_masks(rules: Sequence[TokenRule], steps: Sequence[int], histories: Sequence[Sequence[int]],
               num_valid: int, width: int, constraint: Optional[ItemicConstraint] = None,
               device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Boolean ``[B, width]`` on ``device``: the tokens row ``b`` may emit at output step ``steps[b]`` under
    ``rules[b]``.

    ``histories[b]``: the tokens before that step (prompt and outputs; the last ``levels + 1`` are read), needed by
    rules with ``trie``, which also need ``constraint``. Columns at or past ``num_valid`` are never allowed unless
    forced. Built for a decoding step of a large batch: rows share one template row per (banned, trie); only rows
    inside an itemic pattern get their own trie row.
    """
    mask = torch.zeros(len(rules), width, dtype=torch.bool, device=device)
    point_rows: List[int] = []
    point_cols: List[int] = []
    free: Dict[Tuple[Tuple[int, ...], bool], List[int]] = {}
    for b, (rule, step) in enumerate(zip(rules, steps)):
        if step < len(rule.forced):
            point_rows.append(b)
            point_cols.append(rule.forced[step])
        elif step == len(rule.forced) and rule.first is not None:
            point_rows += [b] * len(rule.first)
            point_cols += list(rule.first)
        else:
            free.setdefault((rule.banned, rule.trie), []).append(b)
    if point_rows:
        mask[point_rows, point_cols] = True
    for (banned, trie), rows in free.items():
        template = torch.arange(width) < num_valid
        template[list(banned)] = False
        if trie:
            if constraint is None:
                raise ValueError("a TokenRule with trie=True needs the catalog constraint")
            template[: constraint.vocab_size] &= constraint.free_row  # no begin token of a domain without items
            template[constraint.vocab_size:] = False
        mask[rows] = template.to(device)
        if trie:
            inside, trie_rows = constraint.pattern_rows([histories[b] for b in rows])
            if inside:
                pattern = [rows[i] for i in inside]
                mask[pattern, : constraint.vocab_size] &= trie_rows.to(device)
    return mask
