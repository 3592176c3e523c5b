"""What a tokenizer makes of text, in a few fields: data, itemic vocabularies and checkpoints record it so that
nothing made for one tokenizer is used with another (the same ids meaning different tokens trains silently).

The fingerprint is the SHA-256 of the token -> id table (added tokens included), its size, and the itemic scheme
with its sizes and id ranges when the directory has an ``itemic_tokens.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

from megatron_onereason.tokenizer.itemic_tokens import ITEMIC_JSON, ItemicVocab, TokenizerFiles

FINGERPRINT_KEY = "tokenizer_fingerprint"  # in P_stats.json of preprocessed data


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
