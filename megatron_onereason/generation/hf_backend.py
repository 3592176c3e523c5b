"""The ``transformers`` generation backend: the reference oracle of the vLLM backend, and CPU/dev without vLLM.

:class:`TransformersScorer` holds a HF causal LM in this process and scores given tokens; it is the whole of the
``plain`` backend (OpenOneRec's general-domain teacher, §5.2: the original Qwen3, no itemic vocabulary).
:class:`TransformersBackend` adds the extended tokenizer and the two-stage generator. Both receive weight syncs in
process (one channel member; the tensors go through :meth:`update_weights`).
"""
from __future__ import annotations

import os
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_onereason.generation.outputs import PromptOutput, TreeScores
from megatron_onereason.generation.params import GenerationParams, Prompt
from megatron_onereason.generation.prompts import ChatTokens
from megatron_onereason.generation.two_stage import TwoStageGenerator
from megatron_onereason.generation.weight_sync import ChannelSpec, SyncStats, join_channel, receive_weights
from megatron_onereason.generation.weights import checked_hf_tensors
from megatron_onereason.model.qwen3_config import Qwen3Config
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab


class TransformersScorer:
    """A HF causal LM in this process that scores given tokens (no generation)."""

    supports_sleep = False  # an in-process model: nothing to release between rollouts
    weight_receivers = 1  # this process holds the one copy

    def __init__(self, model):
        self.model = model.eval()
        self.config = Qwen3Config.from_hf_dict(model.config.to_dict(), source="model.config")
        self.channels: List = []

    @classmethod
    def from_pretrained(cls, model_dir: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
        """Any HF Qwen3 directory (``mopd.general_teacher``: no ``itemic_tokens.json`` needed)."""
        from transformers import AutoModelForCausalLM

        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ValueError(f"{model_dir}: no config.json: not a Hugging Face model directory")
        return cls(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device))

    @property
    def in_process_model(self) -> torch.nn.Module:
        return self.model

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> List[PromptOutput]:
        raise NotImplementedError("a scoring-only model (backend plain) does not generate")

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

    def open_weight_channels(self, specs: Sequence[ChannelSpec], first_rank: int) -> None:
        self.channels = [join_channel(s, first_rank) for s in specs]

    def receive_weights(self) -> SyncStats:
        return receive_weights(self.channels, self.update_weights)

    def close(self) -> None:
        """Nothing runs outside this process."""


class TransformersBackend(TransformersScorer):
    """Two-stage generation (:class:`~megatron_onereason.generation.two_stage.TwoStageGenerator`) on a HF model
    with the extended tokenizer; the catalog trie, when given, constrains items."""

    def __init__(self, model, tokenizer, vocab: ItemicVocab, trie: Optional[ItemTrie] = None):
        super().__init__(model)
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.chat_tokens = ChatTokens.from_tokenizer(tokenizer)
        self.generator = TwoStageGenerator(model, vocab, self.chat_tokens, len(tokenizer), trie)

    @classmethod
    def from_pretrained(cls, model_dir: str, catalog_dir: Optional[str] = None, device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "TransformersBackend":
        """A HF model directory with an extended tokenizer (``itemic_tokens.json``); the catalog enables the trie."""
        from transformers import AutoTokenizer

        vocab = ItemicVocab.load(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = TransformersScorer.from_pretrained(model_dir, device, dtype).model
        trie = ItemTrie.from_catalog(ItemCatalog.load(catalog_dir), vocab.scheme) if catalog_dir else None
        return cls(model, tokenizer, vocab, trie)

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> List[PromptOutput]:
        return self.generator.generate(prompts, params)
