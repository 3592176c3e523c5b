"""Itemic token schemes: how an item is written as text, and where its tokens are in a tokenizer's vocabulary.

An item is a tuple of RQ-KMeans codes, one per level (OpenOneRec §2.1; OneReason §4.1: 3 levels × 8192 codes). How
the tuple is *written* differs between model families, so the writing is data — an :class:`ItemicScheme` — and
never code. The named presets (:data:`PRESETS`):

=====================  ===================================================  ========================================
preset                 one item                                             begin / end token
=====================  ===================================================  ========================================
``onereason_report``   ``<|video_begin|><a_12><b_7><c_3>``                   one per domain / none (OneReason §4.1)
``openonerec``         ``<|sid_begin|><s_a_12><s_b_7><s_c_3><|sid_end|>``    one shared by all domains / shared
``onereason``          ``<|video_begin|><s_a_12><s_b_7><s_c_3><|video_end|>``  one per domain / one per domain
=====================  ===================================================  ========================================

``onereason_report`` — the OneReason report's notation, which drops OpenOneRec's end token to save context — is the
embedded default (:data:`DEFAULT_SCHEME`): the synthetic corpus, the tiny CPU pipeline and ``tools/extend_vocab.py``
use it unless told otherwise. It stays the default because it is the notation of the specification and because a
per-domain begin token lets constrained decoding restrict an item to its domain's catalog. ``openonerec`` is what
released OpenOneRec checkpoints use: their ``expand_qwen3_vocab.py`` adds ``<s_a_0..K-1>``, ``<s_b_*>``, …,
``<|sid_begin|>``, ``<|sid_end|>`` with ``tokenizer.add_tokens`` (Qwen3: ids 151669–176246). ``onereason`` is the
notation of OneReason's evaluation benchmark. With a shared begin token the text does not say an item's domain:
parsed items then have domain ``None`` and an item is looked up by its codes alone.

Token ids are never derived from a layout: :class:`ItemicVocab` looks every token string up in the tokenizer, so
tokens scattered over the vocabulary work as well as one contiguous block. ``itemic_tokens.json`` next to a
tokenizer records the scheme and, as a check, the ids; loading it looks the ids up again and refuses a file that
does not describe its tokenizer. The first format (``first_id``, ``levels``, ``codebook_size``, ``domains``:
contiguous ``onereason_report`` tokens) still loads, and so does a hand-written ``{"scheme": "openonerec"}``.
"""
from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

DOMAINS: Tuple[str, ...] = ("video", "prod", "ad", "living", "sid")  # per-domain presets' domains (OneReason §4.1)
LEVEL_LETTERS = "abcdefgh"  # level l is written with LEVEL_LETTERS[l] in a code-token template's {letter}
DEFAULT_LEVELS = 3
DEFAULT_CODEBOOK_SIZE = 8192
ITEMIC_JSON = "itemic_tokens.json"
FORMAT_VERSION = 2
MARKERS_FIRST, CODES_FIRST = "markers_first", "codes_first"  # the order in which a scheme's tokens are added
_DOMAIN_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
# A token that looks itemic in any scheme: a code token (<a_12>, <s_b_7>, <item_c_3>) or a begin token (<|x_begin|>).
CODE_LIKE_RE = re.compile(r"<(?P<prefix>(?:[A-Za-z0-9]+_)*)(?P<letter>[a-h])_(?P<code>\d+)>")
ITEMIC_LIKE_RE = re.compile(CODE_LIKE_RE.pattern + r"|<\|[a-z][a-z0-9_]*_begin\|>")
_FIELD_RES = {"letter": r"(?P<{p}letter>[a-h])", "code": r"(?P<{p}code>\d+)",
              "domain": r"(?P<{p}domain>[a-z][a-z0-9_]*)"}


class ItemicPatternError(ValueError):
    """A malformed itemic pattern, or one naming a domain/level/code the scheme does not have."""


class ItemMatch(NamedTuple):
    start: int  # character offsets of the pattern in the text
    end: int
    domain: Optional[str]  # the domain its begin token names; None when the scheme's begin token is shared
    codes: Tuple[int, ...]


class ItemicToken(NamedTuple):
    kind: str  # "begin", "end" or "code"
    domain: Optional[str]  # begin/end: the begin key (the domain, None for a shared token); code: None
    level: int  # code: its level; begin/end: -1
    code: int  # code: its code; begin/end: -1


def is_domain_name(name: object) -> bool:
    """Whether ``name`` can be a domain: lower-case letters, digits and ``_``, starting with a letter (so that it can
    fill a ``<|{domain}_begin|>`` template)."""
    return isinstance(name, str) and bool(_DOMAIN_NAME.match(name))


def _fields(template: str) -> List[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def _template_re(template: str, prefix: str = "") -> str:
    """A regex for ``template``: literals escaped, ``{letter}``/``{code}``/``{domain}`` as named groups."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(re.escape(literal))
        if name is not None:
            out.append(_FIELD_RES[name].format(p=prefix))
    return "".join(out)


@dataclass(frozen=True)
class ItemicScheme:
    """How items are written: three token templates plus the code space.

    Templates: ``code_token`` holds ``{letter}`` (``a`` for level 0, ``b`` for level 1, …) and ``{code}``;
    ``begin_token`` and the optional ``end_token`` hold ``{domain}`` when there is one per domain, and no field
    when one token is shared by all domains. ``domains`` lists the domains of per-domain templates (empty for a
    shared begin token: any catalog domain is written the same way). ``token_order`` is the order in which
    ``tools/extend_vocab.py`` adds the tokens: begin/end markers first, or codes first (OpenOneRec's order).
    """

    name: str
    code_token: str
    begin_token: str
    end_token: Optional[str] = None
    levels: int = DEFAULT_LEVELS
    codebook_size: int = DEFAULT_CODEBOOK_SIZE
    domains: Tuple[str, ...] = ()
    token_order: str = MARKERS_FIRST

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(self.domains))
        where = f"itemic scheme {self.name!r}"
        if sorted(_fields(self.code_token)) != ["code", "letter"]:
            raise ValueError(f"{where}: code_token {self.code_token!r} must hold {{letter}} and {{code}} once each")
        for key, template in (("begin_token", self.begin_token), ("end_token", self.end_token)):
            if template is not None and _fields(template) not in ([], ["domain"]):
                raise ValueError(f"{where}: {key} {template!r} may hold only one {{domain}} field")
        if self.end_token is not None and "{domain}" in self.end_token and self.shared_begin:
            raise ValueError(f"{where}: a per-domain end token needs a per-domain begin token")
        if not 1 <= self.levels <= len(LEVEL_LETTERS):
            raise ValueError(f"{where}: levels must be in [1, {len(LEVEL_LETTERS)}], got {self.levels}")
        if self.codebook_size < 1:
            raise ValueError(f"{where}: codebook_size must be >= 1, got {self.codebook_size}")
        if self.token_order not in (MARKERS_FIRST, CODES_FIRST):
            raise ValueError(f"{where}: token_order must be {MARKERS_FIRST!r} or {CODES_FIRST!r}")
        if self.shared_begin and self.domains:
            raise ValueError(f"{where}: its begin token {self.begin_token!r} is shared by all domains; "
                             f"domains {list(self.domains)} do not apply")
        if not self.shared_begin:
            bad = [d for d in self.domains if not is_domain_name(d)]
            if not self.domains or bad or len(set(self.domains)) != len(self.domains):
                raise ValueError(f"{where}: needs distinct lower-case domain names for {self.begin_token!r}, "
                                 f"got {list(self.domains)}")
        markers = self.marker_strings()
        if len(set(markers)) != len(markers) or any(self._code_re.fullmatch(m) for m in markers):
            raise ValueError(f"{where}: begin/end tokens {markers[:4]} clash with each other or with code tokens")

    # ------------------------------------------------------------------------------------------ token strings
    @property
    def shared_begin(self) -> bool:
        """One begin token for all domains (the text does not say an item's domain)."""
        return "{domain}" not in self.begin_token

    @property
    def item_length(self) -> int:
        """Tokens per item: the begin token, one code per level, and the end token if the scheme has one."""
        return self.levels + 1 + (self.end_token is not None)

    def begin_key(self, domain: Optional[str]) -> Optional[str]:
        """What the begin token says about ``domain``: the domain itself, or None for a shared begin token."""
        if self.shared_begin:
            return None
        if domain not in self.domains:
            raise ItemicPatternError(f"unknown itemic domain {domain!r} (scheme {self.name!r} has {list(self.domains)})")
        return domain

    def begin_for(self, domain: Optional[str]) -> str:
        key = self.begin_key(domain)
        return self.begin_token if key is None else self.begin_token.format(domain=key)

    def end_for(self, domain: Optional[str]) -> Optional[str]:
        if self.end_token is None:
            return None
        key = self.begin_key(domain)
        return self.end_token if "{domain}" not in self.end_token else self.end_token.format(domain=key)

    def code_for(self, level: int, code: int) -> str:
        if not 0 <= level < self.levels:
            raise ItemicPatternError(f"level {level} outside the scheme's {self.levels} levels")
        if not 0 <= code < self.codebook_size:
            raise ItemicPatternError(f"code {code} of level {LEVEL_LETTERS[level]} outside the codebook size "
                                     f"{self.codebook_size}")
        return self.code_token.format(letter=LEVEL_LETTERS[level], code=code)

    def format_item(self, domain: Optional[str], codes: Sequence[int]) -> str:
        """``format_item("prod", (12, 7, 3))``: ``<|prod_begin|><a_12><b_7><c_3>`` in ``onereason_report``."""
        if len(codes) != self.levels:
            raise ItemicPatternError(f"item has {len(codes)} codes, scheme {self.name!r} has {self.levels} levels")
        return (self.begin_for(domain) + "".join(self.code_for(lvl, int(c)) for lvl, c in enumerate(codes))
                + (self.end_for(domain) or ""))

    def marker_keys(self) -> List[Optional[str]]:
        """The begin keys: the domains, or ``[None]`` for a shared begin token."""
        return [None] if self.shared_begin else list(self.domains)

    def marker_strings(self) -> List[str]:
        """Begin tokens (per begin key), then end tokens (one per distinct end token)."""
        begins = [self.begin_for(k) for k in self.marker_keys()]
        ends = list(dict.fromkeys(self.end_for(k) for k in self.marker_keys())) if self.end_token else []
        return begins + ends

    def code_strings(self, level: int) -> List[str]:
        return [self.code_token.format(letter=LEVEL_LETTERS[level], code=c) for c in range(self.codebook_size)]

    def token_strings(self) -> List[str]:
        """Every token of the scheme, in the order ``tools/extend_vocab.py`` adds them (``token_order``)."""
        codes = [t for level in range(self.levels) for t in self.code_strings(level)]
        markers = self.marker_strings()
        return codes + markers if self.token_order == CODES_FIRST else markers + codes

    # ------------------------------------------------------------------------------------------ parsing
    @cached_property
    def _code_re(self) -> "re.Pattern":
        return re.compile(_template_re(self.code_token))

    @cached_property
    def _begin_re(self) -> "re.Pattern":
        return re.compile(_template_re(self.begin_token))

    @cached_property
    def _end_re(self) -> Optional["re.Pattern"]:
        return None if self.end_token is None else re.compile(_template_re(self.end_token))

    @cached_property
    def _item_re(self) -> "re.Pattern":
        """One complete pattern, end token included (a per-domain end must repeat the begin token's domain)."""
        domain = _FIELD_RES["domain"].format(p="")
        codes = "".join(_template_re(self.code_token.replace("{letter}", letter)).replace("(?P<code>", "(?:")
                        for letter in LEVEL_LETTERS[:self.levels])
        end = "" if self.end_token is None else _template_re(self.end_token).replace(domain, "(?P=domain)")
        return re.compile(_template_re(self.begin_token) + codes + end)

    @cached_property
    def loose_item_re(self) -> "re.Pattern":
        """A begin token followed by up to ``levels`` code tokens of any level and an optional end token: what a
        text *tries* to write as an item, well formed or not."""
        end = "" if self.end_token is None else f"(?:{_template_re(self.end_token, 'e')})?"
        code = _template_re(self.code_token).replace("?P<letter>", "?:").replace("?P<code>", "?:")
        return re.compile(f"(?:{_template_re(self.begin_token, 'b')})(?:{code}){{0,{self.levels}}}{end}")

    def find_items(self, text: str, require_end: bool = True) -> List[ItemMatch]:
        """Every itemic pattern in ``text``.

        A begin token must be followed immediately by exactly ``levels`` code tokens in level order, then by its end
        token when the scheme has one (``require_end=False`` also accepts a pattern that stops after its codes, as
        generations cut at the last code do). Anything else — a missing level, a wrong letter, an unknown domain,
        another domain's end token — raises :class:`ItemicPatternError` naming the character offset.
        """
        out = []
        for m in self._begin_re.finditer(text):
            domain = m.groupdict().get("domain")
            if not self.shared_begin and domain not in self.domains:
                raise ItemicPatternError(f"unknown itemic domain {domain!r} at offset {m.start()} "
                                         f"(scheme {self.name!r} has {list(self.domains)})")
            pos, codes = m.end(), []
            for level in range(self.levels):
                cm = self._code_re.match(text, pos)
                if cm is None or cm.group("letter") != LEVEL_LETTERS[level]:
                    want = self.code_token.format(letter=LEVEL_LETTERS[level], code="N")
                    raise ItemicPatternError(f"malformed itemic pattern at offset {m.start()}: expected {want} after "
                                             f"{text[m.start():pos]!r}, got {text[pos:pos + 16]!r}")
                codes.append(int(cm.group("code")))
                pos = cm.end()
            end = self.end_for(domain)
            if end is not None:
                if text.startswith(end, pos):
                    pos += len(end)
                elif require_end or self._code_re.match(text, pos) or self._end_re.match(text, pos):
                    raise ItemicPatternError(f"malformed itemic pattern at offset {m.start()}: expected {end} after "
                                             f"{text[m.start():pos]!r}, got {text[pos:pos + 16]!r}")
            out.append(ItemMatch(m.start(), pos, domain, tuple(codes)))
        return out

    def parse_item(self, text: str, require_end: bool = True) -> Tuple[Optional[str], Tuple[int, ...]]:
        """``(domain, codes)`` of a string that is exactly one itemic pattern."""
        items = self.find_items(text, require_end)
        if len(items) != 1 or items[0].start != 0 or items[0].end != len(text):
            raise ItemicPatternError(f"not exactly one itemic pattern of scheme {self.name!r}: {text[:80]!r}")
        return items[0].domain, items[0].codes

    def count_tokens(self, text: str) -> int:
        """Number of itemic tokens written in ``text``; raises :class:`ItemicPatternError` for one the scheme lacks.

        Patterns that start with a begin token must be complete (:meth:`find_items`); bare code tokens
        (``<a_3664><b_3076>``, the prefix semantics of token-granularity data) are allowed, but each must name a level
        and code that exist. Each distinct token is checked once: texts repeat them.
        """
        if "<" not in text:
            return 0
        begins = self._begin_re.findall(text)
        if len(self._item_re.findall(text)) != len(begins):
            self.find_items(text)  # some begin token starts no complete pattern: raises, naming the offset
        if not self.shared_begin:
            for domain in set(begins):
                self.begin_key(domain)
        codes = self._code_re.findall(text)  # (letter, code) pairs, inside patterns or bare
        for letter, code in set(codes):
            level = LEVEL_LETTERS.index(letter)
            if level >= self.levels:
                raise ItemicPatternError(f"code token {self.code_token.format(letter=letter, code=code)!r}: level "
                                         f"{letter} outside the scheme's {self.levels} levels")
            if int(code) >= self.codebook_size:
                self.code_for(level, int(code))  # raises, naming the code
        ends = self._end_re.findall(text) if self._end_re is not None else []
        if "{domain}" in (self.end_token or ""):
            for domain in set(ends):
                self.begin_key(domain)
        return len(begins) + len(codes) + len(ends)

    # ------------------------------------------------------------------------------------------ files
    def to_dict(self) -> Dict:
        return {"name": self.name, "code_token": self.code_token, "begin_token": self.begin_token,
                "end_token": self.end_token, "levels": self.levels, "codebook_size": self.codebook_size,
                "domains": list(self.domains), "token_order": self.token_order}

    @classmethod
    def from_dict(cls, d: Union[str, Mapping], where: str = "itemic scheme") -> "ItemicScheme":
        """A scheme from its :meth:`to_dict` form, or from a preset name (a string)."""
        if isinstance(d, str):
            try:
                return preset(d)
            except ValueError as e:
                raise ValueError(f"{where}: field 'scheme': {e}") from None
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: 'scheme' must be a preset name or an object, got {type(d).__name__}")
        known = {"name", "code_token", "begin_token", "end_token", "levels", "codebook_size", "domains", "token_order"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown scheme field(s) {unknown} (known: {sorted(known)})")
        missing = [k for k in ("code_token", "begin_token") if k not in d]
        if missing:
            raise ValueError(f"{where}: scheme misses field(s) {missing}")
        try:
            return cls(name=str(d.get("name", "custom")), code_token=d["code_token"], begin_token=d["begin_token"],
                       end_token=d.get("end_token"), levels=int(d.get("levels", DEFAULT_LEVELS)),
                       codebook_size=int(d.get("codebook_size", DEFAULT_CODEBOOK_SIZE)),
                       domains=tuple(d.get("domains", ())), token_order=d.get("token_order", MARKERS_FIRST))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def load(cls, directory: str) -> "ItemicScheme":
        """The scheme recorded in ``DIR/itemic_tokens.json`` (strings only: no tokenizer is read)."""
        path, d = _read_json(directory)
        return _scheme_of(d, path)


def _preset_onereason_report(levels, codebook_size, domains):
    return ItemicScheme("onereason_report", "<{letter}_{code}>", "<|{domain}_begin|>", None, levels, codebook_size,
                        tuple(domains or DOMAINS), MARKERS_FIRST)


def _preset_openonerec(levels, codebook_size, domains):
    if domains:
        raise ValueError(f"itemic scheme 'openonerec' shares one begin token across domains: domains {list(domains)} "
                         "do not apply")
    return ItemicScheme("openonerec", "<s_{letter}_{code}>", "<|sid_begin|>", "<|sid_end|>", levels, codebook_size,
                        (), CODES_FIRST)


def _preset_onereason(levels, codebook_size, domains):
    return ItemicScheme("onereason", "<s_{letter}_{code}>", "<|{domain}_begin|>", "<|{domain}_end|>", levels,
                        codebook_size, tuple(domains or DOMAINS), MARKERS_FIRST)


PRESETS: Dict[str, Callable[..., ItemicScheme]] = {
    "onereason_report": _preset_onereason_report,
    "openonerec": _preset_openonerec,
    "onereason": _preset_onereason,
}


def preset(name: str, levels: int = DEFAULT_LEVELS, codebook_size: int = DEFAULT_CODEBOOK_SIZE,
           domains: Optional[Sequence[str]] = None) -> ItemicScheme:
    """A named scheme (:data:`PRESETS`) with the given code space; ``domains`` only for per-domain presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown itemic scheme {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name](levels, codebook_size, domains)


DEFAULT_SCHEME = preset("onereason_report")


# ---------------------------------------------------------------------------------------------- ids
TokenLookup = Union[Mapping[str, int], Callable[[str], Optional[int]]]


@dataclass(eq=False)
class ItemicVocab:
    """A scheme bound to a tokenizer: the id of every itemic token, looked up (never assumed contiguous).

    ``begin_ids`` / ``end_ids`` are keyed by begin key (the domain; None for a shared token); ``code_ids[l, c]`` is
    the id of code ``c`` of level ``l``. Build one with :meth:`from_lookup` or :meth:`from_tokenizer_dir`, or read
    ``itemic_tokens.json`` with :meth:`load`.
    """

    scheme: ItemicScheme
    begin_ids: Dict[Optional[str], int]
    end_ids: Dict[Optional[str], int]
    code_ids: np.ndarray  # int64 [levels, codebook_size]
    original_vocab_size: Optional[int] = None  # embedding rows before the extension, when this project extended it
    _token_of_id: Dict[int, ItemicToken] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.code_ids = np.asarray(self.code_ids, dtype=np.int64)
        s = self.scheme
        if self.code_ids.shape != (s.levels, s.codebook_size):
            raise ValueError(f"code_ids has shape {self.code_ids.shape}, scheme needs ({s.levels}, {s.codebook_size})")
        tokens: Dict[int, ItemicToken] = {}
        for key, i in self.begin_ids.items():
            tokens[int(i)] = ItemicToken("begin", key, -1, -1)
        for key, i in self.end_ids.items():
            tokens.setdefault(int(i), ItemicToken("end", key, -1, -1))
        for level in range(s.levels):
            for code, i in enumerate(self.code_ids[level].tolist()):
                tokens[i] = ItemicToken("code", None, level, code)
        distinct_ends = len(set(self.end_ids.values()))
        if len(tokens) != len(set(self.begin_ids.values())) + distinct_ends + self.code_ids.size \
                or min(tokens, default=0) < 0:
            raise ValueError(f"itemic scheme {s.name!r}: two itemic tokens share an id (or an id is negative)")
        self._token_of_id = tokens

    @classmethod
    def from_lookup(cls, scheme: ItemicScheme, lookup: TokenLookup, where: str = "tokenizer",
                    original_vocab_size: Optional[int] = None) -> "ItemicVocab":
        """Look every token of ``scheme`` up (``lookup``: token -> id, a mapping or a function returning None)."""
        get = lookup.get if isinstance(lookup, Mapping) else lookup
        missing: List[str] = []

        def find(token: str) -> int:
            i = get(token)
            if i is None:
                missing.append(token)
                return -1
            return int(i)

        begin = {k: find(scheme.begin_for(k)) for k in scheme.marker_keys()}
        end = {k: find(scheme.end_for(k)) for k in scheme.marker_keys()} if scheme.end_token else {}
        codes = np.array([[find(t) for t in scheme.code_strings(level)] for level in range(scheme.levels)],
                         dtype=np.int64).reshape(scheme.levels, scheme.codebook_size)
        if missing:
            raise ValueError(f"{where}: lacks {len(missing)} of the {len(scheme.token_strings())} tokens of itemic "
                             f"scheme {scheme.name!r} (first missing: {missing[0]!r}); list what it has with "
                             "tools/import_itemic_vocab.py, or add them with tools/extend_vocab.py")
        return cls(scheme, begin, end, codes, original_vocab_size)

    @classmethod
    def from_tokenizer_dir(cls, directory: str, scheme: ItemicScheme,
                           original_vocab_size: Optional[int] = None) -> "ItemicVocab":
        """Ids of ``scheme``'s tokens in the tokenizer of ``directory``, checked by encoding sample items."""
        files = TokenizerFiles(directory)
        vocab = cls.from_lookup(scheme, files.token_to_id, where=directory, original_vocab_size=original_vocab_size)
        vocab.check_encoding(files.encode, where=directory)
        return vocab

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ItemicVocab) and self.scheme == other.scheme and self.begin_ids == other.begin_ids
                and self.end_ids == other.end_ids and np.array_equal(self.code_ids, other.code_ids)
                and self.original_vocab_size == other.original_vocab_size)

    # ------------------------------------------------------------------------------------------ lookups
    @property
    def levels(self) -> int:
        return self.scheme.levels

    @property
    def codebook_size(self) -> int:
        return self.scheme.codebook_size

    @property
    def domains(self) -> List[str]:
        return list(self.scheme.domains)

    def begin_id(self, domain: Optional[str]) -> int:
        return self.begin_ids[self.scheme.begin_key(domain)]

    def item_end_id(self, domain: Optional[str]) -> Optional[int]:
        """The end token's id for ``domain``'s items; None when the scheme has no end token."""
        return self.end_ids[self.scheme.begin_key(domain)] if self.end_ids else None

    def code_id(self, level: int, code: int) -> int:
        self.scheme.code_for(level, code)  # range checks
        return int(self.code_ids[level, code])

    def item_ids(self, domain: Optional[str], codes: Sequence[int]) -> List[int]:
        """The token ids of one item, in the scheme's layout (begin, codes, end)."""
        if len(codes) != self.levels:
            raise ItemicPatternError(f"item has {len(codes)} codes, vocabulary has {self.levels} levels")
        end = self.item_end_id(domain)
        return ([self.begin_id(domain)] + [self.code_id(lvl, int(c)) for lvl, c in enumerate(codes)]
                + ([end] if end is not None else []))

    def token(self, token_id: int) -> Optional[ItemicToken]:
        """What an id is in the scheme, or None for a non-itemic token."""
        return self._token_of_id.get(int(token_id))

    def decode_item(self, token_ids: Sequence[int],
                    require_end: bool = True) -> Optional[Tuple[Optional[str], Tuple[int, ...]]]:
        """``(domain, codes)`` when ``token_ids`` is exactly one complete item (end token included, unless
        ``require_end`` is False and the tokens stop after the last code), else None."""
        with_end = self.scheme.end_token is not None and (require_end or len(token_ids) == self.scheme.item_length)
        if len(token_ids) != self.levels + 1 + with_end:
            return None
        head = self.token(token_ids[0])
        if head is None or head.kind != "begin":
            return None
        codes = []
        for level, t in enumerate(token_ids[1:1 + self.levels]):
            tok = self.token(t)
            if tok is None or tok.kind != "code" or tok.level != level:
                return None
            codes.append(tok.code)
        if with_end and int(token_ids[-1]) != self.end_ids[head.domain]:
            return None
        return head.domain, tuple(codes)

    def is_itemic(self, token_id: int) -> bool:
        return int(token_id) in self._token_of_id

    @cached_property
    def itemic_ids(self) -> np.ndarray:
        """Every itemic token id, sorted (int64)."""
        return np.array(sorted(self._token_of_id), dtype=np.int64)

    @cached_property
    def id_ranges(self) -> List[Tuple[int, int]]:
        """The itemic ids as maximal half-open runs ``[lo, hi)``, ascending (one run for a contiguous block)."""
        ids = self.itemic_ids
        if not len(ids):
            return []
        breaks = np.nonzero(np.diff(ids) != 1)[0]
        starts = np.concatenate([[0], breaks + 1])
        stops = np.concatenate([breaks, [len(ids) - 1]])
        return [(int(ids[a]), int(ids[b]) + 1) for a, b in zip(starts, stops)]

    @property
    def max_id(self) -> int:
        return int(self.itemic_ids[-1])

    def itemic_mask(self, token_ids):
        """Elementwise "is an itemic token" of a torch tensor or numpy array of ids (same type, boolean)."""
        mask = None
        for lo, hi in self.id_ranges:
            run = (token_ids >= lo) & (token_ids < hi)
            mask = run if mask is None else mask | run
        return mask

    def check_encoding(self, encode: Callable[[str], Sequence[int]], where: str = "tokenizer") -> None:
        """Encode items built from the first and last codes of every begin key; the ids must be exactly
        :meth:`item_ids` (the tokens are matched whole in text, with nothing around them)."""
        last = self.codebook_size - 1
        for key in self.scheme.marker_keys():
            for codes in ([0] * self.levels, [last] * self.levels):
                text = self.scheme.format_item(key, codes)
                got, want = list(encode(text)), self.item_ids(key, codes)
                if got != want:
                    raise ValueError(f"{where}: the tokenizer encodes {text!r} as {got[:12]}, not as the itemic "
                                     f"tokens {want} (they are not added tokens matched whole in text)")

    # ------------------------------------------------------------------------------------------ files
    def to_dict(self) -> Dict:
        s = self.scheme
        return {
            "format_version": FORMAT_VERSION,
            "scheme": s.to_dict(),
            "original_vocab_size": self.original_vocab_size,
            "num_itemic_tokens": len(self._token_of_id),
            "id_ranges": [list(r) for r in self.id_ranges],
            "begin_token_ids": {s.begin_for(k): i for k, i in self.begin_ids.items()},
            "end_token_ids": {s.end_for(k): i for k, i in self.end_ids.items()},
            "level_first_last_ids": [[int(row[0]), int(row[-1])] for row in self.code_ids],
        }

    def save(self, directory: str) -> str:
        path = os.path.join(directory, ITEMIC_JSON)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        return path

    @classmethod
    def load(cls, directory: str) -> "ItemicVocab":
        """``DIR/itemic_tokens.json``'s scheme with ids looked up in ``DIR``'s tokenizer; any id the file records
        must agree with the tokenizer."""
        path, d = _read_json(directory)
        scheme = _scheme_of(d, path)
        files = TokenizerFiles(directory)
        vocab = cls.from_lookup(scheme, files.token_to_id, where=path, original_vocab_size=d.get("original_vocab_size"))
        vocab.check_encoding(files.encode, where=path)
        recorded = _recorded_ids(d, scheme)
        looked_up = {k: v for k, v in vocab.to_dict().items() if k in recorded}
        for key, want in recorded.items():
            if looked_up[key] != want:
                raise ValueError(f"{path}: records {key} {str(want)[:120]} but the tokenizer has "
                                 f"{str(looked_up[key])[:120]}; the file does not describe this tokenizer (rewrite it "
                                 "with tools/import_itemic_vocab.py)")
        return vocab


def _read_json(directory: str) -> Tuple[str, Dict]:
    path = os.path.join(directory, ITEMIC_JSON)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no itemic vocabulary here (add one with tools/extend_vocab.py, or describe "
                                "the tokens a checkpoint already has with tools/import_itemic_vocab.py)")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    return path, d


def _scheme_of(d: Dict, path: str) -> ItemicScheme:
    if "scheme" in d:
        return ItemicScheme.from_dict(d["scheme"], path)
    if "first_id" in d:  # format 1: contiguous onereason_report tokens, begin tokens first
        try:
            return _preset_onereason_report(int(d["levels"]), int(d["codebook_size"]), list(d["domains"]))
        except KeyError as e:
            raise ValueError(f"{path}: missing field {e}") from None
    raise ValueError(f"{path}: neither a 'scheme' (format 2) nor a 'first_id' (format 1) field")


def _recorded_ids(d: Dict, scheme: ItemicScheme) -> Dict:
    """The id fields a file records, in :meth:`ItemicVocab.to_dict` form (format 1's layout is contiguous)."""
    if "scheme" not in d:
        first = int(d["first_id"])
        n = len(scheme.domains) + scheme.levels * scheme.codebook_size
        return {"id_ranges": [[first, first + n]],
                "begin_token_ids": {scheme.begin_for(dom): first + i for i, dom in enumerate(scheme.domains)}}
    keys = ("id_ranges", "begin_token_ids", "end_token_ids", "level_first_last_ids", "num_itemic_tokens")
    return {k: d[k] for k in keys if k in d}


def read_tokenizer_json(path: str):
    """``tokenizers.Tokenizer`` of ``path``; a damaged file (truncated, not JSON) is a ``ValueError`` naming it (the
    tokenizers library raises a bare ``Exception("EOF while parsing ...")``)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the library raises nothing more specific
        raise ValueError(f"{path}: damaged, not a readable tokenizer ({e}); copy the model's tokenizer files "
                         "again") from None


class TokenizerFiles:
    """Token lookups and encoding with the tokenizer files of a HF directory (``tokenizer.json`` when present)."""

    def __init__(self, directory: str):
        path = os.path.join(directory, "tokenizer.json")
        if os.path.exists(path):
            tok = read_tokenizer_json(path)
            self.token_to_id = tok.token_to_id
            self.encode = lambda text: tok.encode(text, add_special_tokens=False).ids
            self.vocab = lambda: tok.get_vocab(with_added_tokens=True)
        elif os.path.exists(os.path.join(directory, "tokenizer_config.json")):
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(directory)
            table = hf.get_vocab()
            self.token_to_id = table.get
            self.encode = lambda text: hf.encode(text, add_special_tokens=False)
            self.vocab = lambda: table
        else:
            raise FileNotFoundError(f"{directory}: no tokenizer (tokenizer.json or tokenizer_config.json); itemic "
                                    "token ids are looked up from the tokenizer")
