"""Extend a HF Qwen3 directory with the itemic tokens of a scheme (OpenOneRec §4.2), streaming its safetensors.

Id layout. The scheme's tokens (:meth:`ItemicScheme.token_strings`, in its ``token_order``) get ids
``[first_id, first_id + num_new)`` with ``first_id = len(tokenizer)`` — right after the last token the tokenizer
knows (Qwen3: 151669), not after the config's ``vocab_size`` (Qwen3: 151936; rows 151669..151935 are padding no
token maps to). With the ``openonerec`` scheme the ids are those of OpenOneRec's ``expand_qwen3_vocab.py``
(``<s_a_0>`` = 151669 … ``<|sid_end|>`` = 176246); unlike that script, the vocabulary is not padded to a multiple
of 256 here (megatron pads the embedding itself, and export cuts it back). The new embedding has
``first_id + num_new`` rows:

- rows ``[0, first_id)`` are the old rows, copied byte for byte;
- rows ``[first_id, first_id + num_new)`` are drawn from N(mean, cov) with the float64 mean and covariance of
  the old rows ``[0, first_id)`` (OpenOneRec §4.2), seeded, in the input dtype;
- the old padding rows ``[first_id, old vocab_size)`` are dropped: no token ever used them.

An untied ``lm_head.weight`` is extended the same way with its own mean and covariance (drawn after the
embedding's rows, from the same generator). ``config.json`` gets ``vocab_size = first_id + num_new``; the tokens
are added as non-special added tokens (matched atomically in text, kept by ``decode(skip_special_tokens=True)``);
``itemic_tokens.json`` records the scheme and ids (:class:`ItemicVocab`, ``original_vocab_size`` = old config vocab).
A tokenizer that already has itemic tokens (a released OpenOneRec checkpoint) is refused: a second, disjoint itemic
vocabulary would leave the trained rows unused — describe its tokens with ``tools/import_itemic_vocab.py`` instead.

Memory: the HF model is never instantiated. Only the shard(s) holding the embedding / lm_head are rewritten,
tensor by tensor; other shards are hard-linked (or copied). Peak RAM is about one embedding matrix (Qwen3-8B:
1.2 GB) plus ~1 GB of float64 statistics temporaries.
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Dict, Sequence

import torch

from megatron_onereason.checkpoint.hf_io import (
    INDEX_FILE,
    TensorBytes,
    copy_hf_assets,
    link_or_copy,
    read_byte_range,
    read_safetensors_header,
    read_weight_map,
    source_tensors,
    write_safetensors,
)
from megatron_onereason.fileio import atomic_directory
from megatron_onereason.model.qwen3_config import Qwen3Config
from megatron_onereason.tokenizer.itemic_import import existing_itemic_tokens
from megatron_onereason.tokenizer.itemic_tokens import DEFAULT_SCHEME, ITEMIC_JSON, ItemicScheme, ItemicVocab

EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
_ROWS_PER_CHUNK = 8192  # bounds the float64 temporaries (8192 × 4096 × 8 B = 256 MiB at Qwen3-8B's hidden)
# Legacy slow-tokenizer file that would list the added tokens without the new ones.
_STALE_TOKENIZER_FILES = ("added_tokens.json",)


def sample_new_rows(old_rows: torch.Tensor, num_new: int, generator: torch.Generator) -> torch.Tensor:
    """``num_new`` rows drawn from N(mean, cov) of ``old_rows`` (float64 statistics), in ``old_rows.dtype``.

    Chunked so hidden 4096 × 150K rows needs no float64 copy of the whole matrix. The covariance is the unbiased
    sample covariance; a tiny diagonal jitter is added only if it is not numerically positive definite.
    """
    if old_rows.dim() != 2 or old_rows.shape[0] < 2:
        raise ValueError(f"need a 2-D matrix of at least 2 rows to estimate a covariance, got {tuple(old_rows.shape)}")
    n, hidden = old_rows.shape
    mean = torch.zeros(hidden, dtype=torch.float64)
    for chunk in old_rows.split(_ROWS_PER_CHUNK):
        mean += chunk.to(torch.float64).sum(0)
    mean /= n
    cov = torch.zeros(hidden, hidden, dtype=torch.float64)
    for chunk in old_rows.split(_ROWS_PER_CHUNK):
        centred = chunk.to(torch.float64) - mean
        cov.addmm_(centred.T, centred)
    cov /= n - 1
    chol = _cholesky_with_jitter(cov)
    out = torch.empty(num_new, hidden, dtype=old_rows.dtype)
    for start in range(0, num_new, _ROWS_PER_CHUNK):
        stop = min(start + _ROWS_PER_CHUNK, num_new)
        z = torch.randn(stop - start, hidden, generator=generator, dtype=torch.float64)
        out[start:stop] = torch.addmm(mean, z, chol.T).to(old_rows.dtype)
    return out


def _cholesky_with_jitter(cov: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of ``cov``; rank-deficient or rounding-negative covariances get a growing jitter."""
    scale = cov.diagonal().mean().item() or 1.0
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    for jitter in [0.0] + [scale * 10.0**e for e in range(-10, -2)]:
        chol, info = torch.linalg.cholesky_ex(cov + jitter * eye)
        if info.item() == 0:
            return chol
    raise ValueError("covariance of the old embedding rows is not positive definite even with jitter 1e-3·mean var")


def extend_vocabulary(
    hf_dir: str,
    out_dir: str,
    scheme: ItemicScheme = DEFAULT_SCHEME,
    seed: int = 0,
    overwrite: bool = False,
) -> ItemicVocab:
    """Write ``out_dir``: ``hf_dir`` with ``scheme``'s tokens added to tokenizer, embedding (and untied lm_head).

    Refuses an input that already has itemic tokens (or an ``itemic_tokens.json``). ``out_dir`` is written
    atomically and must not exist unless ``overwrite``. Returns the new :class:`ItemicVocab` (also saved as
    ``itemic_tokens.json``).
    """
    config = Qwen3Config.from_hf_dir(hf_dir)
    if os.path.exists(os.path.join(hf_dir, ITEMIC_JSON)):
        raise ValueError(f"{hf_dir}: already has {ITEMIC_JSON}; its vocabulary is already extended")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:  # refuses an existing out_dir before any work
        tokenizer, first_id = _extended_tokenizer(hf_dir, config, scheme.token_strings())
        vocab = ItemicVocab.from_lookup(scheme, tokenizer.get_vocab(), where=hf_dir,
                                        original_vocab_size=config.vocab_size)
        end_id = first_id + len(vocab.itemic_ids)
        weight_map, index = read_weight_map(hf_dir)
        new_rows = _sampled_vocab_rows(hf_dir, weight_map, config, first_id, end_id - first_id, seed)
        rewritten = {weight_map[name] for name in new_rows}
        for fname in sorted(set(weight_map.values())):
            src, dst = os.path.join(hf_dir, fname), os.path.join(tmp, fname)
            if fname in rewritten:
                _rewrite_shard(src, dst, new_rows, first_id)
            else:
                link_or_copy(src, dst)
        copy_hf_assets(hf_dir, tmp, skip={"config.json", *_STALE_TOKENIZER_FILES})
        if index is not None:
            _write_json(os.path.join(tmp, INDEX_FILE), _updated_index(index, new_rows, end_id - config.vocab_size))
        with open(os.path.join(hf_dir, "config.json")) as f:
            hf_config = json.load(f)
        hf_config["vocab_size"] = end_id
        _write_json(os.path.join(tmp, "config.json"), hf_config)
        tokenizer.save_pretrained(tmp)
        vocab.check_encoding(lambda text: tokenizer.encode(text, add_special_tokens=False), where=hf_dir)
        vocab.save(tmp)
    return vocab


def _extended_tokenizer(hf_dir: str, config: Qwen3Config, new_tokens: Sequence[str]):
    """``hf_dir``'s tokenizer with ``new_tokens`` added at ids ``[first_id, first_id + n)``, and ``first_id``."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    known = tokenizer.get_vocab()
    existing = existing_itemic_tokens(known)
    if existing:
        raise ValueError(f"{hf_dir}: the tokenizer already has {len(existing)} itemic-looking tokens (e.g. "
                         f"{existing[0]!r}); describe them with tools/import_itemic_vocab.py instead of adding a "
                         "second itemic vocabulary")
    clashes = [t for t in new_tokens if t in known]
    if clashes:
        raise ValueError(f"{hf_dir}: tokenizer already contains {clashes[0]!r}; its vocabulary is already extended")
    first_id, max_id = len(tokenizer), max(known.values())
    if max_id + 1 != first_id:
        raise ValueError(f"{hf_dir}: tokenizer ids are not contiguous ({first_id} tokens, max id {max_id})")
    if first_id > config.vocab_size:
        raise ValueError(f"{hf_dir}: tokenizer has {first_id} tokens but config.json vocab_size is {config.vocab_size}")
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in new_tokens])
    got = tokenizer.convert_tokens_to_ids(list(new_tokens))
    if got != list(range(first_id, first_id + len(new_tokens))):
        raise AssertionError(f"{hf_dir}: tokenizer gave the new tokens non-contiguous ids starting at {got[0]}")
    return tokenizer, first_id


def _sampled_vocab_rows(
    hf_dir: str, weight_map: Dict[str, str], config: Qwen3Config, first_id: int, num_new: int, seed: int
) -> Dict[str, torch.Tensor]:
    """New rows per vocab tensor: the embedding's first, then an untied lm_head's, from one seeded generator."""
    if EMBEDDING not in weight_map:
        raise ValueError(f"{hf_dir}: no tensor {EMBEDDING} in the safetensors weights")
    if not config.tie_word_embeddings and LM_HEAD not in weight_map:
        raise ValueError(f"{hf_dir}: tie_word_embeddings is false but there is no tensor {LM_HEAD}")
    generator = torch.Generator().manual_seed(seed)
    new_rows = {EMBEDDING: _new_rows(hf_dir, weight_map[EMBEDDING], EMBEDDING, config, first_id, num_new, generator)}
    if LM_HEAD in weight_map:  # tied checkpoints that still store lm_head keep it equal to the embedding
        new_rows[LM_HEAD] = (
            new_rows[EMBEDDING]
            if config.tie_word_embeddings
            else _new_rows(hf_dir, weight_map[LM_HEAD], LM_HEAD, config, first_id, num_new, generator)
        )
    return new_rows


def _new_rows(
    hf_dir: str, fname: str, name: str, config: Qwen3Config, first_id: int, num_new: int, generator: torch.Generator
) -> torch.Tensor:
    """Sampled rows for tensor ``name`` of shard ``fname`` after checking its shape against config.json."""
    from safetensors import safe_open

    path = os.path.join(hf_dir, fname)
    with safe_open(path, framework="pt") as f:
        rows = f.get_slice(name)
        shape = tuple(rows.get_shape())
        if shape != (config.vocab_size, config.hidden_size):
            raise ValueError(
                f"{path}: {name} has shape {shape}, config.json says ({config.vocab_size}, {config.hidden_size})"
            )
        old_rows = rows[:first_id]
    return sample_new_rows(old_rows, num_new, generator)


def _rewrite_shard(src: str, dst: str, new_rows: Dict[str, torch.Tensor], first_id: int) -> None:
    """Copy shard ``src`` to ``dst`` tensor by tensor; vocab tensors keep rows ``[0, first_id)`` plus new rows."""
    header, data_start = read_safetensors_header(src)
    tensors = []
    for t in source_tensors(src):
        if t.name not in new_rows:
            tensors.append(t)
            continue
        start = data_start + header[t.name]["data_offsets"][0]
        kept_bytes = first_id * t.nbytes // t.shape[0]
        rows = new_rows[t.name]
        tensors.append(
            TensorBytes(
                t.name,
                t.dtype,
                (first_id + rows.shape[0], t.shape[1]),
                lambda start=start, kept_bytes=kept_bytes, rows=rows: itertools.chain(
                    read_byte_range(src, start, start + kept_bytes), [_raw_bytes(rows)]
                ),
            )
        )
    write_safetensors(dst, tensors, header.get("__metadata__"))


def _raw_bytes(t: torch.Tensor):
    """The little-endian bytes of a CPU tensor, as safetensors stores them, without a copy."""
    return t.contiguous().view(torch.uint8).reshape(-1).numpy()


def _updated_index(index: Dict, new_rows: Dict[str, torch.Tensor], added_rows: int) -> Dict:
    """The index with its size totals changed by ``added_rows`` (rows added minus the padding rows dropped).

    The weight map itself is unchanged: every tensor stays in the shard file of the same name.
    """
    updated = json.loads(json.dumps(index))
    metadata = updated.get("metadata", {})
    for rows in new_rows.values():
        if "total_size" in metadata:
            metadata["total_size"] += added_rows * rows.shape[1] * rows.element_size()
        if "total_parameters" in metadata:
            metadata["total_parameters"] += added_rows * rows.shape[1]
    return updated


def _write_json(path: str, obj: Dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
