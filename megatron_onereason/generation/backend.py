"""The one small interface every generation engine implements (transformers on CPU/dev, vLLM on GPU)."""
from __future__ import annotations

from typing import Iterable, List, Protocol, Sequence, Tuple

import torch

from megatron_onereason.generation.outputs import PromptOutput
from megatron_onereason.generation.params import GenerationParams, Prompt
from megatron_onereason.generation.prompts import ChatTokens
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab


class GenerationBackend(Protocol):
    tokenizer: object  # a HF tokenizer with the Qwen3 chat template and the itemic tokens
    vocab: ItemicVocab
    chat_tokens: ChatTokens

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> List[PromptOutput]:
        """Think-then-items rollouts: N traces per prompt, K item completions per trace."""

    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Load full (TP-gathered) tensors named the megatron or the HF way (see ``generation/weights.py``)."""
