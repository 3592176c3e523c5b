"""Constrained itemic decoding: once a begin token is emitted, only catalog continuations a → b → c (→ end token).

The state of a sequence is read from its last ``levels + 1`` tokens — the last begin token there and the code
tokens after it — so the same rule serves the batched transformers loop (:class:`ItemicConstraint`) and vLLM's
per-request logits processors (:class:`RequestItemicProcessor`), with no per-request state to keep in sync. The
catalog lookups are :class:`~megatron_onereason.tokenizer.item_trie.ItemTrie`'s, keyed by what the begin token says
(the domain, or nothing for a begin token shared by all domains). Without a trie the constraint only enforces the
scheme's pattern: any code of the right level, then the end token (OpenOneRec's decoding over the code tokens).

Inside an item whose codes are complete, the scheme's end token (the one matching the begin token) is the only
allowed token. Outside an itemic pattern every token stays allowed except end tokens and the begin tokens of
domains with no catalog item (no continuation would exist). At an *item start* (the first item token when the begin
token is not forced) only the begin tokens of domains with items are allowed.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab

ItemState = Tuple[Optional[str], Tuple[int, ...]]  # (begin key, codes so far); all codes only while the end is due


def decode_item(vocab: ItemicVocab, token_ids: Sequence[int], require_end: bool = True) -> Optional[ItemState]:
    """``(domain, codes)`` when ``token_ids`` is exactly one complete itemic pattern, else None."""
    return vocab.decode_item(token_ids, require_end)


class ItemicConstraint:
    def __init__(self, trie: Optional[ItemTrie], vocab: ItemicVocab, vocab_size: int):
        """``vocab_size``: width of the logits (the model's, padding rows included). ``trie=None``: the scheme's
        pattern only, every code allowed."""
        if trie is not None and (vocab.levels != trie.levels or vocab.codebook_size < trie.codebook_size):
            raise ValueError(f"vocabulary has {vocab.levels} levels x {vocab.codebook_size} codes, the catalog "
                             f"{trie.levels} x {trie.codebook_size}")
        if vocab_size <= vocab.max_id:
            raise ValueError(f"logits width {vocab_size} does not reach the largest itemic token id {vocab.max_id}")
        self.trie = trie
        self.vocab = vocab
        self.vocab_size = vocab_size
        keys = list(vocab.begin_ids) if trie is None else [k for k in vocab.begin_ids if k in trie.domains]
        if not keys:
            raise ValueError("the catalog has no item under any begin token of the vocabulary")
        self.live_keys = tuple(keys)
        self.live_begin_ids = tuple(vocab.begin_ids[k] for k in keys)
        self.free_row = torch.ones(vocab_size, dtype=torch.bool)
        dead = [i for k, i in vocab.begin_ids.items() if k not in keys]
        self.free_row[dead + list(vocab.end_ids.values())] = False
        self.item_start_row = torch.zeros(vocab_size, dtype=torch.bool)  # an item's first token: a live begin
        self.item_start_row[list(self.live_begin_ids)] = True
        self._code_rows = [torch.zeros(vocab_size, dtype=torch.bool) for _ in range(vocab.levels)]
        for level, row in enumerate(self._code_rows):
            row[torch.from_numpy(vocab.code_ids[level])] = True

    def item_state(self, token_ids: Sequence[int]) -> Optional[ItemState]:
        """``(begin key, codes)`` when ``token_ids`` ends inside an unfinished itemic pattern, else None."""
        levels = self.vocab.levels
        tail = [int(t) for t in token_ids[-(levels + 1):]]
        for pos in range(len(tail) - 1, -1, -1):
            tok = self.vocab.token(tail[pos])
            if tok is not None and tok.kind == "begin":
                break
        else:
            return None
        codes = []
        for level, t in enumerate(tail[pos + 1:]):
            tok = self.vocab.token(t)
            if tok is None or tok.kind != "code" or tok.level != level:
                return None  # a broken pattern: nothing to continue
            codes.append(tok.code)
        if len(codes) == levels and not self.vocab.end_ids:
            return None
        return self.vocab.token(tail[pos]).domain, tuple(codes)

    def allowed(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Boolean ``[B, vocab_size]``: the tokens allowed after each history (its last ``levels + 1`` tokens)."""
        mask = self.free_row.expand(len(histories), -1).clone()
        inside, domains, prefixes = [], [], []
        for b, history in enumerate(histories):
            state = self.item_state(history)
            if state is None:
                continue
            key, codes = state
            if len(codes) == self.vocab.levels:  # complete: its end token
                mask[b] = False
                mask[b, self.vocab.end_ids[key]] = True
            elif self.trie is None:
                mask[b] = self._code_rows[len(codes)]
            else:
                inside.append(b)
                domains.append(key)
                prefixes.append(codes)
        if inside:
            rows = self.trie.allowed_token_mask(self.vocab, domains, prefixes, vocab_size=self.vocab_size)
            empty = (~rows.any(dim=1)).nonzero().flatten().tolist()
            if empty:
                b = empty[0]
                raise ValueError(f"row {inside[b]}: no catalog item under begin key {domains[b]!r} continues codes "
                                 f"{list(prefixes[b])} (the pattern was generated without the constraint?)")
            mask[inside] = rows
        return mask


class RequestItemicProcessor:
    """Per-request logits processor ``(prompt_ids, output_ids, logits) -> logits`` (vLLM's request-level signature).

    ``first_token_ids``: when given, the request's first output token must be one of them (an item start: the live
    begin tokens, or the one forced begin token). ``banned_ids`` are never allowed (stop tokens inside a reasoning
    trace). Columns past ``constraint.vocab_size`` (padding) are masked too.
    """

    def __init__(self, constraint: ItemicConstraint, first_token_ids: Optional[Sequence[int]] = None,
                 banned_ids: Sequence[int] = ()):
        self.constraint = constraint
        self.first_token_ids = None if first_token_ids is None else list(first_token_ids)
        self.banned_ids = list(banned_ids)

    def __call__(self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if self.first_token_ids is not None and not output_ids:
            allowed = torch.zeros(self.constraint.vocab_size, dtype=torch.bool)
            allowed[self.first_token_ids] = True
        else:
            levels = self.constraint.vocab.levels
            allowed = self.constraint.allowed([list(prompt_ids[-(levels + 1):]) + list(output_ids)])[0]
        allowed[self.banned_ids] = False
        width = self.constraint.vocab_size
        logits[:width].masked_fill_(~allowed.to(logits.device), float("-inf"))
        logits[width:] = float("-inf")
        return logits
