"""Chat prompts for generation in the layout training uses (``data/formats.py``: Qwen3's chat template).

An assistant answer is trained as ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``. So a *thinking* prompt is the
template's generation prompt plus ``<think>\\n`` (the model writes the reasoning and ``</think>``; the generator then
forces ``\\n\\n``), and a *non-thinking* prompt is the template's ``enable_thinking=False`` prompt, which ends with
the empty block ``<think>\\n\\n</think>\\n\\n``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

THINK_START = "<think>"
THINK_END = "</think>"
ANSWER_SEPARATOR = "\n\n"  # between </think> and the answer
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class ChatTokens:
    """Token ids the generator needs, looked up from the tokenizer (never hard-coded)."""

    think_end_id: int
    answer_separator_ids: Tuple[int, ...]
    stop_ids: Tuple[int, ...]  # end of turn / document: banned inside a reasoning trace, which must end at </think>

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatTokens":
        vocab = tokenizer.get_vocab()
        missing = [t for t in (THINK_END,) + STOP_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer has no {missing} token(s); a Qwen3-style tokenizer is required")
        separator = tokenizer.encode(ANSWER_SEPARATOR, add_special_tokens=False)
        return cls(vocab[THINK_END], tuple(separator), tuple(vocab[t] for t in STOP_TOKENS))


def chat_prompt_ids(tokenizer, messages: Sequence[Dict[str, str]], thinking: bool) -> List[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template, ready for the assistant's answer."""
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    if thinking:
        text += THINK_START + "\n"
    return tokenizer.encode(text, add_special_tokens=False)
