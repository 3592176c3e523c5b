"""The trie constraint as a vLLM V1 logits processor (imports vLLM; loaded by the engine by its qualified name).

vLLM instantiates :class:`ItemicLogitsProcessor` in every engine process from the string
``"megatron_onereason.generation.vllm_logits_processor:ItemicLogitsProcessor"``; a request opts in through
``SamplingParams(extra_args={ITEMIC_ARG: {"catalog_dir": ..., "first_token_ids": ..., "banned_ids": ...}})`` and
gets its own :class:`~megatron_onereason.generation.constrained.RequestItemicProcessor`. Versions: see
:mod:`megatron_onereason.generation.vllm_backend`.
"""
from __future__ import annotations

import functools

from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from megatron_onereason.generation.constrained import ItemicConstraint, RequestItemicProcessor
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab

QUALIFIED_NAME = f"{__name__}:ItemicLogitsProcessor"
ITEMIC_ARG = "onereason_itemic"  # the SamplingParams.extra_args key this processor reads


@functools.lru_cache(maxsize=4)
def itemic_constraint(model_dir: str, catalog_dir: str, vocab_size: int) -> ItemicConstraint:
    """One trie per catalog per process, built on first use."""
    vocab = ItemicVocab.load(model_dir)
    return ItemicConstraint(ItemTrie.from_catalog(ItemCatalog.load(catalog_dir), vocab.scheme), vocab, vocab_size)


class ItemicLogitsProcessor(AdapterLogitsProcessor):
    def __init__(self, vllm_config, device, is_pin_memory):
        super().__init__(vllm_config, device, is_pin_memory)
        self.model_dir = vllm_config.model_config.model
        self.vocab_size = vllm_config.model_config.hf_text_config.vocab_size

    def is_argmax_invariant(self) -> bool:
        return False  # it masks tokens, so it changes greedy picks too

    def new_req_logits_processor(self, params):
        args = (params.extra_args or {}).get(ITEMIC_ARG)
        if args is None:
            return None
        constraint = itemic_constraint(self.model_dir, args["catalog_dir"], self.vocab_size)
        return RequestItemicProcessor(constraint, args.get("first_token_ids"), args.get("banned_ids", ()))
