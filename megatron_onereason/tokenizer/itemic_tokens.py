"""Itemic token naming: the single source of truth for how an item is written as text.

An item is written ``<|{domain}_begin|><a_i><b_j><c_k>`` (OneReason §4.1, OpenOneRec §2.1): a domain begin token
followed by one code token per RQ-KMeans level; there is no end token. Level ``l`` uses the letter
``LEVEL_LETTERS[l]``. Token *ids* are never hard-coded: they are read from the tokenizer, and the id ranges are
recorded in ``itemic_tokens.json`` next to an extended tokenizer (see :class:`ItemicVocab`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence, Tuple

DOMAINS: Tuple[str, ...] = ("video", "prod", "ad", "living", "sid")
LEVEL_LETTERS = "abcdefgh"
DEFAULT_LEVELS = 3
DEFAULT_CODEBOOK_SIZE = 8192
ITEMIC_JSON = "itemic_tokens.json"


class ItemicPatternError(ValueError):
    """A malformed itemic pattern, or one naming a domain/level/code the vocabulary does not have."""


def begin_token(domain: str) -> str:
    return f"<|{domain}_begin|>"


def code_token(level: int, code: int) -> str:
    return f"<{LEVEL_LETTERS[level]}_{code}>"


def itemic_token_strings(
    levels: int = DEFAULT_LEVELS,
    codebook_size: int = DEFAULT_CODEBOOK_SIZE,
    domains: Sequence[str] = DOMAINS,
) -> List[str]:
    """All new token strings in vocabulary order: domain begin tokens, then level a codes, level b codes, ..."""
    if not 1 <= levels <= len(LEVEL_LETTERS):
        raise ValueError(f"levels must be in [1, {len(LEVEL_LETTERS)}], got {levels}")
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    toks = [begin_token(d) for d in domains]
    for level in range(levels):
        toks.extend(code_token(level, c) for c in range(codebook_size))
    return toks


def format_item(domain: str, codes: Sequence[int]) -> str:
    """``format_item("prod", (12, 7, 3)) == "<|prod_begin|><a_12><b_7><c_3>"``."""
    return begin_token(domain) + "".join(code_token(lvl, int(c)) for lvl, c in enumerate(codes))


_BEGIN_RE = re.compile(r"<\|([a-z]+)_begin\|>")
_CODE_RE = re.compile(r"<([a-h])_(\d+)>")


def find_items(text: str, levels: int = DEFAULT_LEVELS) -> List[Tuple[int, int, str, Tuple[int, ...]]]:
    """Every itemic pattern in ``text`` as ``(start, end, domain, codes)``.

    A begin token must be followed immediately by exactly ``levels`` code tokens in level order;
    anything else (a missing level, a wrong letter, an unknown domain) raises :class:`ItemicPatternError`
    naming the character offset.
    """
    out = []
    for m in _BEGIN_RE.finditer(text):
        domain = m.group(1)
        if domain not in DOMAINS:
            raise ItemicPatternError(f"unknown itemic domain {domain!r} at offset {m.start()} (known: {DOMAINS})")
        pos, codes = m.end(), []
        for level in range(levels):
            cm = _CODE_RE.match(text, pos)
            if cm is None or cm.group(1) != LEVEL_LETTERS[level]:
                got = text[pos:pos + 12]
                raise ItemicPatternError(
                    f"malformed itemic pattern at offset {m.start()}: expected <{LEVEL_LETTERS[level]}_N> "
                    f"after {text[m.start():pos]!r}, got {got!r}"
                )
            codes.append(int(cm.group(2)))
            pos = cm.end()
        out.append((m.start(), pos, domain, tuple(codes)))
    return out


def parse_item(text: str, levels: int = DEFAULT_LEVELS) -> Tuple[str, Tuple[int, ...]]:
    """Parse a string that is exactly one itemic pattern into ``(domain, codes)``."""
    items = find_items(text, levels)
    if len(items) != 1 or items[0][0] != 0 or items[0][1] != len(text):
        raise ItemicPatternError(f"not exactly one itemic pattern: {text!r}")
    return items[0][2], items[0][3]


@dataclass
class ItemicVocab:
    """Where the itemic tokens live in an extended vocabulary (written as ``itemic_tokens.json``).

    Ids are contiguous: ``first_id`` is the first domain begin token, then ``len(domains)`` begin tokens, then
    ``levels`` blocks of ``codebook_size`` code tokens.
    """

    original_vocab_size: int  # embedding rows of the pretrained model (Qwen3 pads past len(tokenizer))
    first_id: int  # token id of the first new token
    levels: int = DEFAULT_LEVELS
    codebook_size: int = DEFAULT_CODEBOOK_SIZE
    domains: List[str] = field(default_factory=lambda: list(DOMAINS))

    @property
    def num_new_tokens(self) -> int:
        return len(self.domains) + self.levels * self.codebook_size

    @property
    def end_id(self) -> int:
        """One past the last itemic token id."""
        return self.first_id + self.num_new_tokens

    def begin_id(self, domain: str) -> int:
        try:
            return self.first_id + self.domains.index(domain)
        except ValueError:
            raise ItemicPatternError(f"unknown itemic domain {domain!r} (known: {self.domains})") from None

    def code_id(self, level: int, code: int) -> int:
        if not 0 <= level < self.levels:
            raise ItemicPatternError(f"level {level} outside [0, {self.levels})")
        if not 0 <= code < self.codebook_size:
            raise ItemicPatternError(
                f"code <{LEVEL_LETTERS[level]}_{code}> outside the vocabulary's codebook size {self.codebook_size}"
            )
        return self.first_id + len(self.domains) + level * self.codebook_size + code

    def level_range(self, level: int) -> Tuple[int, int]:
        start = self.code_id(level, 0)
        return start, start + self.codebook_size

    def item_ids(self, domain: str, codes: Sequence[int]) -> List[int]:
        if len(codes) != self.levels:
            raise ItemicPatternError(f"item has {len(codes)} codes, vocabulary has {self.levels} levels")
        return [self.begin_id(domain)] + [self.code_id(lvl, int(c)) for lvl, c in enumerate(codes)]

    def is_itemic(self, token_id: int) -> bool:
        return self.first_id <= token_id < self.end_id

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["num_new_tokens"] = self.num_new_tokens
        d["begin_token_ids"] = {dom: self.begin_id(dom) for dom in self.domains}
        d["level_token_ranges"] = [list(self.level_range(lvl)) for lvl in range(self.levels)]
        return d

    def save(self, directory: str) -> str:
        path = os.path.join(directory, ITEMIC_JSON)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    @classmethod
    def load(cls, directory: str) -> "ItemicVocab":
        path = os.path.join(directory, ITEMIC_JSON)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no itemic vocabulary here (run tools/extend_vocab.py first)")
        with open(path) as f:
            d = json.load(f)
        try:
            return cls(
                original_vocab_size=int(d["original_vocab_size"]),
                first_id=int(d["first_id"]),
                levels=int(d["levels"]),
                codebook_size=int(d["codebook_size"]),
                domains=list(d["domains"]),
            )
        except KeyError as e:
            raise ValueError(f"{path}: missing field {e}") from None
