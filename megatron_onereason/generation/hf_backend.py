"""The ``transformers`` generation backend: CPU/dev and the embedded default (no extra engine to install)."""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_onereason.generation.outputs import PromptOutput
from megatron_onereason.generation.params import GenerationParams, Prompt
from megatron_onereason.generation.prompts import ChatTokens
from megatron_onereason.generation.two_stage import TwoStageGenerator
from megatron_onereason.generation.weights import hf_named_tensors
from megatron_onereason.model.qwen3_config import Qwen3Config
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab


class TransformersBackend:
    def __init__(self, model, tokenizer, vocab: ItemicVocab, trie: Optional[ItemTrie] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = Qwen3Config.from_hf_dict(model.config.to_dict(), source="model.config")
        self.vocab = vocab
        self.chat_tokens = ChatTokens.from_tokenizer(tokenizer)
        self.generator = TwoStageGenerator(model, vocab, self.chat_tokens, len(tokenizer), trie)

    @classmethod
    def from_pretrained(cls, model_dir: str, catalog_dir: Optional[str] = None, device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "TransformersBackend":
        """A HF model directory with an extended tokenizer (``itemic_tokens.json``); the catalog enables the trie."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        vocab = ItemicVocab.load(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        trie = ItemTrie.from_catalog(ItemCatalog.load(catalog_dir), vocab.scheme) if catalog_dir else None
        return cls(model, tokenizer, vocab, trie)

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> List[PromptOutput]:
        return self.generator.generate(prompts, params)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())  # tied lm_head is not listed: it is the embedding
        for source, hf_name, tensor in hf_named_tensors(named_tensors, self.config):
            target = params.get(hf_name)
            if target is None:
                raise KeyError(f"{source}: the model has no parameter {hf_name}")
            if target.shape != tensor.shape:
                raise ValueError(f"{source}: shape {tuple(tensor.shape)}, the model's {hf_name} is "
                                 f"{tuple(target.shape)}")
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
