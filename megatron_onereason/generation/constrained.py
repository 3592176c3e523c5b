"""Constrained itemic decoding: once a begin token is emitted, only catalog continuations a → b → c (→ end token).

The state of a sequence is read from its last ``levels + 1`` tokens — the last begin token there and the code
tokens after it — so the same rule serves the batched transformers loop (:class:`ItemicConstraint`) and the vLLM
logits processors (:class:`TokenRule` and :func:`rule_masks`), with no per-request state to keep in sync. The
catalog lookups are :class:`~megatron_onereason.tokenizer.item_trie.ItemTrie`'s, keyed by what the begin token says
(the domain, or nothing for a begin token shared by all domains). Without a trie the constraint only enforces the
scheme's pattern: any code of the right level, then the end token (OpenOneRec's decoding over the code tokens).

Inside an item whose codes are complete, the scheme's end token (the one matching the begin token) is the only
allowed token. Outside an itemic pattern every token stays allowed except end tokens and the begin tokens of
domains with no catalog item (no continuation would exist). At an *item start* (the first item token when the begin
token is not forced) only the begin tokens of domains with items are allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

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

    def pattern_rows(self, histories: Sequence[Sequence[int]]) -> Tuple[List[int], Optional[torch.Tensor]]:
        """The indices of the histories that end inside an itemic pattern, and their allowed tokens
        ``[len(indices), vocab_size]`` (``None`` when there is none): the matching end token once the codes are
        complete, else the next level's codes — any of them without a trie, the catalog continuations with one."""
        inside, states = [], []
        for b, history in enumerate(histories):
            state = self.item_state(history)
            if state is not None:
                inside.append(b)
                states.append(state)
        if not inside:
            return inside, None
        rows = torch.zeros(len(inside), self.vocab_size, dtype=torch.bool)
        trie_rows, domains, prefixes = [], [], []
        for r, (key, codes) in enumerate(states):
            if len(codes) == self.vocab.levels:  # complete: its end token
                rows[r, self.vocab.end_ids[key]] = True
            elif self.trie is None:
                rows[r] = self._code_rows[len(codes)]
            else:
                trie_rows.append(r)
                domains.append(key)
                prefixes.append(codes)
        if trie_rows:
            allowed = self.trie.allowed_token_mask(self.vocab, domains, prefixes, vocab_size=self.vocab_size)
            empty = (~allowed.any(dim=1)).nonzero().flatten().tolist()
            if empty:
                b = empty[0]
                raise ValueError(f"row {inside[trie_rows[b]]}: no catalog item under begin key {domains[b]!r} "
                                 f"continues codes {list(prefixes[b])} (the pattern was generated without the "
                                 "constraint?)")
            rows[trie_rows] = allowed
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
    """Refuse requests a backend cannot serve: constrained decoding without a constraint, a prompt domain the
    vocabulary lacks, or (constrained) one whose begin key has no catalog item. ``domains``: each prompt's target
    domain (None: any)."""
    if constrained and constraint is None:
        raise ValueError("constrained decoding needs a constraint (pass the catalog / trie, or constrained=False)")
    for i, domain in enumerate(domains):
        if domain is not None:
            key = vocab.scheme.begin_key(domain)  # raises for a domain the vocabulary lacks
            if constrained and key not in constraint.live_keys:
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
        valid = torch.arange(width) < num_valid
        valid[list(banned)] = False
        template = valid.clone()
        if trie:
            if constraint is None:
                raise ValueError("a TokenRule with trie=True needs the catalog constraint")
            # outside a pattern: no end token, no begin token of a domain without items
            template[: constraint.vocab_size] &= constraint.free_row
            template[constraint.vocab_size:] = False
        mask[rows] = template.to(device)
        if trie:
            inside, pattern_rows = constraint.pattern_rows([histories[b] for b in rows])
            if inside:  # inside a pattern the pattern decides (an end token included), within the valid ids
                pattern = [rows[i] for i in inside]
                mask[pattern] = False
                mask[pattern, : constraint.vocab_size] = (pattern_rows & valid[: constraint.vocab_size]).to(device)
    return mask
