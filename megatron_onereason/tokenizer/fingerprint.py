"""What a tokenizer makes of text, in a few fields: data, itemic vocabularies and checkpoints record it so that
nothing made for one tokenizer is used with another (the same ids meaning different tokens trains silently).

The fingerprint is the SHA-256 of the token -> id table (added tokens included), its size, and the itemic scheme
with its sizes and id ranges when the directory has an ``itemic_tokens.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Dict, List, Optional

from megatron_onereason.tokenizer.itemic_tokens import ITEMIC_JSON, ItemicVocab, TokenizerFiles

FINGERPRINT_KEY = "tokenizer_fingerprint"  # in P_stats.json of preprocessed data
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

log = logging.getLogger("megatron_onereason.tokenizer")


def has_tokenizer_files(directory: Optional[str]) -> bool:
    return bool(directory) and any(os.path.exists(os.path.join(directory, f)) for f in TOKENIZER_FILES)


def itemic_summary(vocab: Optional[ItemicVocab]) -> Optional[Dict]:
    """The itemic part of a fingerprint: scheme, sizes and where its ids lie."""
    if vocab is None:
        return None
    return {"scheme": vocab.scheme.name, "levels": vocab.levels, "codebook_size": vocab.codebook_size,
            "id_ranges": [list(r) for r in vocab.id_ranges]}


def tokenizer_fingerprint(directory: str) -> Dict:
    """The fingerprint of the tokenizer in ``directory`` (FileNotFoundError without tokenizer files)."""
    table = TokenizerFiles(directory).vocab()
    ordered = json.dumps(sorted(table.items(), key=lambda kv: (kv[1], kv[0])), ensure_ascii=False)
    itemic = ItemicVocab.load(directory) if os.path.exists(os.path.join(directory, ITEMIC_JSON)) else None
    return {"vocab_sha256": hashlib.sha256(ordered.encode()).hexdigest(), "vocab_size": len(table),
            "max_id": max(table.values(), default=-1), "itemic": itemic_summary(itemic)}


def describe(fingerprint: Dict) -> str:
    itemic = fingerprint.get("itemic")
    items = f"itemic {itemic['scheme']} {itemic['levels']}x{itemic['codebook_size']}" if itemic else "no itemic tokens"
    return f"vocabulary {str(fingerprint.get('vocab_sha256'))[:12]} of {fingerprint.get('vocab_size')} tokens, {items}"


def fingerprint_differences(a: Dict, b: Dict) -> List[str]:
    """What differs between two fingerprints (empty: the same tokenizer)."""
    return [key for key in ("vocab_sha256", "vocab_size", "itemic") if a.get(key) != b.get(key)]


def check_same_tokenizer(field_name: str, value: str, theirs: Dict, ours: Dict, where: str, remedy: str,
                         override: str, allowed: bool, made_by: Optional[str] = None) -> None:
    """Refuse ``field_name=value`` (made with the tokenizer of fingerprint ``theirs``) when the model (``where``)
    has another one (``ours``), in one line naming both and ``remedy``; with ``allowed`` (the setting ``override``)
    warn and go on, for the rare case where the ids mean the same tokens."""
    from megatron_onereason.cli import UserError

    if not fingerprint_differences(ours, theirs):
        return
    if allowed:
        log.warning("%s=%s was made with another tokenizer (%s) than %s (%s): used anyway (%s)", field_name, value,
                    describe(theirs), where, describe(ours), override)
        return
    source = f" ({made_by})" if made_by else ""
    raise UserError(f"{field_name}={value}: made with the tokenizer{source} of {describe(theirs)}, but the model "
                    f"({where}) has {describe(ours)}: {remedy}; or set {override}=true if the ids mean the same "
                    "tokens")
