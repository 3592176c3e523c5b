"""A tiny Qwen3-style tokenizer, and a random HF Qwen3 model directory, built locally (no downloads).

The tokenizer reproduces Qwen2/Qwen3's pipeline — NFC normalizer, the Qwen2 split regex, byte-level BPE with no
unknown token, byte-level decoder — with merges trained on a synthetic English-ish corpus generated here from a
fixed word list and a seeded RNG. Its added tokens are Qwen3's, in Qwen3's order, after the BPE vocabulary
(``<|endoftext|>`` = pad, ``<|im_end|>`` = eos, ``<think>``/``</think>`` added but not special), and it carries
Qwen3's chat template. So everything downstream (chat rendering, ``<think>`` handling, vocabulary extension,
``len(tokenizer) <= config.vocab_size`` with unused padding rows) behaves as with the released tokenizer.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, List, Optional, Union

from megatron_onereason.fileio import atomic_directory
from megatron_onereason.model.qwen3_config import Qwen3Config, qwen3_preset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"

# Qwen3's added tokens in Qwen3's id order (tokenizer_config.json "added_tokens_decoder", ids 151643..151668),
# as (content, special).
QWEN3_ADDED_TOKENS = (
    (PAD_TOKEN, True),
    (IM_START, True),
    (IM_END, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    (THINK_START, False),
    (THINK_END, False),
)

# The split regex of Qwen2/Qwen3 (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3's released chat template (Qwen3-*/tokenizer_config.json, the revision that reads `content` once and
# accepts `reasoning_content`). Layout: ``<|im_start|>{role}\n{content}<|im_end|>\n``; an assistant turn after the
# last user query is ``<think>\n{reasoning}\n</think>\n\n{answer}`` (an empty think block when it has no
# reasoning); earlier assistant turns drop their reasoning; ``enable_thinking=False`` on the generation prompt
# pre-fills the empty think block.
QWEN3_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# Words of the synthetic training corpus: common English plus the recommendation domain's vocabulary, so the
# merges look like a natural-language BPE and prompts of the demo tokenize into few tokens.
_CORPUS_WORDS = """
the be to of and a in that have it for not on with he as you do at this but his by from they we say her she or an
will my one all would there their what so up out if about who get which go me when make can like time no just him
know take people into year your good some could them see other than then now look only come its over think also
back after use two how our work first well way even new want because any these give day most us is are was were
been has had did said made went saw found thought told asked seemed felt left kept began
user users item items video videos product products ad ads live stream streams watch watched watching like liked
likes buy bought buying click clicked share shared comment comments follow followed creator creators shop shopping
price cheap brand review reviews recommend recommended recommendation history interest interests category
music dance food cooking travel game games sport sports news movie movies funny cute cat dog baby beauty fashion
phone camera home kitchen garden car book books story stories song songs short long daily weekly popular trending
reason reasoning answer question think because therefore first second next finally maybe probably likely prefer
prefers preferred similar different recent recently often sometimes never always again still already
""".split()
_CORPUS_PUNCT = (".", ".", ".", ",", "?", "!", ":", ";")
_CORPUS_LINES = 6000
_CORPUS_SEED = 20240613


def _synthetic_corpus() -> List[str]:
    """Deterministic English-ish lines: Zipf-weighted words, capitals, punctuation, numbers, quotes, newlines."""
    rng = random.Random(_CORPUS_SEED)
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(_CORPUS_WORDS))]
    lines = []
    for _ in range(_CORPUS_LINES):
        words = rng.choices(_CORPUS_WORDS, weights, k=rng.randint(4, 16))
        words[0] = words[0].capitalize()
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2025)))
        if rng.random() < 0.1:
            i = rng.randrange(len(words))
            words[i] = f'"{words[i]}"'
        if rng.random() < 0.1:
            words[-1] += "'s"
        lines.append(" ".join(words) + rng.choice(_CORPUS_PUNCT) + ("\n" if rng.random() < 0.3 else ""))
    return lines


def build_tiny_qwen3_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A Qwen3-style byte-level BPE tokenizer with ``len(tokenizer) <= vocab_size`` (added tokens included).

    It is a ``Qwen2TokenizerFast`` (saved with ``tokenizer_class: Qwen2Tokenizer``, like the released Qwen3), so
    ``AutoTokenizer`` loads it through the same class as a real Qwen3 directory.
    Deterministic: the same ``vocab_size`` gives the same merges. The BPE part gets ``vocab_size - 26`` entries
    at most (fewer when the corpus has no more pairs to merge, as for the released-size presets).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2TokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    min_size = len(byte_alphabet) + len(QWEN3_ADDED_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size} is too small: 256 byte tokens + 26 added tokens need {min_size}")

    backend = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN3_ADDED_TOKENS),
        initial_alphabet=byte_alphabet,  # every byte is a token, so any text round-trips
        special_tokens=[],
        show_progress=False,
    )
    backend.train_from_iterator(_synthetic_corpus(), trainer)
    # One by one so the ids follow Qwen3's order (special and non-special tokens interleave there).
    for content, special in QWEN3_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (backend.add_special_tokens if special else backend.add_tokens)([token])

    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=[c for c, special in QWEN3_ADDED_TOKENS if special and c not in (PAD_TOKEN, IM_END)],
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=131072,
        errors="replace",
    )
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def save_tiny_hf_qwen3(
    out_dir: str,
    preset: Union[str, Qwen3Config] = "tiny",
    seed: int = 0,
    overwrite: bool = False,
    tokenizer_vocab_size: Optional[int] = None,
) -> str:
    """Write a complete HF Qwen3 directory: random weights (safetensors), config, tiny tokenizer, generation config.

    ``preset`` is a preset name or a :class:`Qwen3Config` (e.g. an untied variant). The tokenizer is trained for
    ``tokenizer_vocab_size`` (default: the config's vocab_size); rows past ``len(tokenizer)`` stay as unused
    padding, as in released Qwen3. The generation config stops at ``<|im_end|>``/``<|endoftext|>`` and is greedy,
    so generations are reproducible. Written atomically; returns ``out_dir``.
    """
    from transformers import GenerationConfig

    from megatron_onereason.model.hf_qwen3 import make_hf_qwen3

    cfg = qwen3_preset(preset) if isinstance(preset, str) else preset
    tokenizer = build_tiny_qwen3_tokenizer(tokenizer_vocab_size or cfg.vocab_size)
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} entries, more than the model's vocab_size {cfg.vocab_size}")
    model = make_hf_qwen3(cfg, seed=seed)
    pad_id, eos_id = tokenizer.convert_tokens_to_ids([PAD_TOKEN, IM_END])
    model.config.bos_token_id = pad_id  # Qwen3 has no BOS; its config names <|endoftext|> here
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = pad_id
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir
