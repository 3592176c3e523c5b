"""The itemic tokens a tokenizer already has: found, described as an :class:`ItemicScheme`, and recorded.

A released OpenOneRec checkpoint carries its itemic tokens but no ``itemic_tokens.json``. :func:`detect_scheme` reads
them off the vocabulary: code tokens look like ``<{prefix}{letter}_{code}>`` (``<a_12>``, ``<s_b_7>``,
``<item_c_3>``) and markers like ``<|{name}_begin|>`` / ``<|{name}_end|>``. One begin token means a begin token
shared by all domains (OpenOneRec's ``<|sid_begin|>``); several mean one per domain. Every level must hold the same
complete code range ``0..K-1``, and per-domain end tokens must exist for every domain or for none; anything else —
two code families, a gap, a level without codes — is refused with the reason, never guessed around.
:func:`import_itemic_vocab` writes a copy of the directory (files hard-linked) plus the ``itemic_tokens.json``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections import defaultdict
from typing import Callable, Dict, List, Mapping, Set

from megatron_onereason.checkpoint.hf_io import link_or_copy
from megatron_onereason.fileio import atomic_directory
from megatron_onereason.tokenizer.itemic_tokens import (
    CODE_LIKE_RE,
    CODES_FIRST,
    ITEMIC_JSON,
    LEVEL_LETTERS,
    MARKERS_FIRST,
    PRESETS,
    ItemicScheme,
    ItemicVocab,
    TokenizerFiles,
    preset,
)

_MARKER = re.compile(r"<\|(?P<name>[a-z][a-z0-9_]*)_(?P<kind>begin|end)\|>\Z")


def _code_like(token: str):
    """The match of a whole code-like token (no leading zeros: the spelling of a real token), else None."""
    m = CODE_LIKE_RE.fullmatch(token)
    return m if m and (m["code"] == "0" or not m["code"].startswith("0")) else None


def existing_itemic_tokens(vocab: Mapping[str, int]) -> List[str]:
    """Tokens of ``vocab`` (token -> id) that look like itemic code tokens, by id."""
    return sorted((t for t in vocab if _code_like(t)), key=vocab.__getitem__)


def _code_families(vocab: Mapping[str, int]) -> Dict[str, Dict[str, Set[int]]]:
    """prefix -> letter -> codes, over every code-like token."""
    families: Dict[str, Dict[str, Set[int]]] = defaultdict(lambda: defaultdict(set))
    for token in vocab:
        m = _code_like(token)
        if m:
            families[m["prefix"]][m["letter"]].add(int(m["code"]))
    return families


def _code_space(prefix: str, letters: Dict[str, Set[int]], where: str) -> tuple:
    """``(levels, codebook_size)`` of one code family; refuses gaps and uneven levels."""
    levels = len(letters)
    if sorted(letters) != list(LEVEL_LETTERS[:levels]):
        raise ValueError(f"{where}: code tokens <{prefix}X_N> have levels {sorted(letters)}, not a, b, c, … in order")
    size = max(max(codes) for codes in letters.values()) + 1
    for letter in LEVEL_LETTERS[:levels]:
        missing = sorted(set(range(size)) - letters[letter])
        if missing:
            raise ValueError(f"{where}: incomplete itemic vocabulary: level {letter} has {len(letters[letter])} of "
                             f"{size} codes (first missing: <{prefix}{letter}_{missing[0]}>)")
    return levels, size


def detect_scheme(vocab: Mapping[str, int], name: str = "auto", where: str = "tokenizer") -> ItemicScheme:
    """The scheme of the itemic tokens in ``vocab`` (token -> id); ``name``: ``auto`` or a preset to follow.

    With a preset only its templates are taken: levels, codebook size and (per-domain) domains come from the
    vocabulary — every ``<|X_begin|>`` token it has, in id order — whose tokens must then complete the preset's
    pattern.
    """
    families = _code_families(vocab)
    if name != "auto":
        template = preset(name, domains=None if name == "openonerec" else ("x",))
        prefix = _code_like(template.code_for(0, 0))["prefix"]
        if prefix not in families:
            raise ValueError(f"{where}: no code tokens of scheme {name!r} (like {template.code_for(0, 0)!r}) in the "
                             f"tokenizer" + (f"; it has {_describe(families)}" if families else ""))
        families = {prefix: families[prefix]}
    if not families:
        raise ValueError(f"{where}: the tokenizer has no itemic code tokens (like <a_0> or <s_a_0>); add them with "
                         "tools/extend_vocab.py --scheme NAME")
    if len(families) > 1:
        raise ValueError(f"{where}: ambiguous itemic tokens: {_describe(families)}; choose one with --scheme "
                         f"({', '.join(PRESETS)})")
    prefix, letters = next(iter(families.items()))
    levels, size = _code_space(prefix, letters, where)
    code_token = f"<{prefix}{{letter}}_{{code}}>"
    markers = {kind: {} for kind in ("begin", "end")}
    for token, i in vocab.items():
        m = _MARKER.match(token)
        if m:
            markers[m["kind"]][m["name"]] = i
    begins = sorted(markers["begin"], key=markers["begin"].get)
    if name != "auto":
        base = preset(name, levels, size, domains=None if name == "openonerec" else ("x",))
        if base.shared_begin:
            missing = [t for t in base.marker_strings() if t not in vocab]
            if missing:
                raise ValueError(f"{where}: incomplete itemic vocabulary for scheme {name!r}: no {missing[0]!r} token")
            return _named(ItemicScheme(name, base.code_token, base.begin_token, base.end_token, levels, size, (),
                                       _order(vocab, base.token_strings())))
        if not begins:
            raise ValueError(f"{where}: no <|domain_begin|> token for scheme {name!r}")
        scheme = ItemicScheme(name, base.code_token, base.begin_token, base.end_token, levels, size, tuple(begins))
    elif not begins:
        raise ValueError(f"{where}: code tokens {code_token} but no <|…_begin|> token to start an item")
    elif len(begins) == 1:
        end = f"<|{begins[0]}_end|>" if begins[0] in markers["end"] else None
        scheme = ItemicScheme("imported", code_token, f"<|{begins[0]}_begin|>", end, levels, size)
    else:
        with_end = [d for d in begins if d in markers["end"]]
        if with_end and len(with_end) != len(begins):
            lacking = [d for d in begins if d not in markers["end"]]
            raise ValueError(f"{where}: incomplete itemic vocabulary: end tokens for {with_end} but not for {lacking}")
        end = "<|{domain}_end|>" if with_end else None
        scheme = ItemicScheme("imported", code_token, "<|{domain}_begin|>", end, levels, size, tuple(begins))
    missing = [t for t in scheme.token_strings() if t not in vocab]
    if missing:
        raise ValueError(f"{where}: incomplete itemic vocabulary: no {missing[0]!r} token")
    return _named(ItemicScheme(scheme.name, scheme.code_token, scheme.begin_token, scheme.end_token, levels, size,
                               scheme.domains, _order(vocab, scheme.token_strings())))


def _describe(families: Dict[str, Dict[str, Set[int]]]) -> str:
    return ", ".join(f"<{p}a_N> ({sum(len(c) for c in families[p].values())} tokens)" for p in sorted(families))


def _order(vocab: Mapping[str, int], tokens: List[str]) -> str:
    """Whether the code tokens come before the begin/end tokens in the vocabulary."""
    ids = [vocab[t] for t in tokens]
    first_marker = min(i for t, i in zip(tokens, ids) if _MARKER.match(t))
    return CODES_FIRST if min(i for t, i in zip(tokens, ids) if not _MARKER.match(t)) < first_marker else MARKERS_FIRST


def _named(scheme: ItemicScheme) -> ItemicScheme:
    """``scheme`` under the name of the preset whose templates it has (else as it is)."""
    for name in PRESETS:
        domains = None if scheme.shared_begin else scheme.domains
        try:
            candidate = preset(name, scheme.levels, scheme.codebook_size, domains)
        except ValueError:
            continue
        if (candidate.code_token, candidate.begin_token, candidate.end_token) == \
                (scheme.code_token, scheme.begin_token, scheme.end_token):
            return ItemicScheme(name, scheme.code_token, scheme.begin_token, scheme.end_token, scheme.levels,
                                scheme.codebook_size, scheme.domains, scheme.token_order)
    return scheme


def import_itemic_vocab(hf_dir: str, out_dir: str, scheme: str = "auto", overwrite: bool = False) -> ItemicVocab:
    """Write ``out_dir`` = ``hf_dir`` (files hard-linked, or copied) + an ``itemic_tokens.json`` describing the
    itemic tokens its tokenizer already has. Nothing is written when they cannot be described unambiguously."""
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: not a directory")
    if os.path.exists(os.path.join(hf_dir, ITEMIC_JSON)):
        raise ValueError(f"{hf_dir}: already has {ITEMIC_JSON}; use the directory as it is")
    files = TokenizerFiles(hf_dir)
    detected = detect_scheme(files.vocab(), scheme, where=hf_dir)
    vocab = ItemicVocab.from_lookup(detected, files.token_to_id, where=hf_dir)
    vocab.check_encoding(files.encode, where=hf_dir)
    config_path = os.path.join(hf_dir, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            rows = json.load(f).get("vocab_size")
        if isinstance(rows, int) and vocab.max_id >= rows:
            raise ValueError(f"{config_path}: vocab_size {rows} has no embedding row for itemic token id "
                             f"{vocab.max_id}")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        _link_tree(hf_dir, tmp)
        vocab.save(tmp)
    return vocab


def _link_tree(src: str, dst: str) -> None:
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(dst, name), copy_function=link_or_copy)
        else:
            link_or_copy(path, os.path.join(dst, name))


def run_tool(action: Callable[[], ItemicVocab], out_dir: str) -> int:
    """A vocabulary tool's main: run ``action``, print the new vocabulary's summary as JSON (exit status 0), or
    one ``error:`` line for bad input (status 1, no traceback)."""
    try:
        vocab = action()
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    d = vocab.to_dict()
    summary = {"out_dir": out_dir, **{k: d[k] for k in ("scheme", "num_itemic_tokens", "id_ranges", "begin_token_ids",
                                                        "end_token_ids")}}
    print(json.dumps(summary, indent=2))
    return 0
