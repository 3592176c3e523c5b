"""The ``transformers`` generation backend: the reference oracle of the vLLM backend, and CPU/dev without vLLM."""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_onereason.generation.outputs import PromptOutput, TreeScores
from megatron_onereason.generation.params import GenerationParams, Prompt
from megatron_onereason.generation.prompts import ChatTokens
from megatron_onereason.generation.two_stage import TwoStageGenerator
from megatron_onereason.generation.weights import checked_hf_tensors
from megatron_onereason.model.qwen3_config import Qwen3Config
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab


class TransformersBackend:
    supports_sleep = False  # an in-process model: nothing to release between rollouts

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

    @torch.inference_mode()
    def score(self, trees: Sequence) -> List[TreeScores]:
        """Log-probs of the given tokens of each tree (``.prompt``, ``.trace``, ``.children``): one forward per tree
        over its ``prompt + trace + child_j`` rows (right-padded: causal attention never sees the padding)."""
        device = next(self.model.parameters()).device
        scores = []
        for tree in trees:
            context = [int(t) for t in tree.prompt] + [int(t) for t in tree.trace]
            rows = [context + [int(t) for t in child] for child in tree.children] or [context]
            ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row)
            logits = self.model(ids.to(device)).logits.float()
            logp = logits[:, :-1].gather(-1, ids[:, 1:, None].to(device))[..., 0] - logits[:, :-1].logsumexp(-1)
            logp = logp.cpu()
            start = len(tree.prompt)
            scores.append(TreeScores(
                trace=logp[0, start - 1:len(context) - 1].tolist(),
                children=[logp[j, len(context) - 1:len(context) - 1 + len(child)].tolist()
                          for j, child in enumerate(tree.children)]))
        return scores

    def sleep(self, level: int = 1) -> None:
        """Nothing to release (``supports_sleep`` is False)."""

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Nothing to restore."""

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())  # tied lm_head is not listed: it is the embedding
        for _, hf_name, tensor in checked_hf_tensors(named_tensors, self.config):
            target = params[hf_name]
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
