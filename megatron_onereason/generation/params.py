"""What to generate: the prompt (token ids + target domain) and the think-then-items decoding parameters.

A rollout is a reasoning trace followed by K item completions (OneReason §6.1, eq. 6): N traces per prompt, K
items per trace. The items of a trace come from one of three strategies:

- ``sample``: K independent draws from the trie-constrained distribution (the RL rollout, ``SamplingParams(n=K)``);
- ``beam``: beam search of width K over the whole itemic pattern (OneRec-Think's Rollout-Beam, eq. 7 there);
- ``hierarchical``: beam search of width K up to the first code level, then greedy completion of each beam
  (OneReason appendix A.4.2, the deployed strategy).

Beam and hierarchical search return fewer than K items when fewer candidates exist (catalog items, or distinct
first-level codes); sampling always returns K (possibly repeated) items.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

ITEM_STRATEGIES = ("sample", "beam", "hierarchical")
ANSWERS = ("items", "text")  # what follows the trace: K item completions, or one free-text answer


@dataclass(frozen=True)
class Prompt:
    """A rendered chat prompt (see :func:`megatron_onereason.generation.prompts.chat_prompt_ids`).

    ``domain``: the target domain; its ``<|domain_begin|>`` token is forced as the first answer token. ``None`` lets
    the model choose the begin token (among the domains that have catalog items, when constrained).
    """

    token_ids: Tuple[int, ...]
    domain: Optional[str] = None
    # thinking mode: the tokens forced between </think> and the item; None: the chat layout's "\n\n" separator
    answer_prefix: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        if not self.token_ids:
            raise ValueError("Prompt.token_ids is empty")
        object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))
        if self.answer_prefix is not None:
            object.__setattr__(self, "answer_prefix", tuple(int(t) for t in self.answer_prefix))


@dataclass(frozen=True)
class GenerationParams:
    thinking: bool = True  # stage 1 samples a reasoning trace up to </think>; False: items follow the prompt directly
    num_traces: int = 1  # N reasoning traces per prompt
    num_items: int = 1  # K item completions per trace
    item_strategy: str = "sample"
    temperature: float = 1.0  # reasoning tokens; 0 = greedy
    item_temperature: float = 1.0  # item tokens under "sample"; 0 = greedy
    max_think_tokens: int = 256  # sampled reasoning tokens before </think> is forced
    constrained: bool = True  # item tokens only continue catalog items (the trie); needs a catalog
    constrain_reasoning: bool = True  # also constrain itemic patterns the reasoning writes (else γ_legal can be < 1)
    item_end: bool = True  # decode the scheme's end token; False: stop at the last code (OpenOneRec's RecIF decoding)
    seed: Optional[int] = None  # sampling generator seed; None draws from torch's global generator
    # "text": after the trace, one free-text answer sampled at ``temperature`` up to an end-of-turn token or
    # max_answer_tokens (general-domain prompts of MOPD, OpenOneRec §5.2); num_items must be 1.
    answer: str = "items"
    max_answer_tokens: int = 256

    def __post_init__(self):
        if self.item_strategy not in ITEM_STRATEGIES:
            raise ValueError(f"item_strategy must be one of {ITEM_STRATEGIES}, got {self.item_strategy!r}")
        if self.num_traces < 1 or self.num_items < 1:
            raise ValueError(f"num_traces and num_items must be >= 1, got {self.num_traces}, {self.num_items}")
        if self.temperature < 0 or self.item_temperature < 0:
            raise ValueError(f"temperatures must be >= 0, got {self.temperature}, {self.item_temperature}")
        if self.answer not in ANSWERS:
            raise ValueError(f"answer must be one of {ANSWERS}, got {self.answer!r}")
        if self.answer == "text" and (self.num_items != 1 or self.max_answer_tokens < 1):
            raise ValueError(f"a free-text answer is one completion of >= 1 token: num_items=1, max_answer_tokens "
                             f">= 1, got {self.num_items}, {self.max_answer_tokens}")
        if self.max_think_tokens < 0:
            raise ValueError(f"max_think_tokens must be >= 0, got {self.max_think_tokens}")
