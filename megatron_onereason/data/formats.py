"""Training samples: parsing the input formats and turning them into token ids plus a loss-target mask.

Three kinds of record, one JSON object per line (or one parquet row):

- pre-training, ``{"segments": [{"text": str, "loss": bool}, ...], "source": str, "domain": str}``: noisy template
  text goes in ``loss: false`` segments (conditioning context) and the loss stays on the target segments
  (OneReason §4.2, "Data Composition Strategy");
- chat / SFT, ``{"messages": [{"role": "system|user|assistant", "content": str, "reasoning": str}], "source": str}``,
  rendered exactly as Qwen3's chat template renders it (see :func:`render_chat`) with loss on assistant turns only;
- plain text, Megatron-LM's ``{"text": str}`` (the keys of ``FormatConfig.json_keys``): one document, loss on all.

Input formats (``FormatConfig.input_format``, ``--input-format``): ``onereason`` is the project's own, strict form
above. ``openonerec`` also reads OpenOneRec's pre-training / SFT files: ``segments`` / ``messages`` (or
``message``) columns holding JSON strings, message ``content`` as a list of ``{"type": "text", "text": …}`` parts
(concatenated, as their loader does), segments without a ``loss`` flag (loss on all of them, as their pre-training
does), and reasoning inline in assistant turns as ``<think>…</think>`` (split off exactly as the chat template
splits it). ``megatron`` reads only the plain-text keys. ``auto`` (the default) accepts all of these, per record.
``FormatConfig.soft_switch`` appends ``/think`` (the final assistant turn has reasoning) or ``/no_think`` to the
last user turn, as OpenOneRec's ``qwen3_soft_switch`` template and ``add_think_pattern`` do at eval and train time.

Every record becomes a list of :class:`Segment` (text, loss). Each segment is tokenized on its own, so a segment boundary is
always a token boundary and the loss mask is exact; that is also how inference sees it (the prompt is tokenized,
then the model continues). Itemic patterns inside text become their itemic tokens (they are added tokens of the
extended tokenizer); every itemic token written in text is checked against the vocabulary first, and a code
outside the codebook is an error (:class:`SampleError`), as is a tokenizer that does not map them. A tokenizer
without an itemic vocabulary (no ``itemic_tokens.json``) encodes plain text; a record that writes anything
itemic-looking is then refused (and counted with ``--skip-invalid``), never tokenized into meaningless pieces.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from megatron_onereason.tokenizer.itemic_tokens import (
    ITEMIC_JSON,
    ITEMIC_LIKE_RE,
    ItemicPatternError,
    ItemicVocab,
    read_tokenizer_json,
)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
EOD_TOKEN = "<|endoftext|>"  # Qwen3's end-of-document (and pad) token
CHAT_ROLES = ("system", "user", "assistant")
UNKNOWN = "unknown"  # source / domain of a sample that names none
INPUT_FORMATS = ("auto", "onereason", "openonerec", "megatron")
THINK, NO_THINK = "/think", "/no_think"

_MODE_SWITCH_RE = re.compile(r"/(no_)?think\b")


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is a short category for the skip statistics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Segment:
    text: str
    loss: bool  # the segment's tokens are loss targets


@dataclass(frozen=True)
class Sample:
    segments: Tuple[Segment, ...]
    source: str
    domain: str
    kind: str  # "segments" or "chat"
    dropped_reasoning: int = 0  # chat: reasoning of assistant turns before the last user message (template drops it)


@dataclass(frozen=True)
class FormatConfig:
    append_eod: bool = True  # end pre-training / text samples with <|endoftext|> (a target iff the last segment is)
    input_format: str = "auto"  # one of INPUT_FORMATS
    json_keys: Tuple[str, ...] = ("text",)  # plain-text keys (Megatron-LM's --json-keys), concatenated in order
    soft_switch: bool = False  # append /think or /no_think to the last user turn (OpenOneRec's qwen3_soft_switch)

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input format {self.input_format!r} is not one of {INPUT_FORMATS}")
        if not self.json_keys:
            raise ValueError("json_keys must name at least one key")


@dataclass
class EncodedSample:
    tokens: np.ndarray  # int32 [n]
    lossmask: np.ndarray  # uint8 [n], 1 = loss target
    itemic_tokens: int


def parse_json_line(line: Union[str, bytes]) -> Dict[str, Any]:
    try:
        record = json.loads(line)
    except UnicodeDecodeError as e:
        raise SampleError("invalid_utf8", f"invalid UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise SampleError("invalid_json", f"invalid JSON: {e}") from None
    if not isinstance(record, dict):
        raise SampleError("schema", f"a sample must be a JSON object, got {type(record).__name__}")
    return record


def _optional_str(record: Dict[str, Any], key: str) -> Optional[str]:
    """A string field, or None when absent (parquet writes absent struct fields as None)."""
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise SampleError("schema", f"{key!r} must be a string, got {type(value).__name__}")
    return value


def parse_sample(record: Dict[str, Any], config: FormatConfig = FormatConfig()) -> Sample:
    """A parsed record (JSON object / parquet row) → :class:`Sample`, or :class:`SampleError`."""
    fmt = config.input_format
    lenient = fmt in ("auto", "openonerec")
    structured = {"segments": None, "messages": None}
    if fmt != "megatron":
        structured["segments"] = record.get("segments")
        structured["messages"] = record.get("messages")
        if lenient and structured["messages"] is None:
            structured["messages"] = record.get("message")  # OpenOneRec's loader accepts both names
    texts = [k for k in config.json_keys if record.get(k) is not None] if fmt in ("auto", "megatron") else []
    present = [k for k, v in structured.items() if v is not None] + (["text"] if texts else [])
    if len(present) != 1:
        wanted = {"onereason": "'segments' or 'messages'", "openonerec": "'segments' or 'messages'",
                  "megatron": f"a text key {list(config.json_keys)}"}.get(
            fmt, f"'segments', 'messages' or a text key {list(config.json_keys)}")
        raise SampleError("schema", f"a sample needs exactly one of {wanted} (input format {fmt}), has "
                                    f"{present or 'none'}")
    source = _optional_str(record, "source") or UNKNOWN
    domain = _optional_str(record, "domain") or UNKNOWN
    if texts:
        return Sample(_text_segments(record, texts), source, domain, "text")
    if structured["segments"] is not None:
        return Sample(_parse_segments(_decoded(structured["segments"], "segments", lenient), lenient), source,
                      domain, "segments")
    messages = _parse_messages(_decoded(structured["messages"], "messages", lenient), lenient)
    if config.soft_switch:
        messages = _with_soft_switch(messages)
    segments, dropped = render_chat(messages)
    return Sample(segments, source, domain, "chat", dropped)


def _decoded(value: Any, key: str, lenient: bool) -> Any:
    """A column that holds JSON text (OpenOneRec's parquet files) decoded; other values as they are."""
    if not (lenient and isinstance(value, str)):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise SampleError("schema", f"{key!r} is a string but not valid JSON: {e}") from None


def _text_segments(record: Dict[str, Any], keys: Sequence[str]) -> Tuple[Segment, ...]:
    for key in keys:
        if not isinstance(record[key], str):
            raise SampleError("schema", f"{key!r} must be a string, got {type(record[key]).__name__}")
    segments = tuple(Segment(record[k], True) for k in keys)
    if not any(s.text for s in segments):
        raise SampleError("no_target", f"empty text in {list(keys)} (nothing to train on)")
    return segments


def _parse_segments(raw: Any, lenient: bool) -> Tuple[Segment, ...]:
    """Segments; ``lenient``: OpenOneRec's ``{"type": "text", "text": …}`` without a loss flag is a target."""
    if not isinstance(raw, list) or not raw:
        raise SampleError("schema", "'segments' must be a non-empty list")
    segments = []
    for i, seg in enumerate(raw):
        loss = seg.get("loss") if isinstance(seg, dict) else None
        if lenient and isinstance(seg, dict) and loss is None:
            loss = True
        if not isinstance(seg, dict) or not isinstance(seg.get("text"), str) or not isinstance(loss, bool):
            raise SampleError("schema", f"segment {i} must be an object with a string 'text' and a boolean 'loss'"
                                        + (" (or none)" if lenient else ""))
        if seg.get("type", "text") not in ("text", None):
            raise SampleError("schema", f"segment {i} has type {seg['type']!r}; only text segments are supported")
        segments.append(Segment(seg["text"], loss))
    if not any(s.loss and s.text for s in segments):
        raise SampleError("no_target", "no segment with loss: true and non-empty text (nothing to train on)")
    return tuple(segments)


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    reasoning: Optional[str] = None


def _parse_messages(raw: Any, lenient: bool) -> List[Message]:
    """Messages; ``lenient``: content given as text parts, and reasoning inline in ``<think>…</think>``."""
    if not isinstance(raw, list) or not raw:
        raise SampleError("schema", "'messages' must be a non-empty list")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise SampleError("schema", f"message {i} must be an object")
        role, reasoning = m.get("role"), _optional_str(m, "reasoning")
        content = message_text(m.get("content"), i) if lenient else _optional_str(m, "content")
        if role not in CHAT_ROLES:
            raise SampleError("schema", f"message {i}: role must be one of {CHAT_ROLES}, got {role!r}")
        if content is None:
            raise SampleError("schema", f"message {i}: missing string 'content'")
        if reasoning is not None and role != "assistant":
            raise SampleError("schema", f"message {i}: only assistant messages may have 'reasoning'")
        if role == "assistant" and lenient and reasoning is None and (THINK_START in content or THINK_END in content):
            content, reasoning = _split_inline_think(content, i)
        if role == "assistant" and any(t in content or t in (reasoning or "") for t in (THINK_START, THINK_END)):
            # The template would re-split such content; reasoning belongs in the 'reasoning' field.
            raise SampleError("schema", f"message {i}: {THINK_START}/{THINK_END} inside an assistant message; "
                                        "put the reasoning in 'reasoning'"
                                        + (" or write one <think>…</think> before the answer" if lenient else ""))
        messages.append(Message(role, content, reasoning))
    if not any(m.role == "assistant" for m in messages):
        raise SampleError("no_target", "no assistant message (nothing to train on)")
    return messages


def message_text(content: Any, i: int) -> Optional[str]:
    """A message's text: a string, one ``{"type": "text", "text": …}`` part, or a list of parts (concatenated)."""
    if content is None or isinstance(content, str):
        return content
    parts = [content] if isinstance(content, dict) else content
    if not isinstance(parts, list):
        raise SampleError("schema", f"message {i}: content must be a string or a list of text parts, got "
                                    f"{type(content).__name__}")
    texts = []
    for j, part in enumerate(parts):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise SampleError("schema", f"message {i}: content part {j} is {kind!r}, not a text part; only text is "
                                        "supported")
    return "".join(texts)


def _split_inline_think(content: str, i: int) -> Tuple[str, str]:
    """``(answer, reasoning)`` of ``<think>reasoning</think>answer``, split as Qwen3's chat template splits it."""
    if content.count(THINK_END) != 1 or content.count(THINK_START) > 1:
        raise SampleError("schema", f"message {i}: an assistant turn needs exactly one {THINK_END} (and at most one "
                                    f"{THINK_START}) to split its reasoning off")
    head, answer = content.split(THINK_END)
    if head.split(THINK_START)[0].strip():
        raise SampleError("schema", f"message {i}: text before {THINK_START} in an assistant turn")
    return answer.lstrip("\n"), head.rstrip("\n").split(THINK_START)[-1].lstrip("\n")


def _with_soft_switch(messages: List[Message]) -> List[Message]:
    """The last user turn ending in ``/think`` when the final assistant turn has reasoning, else ``/no_think``
    (unless it already ends with one of them)."""
    last = _last_query_index(messages)
    if messages[last].role != "user" or messages[last].content.rstrip().endswith((THINK, NO_THINK)):
        return messages
    final = [m for m in messages[last + 1:] if m.role == "assistant"]
    suffix = THINK if final and (final[-1].reasoning or "").strip() else NO_THINK
    out = list(messages)
    out[last] = Message("user", messages[last].content + suffix, None)
    return out


def _last_query_index(messages: Sequence[Message]) -> int:
    """Index of the last user message that is a real query (not a tool response), as Qwen3's template finds it."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        tool_response = m.content.startswith("<tool_response>") and m.content.endswith("</tool_response>")
        if m.role == "user" and not tool_response:
            return i
    return len(messages) - 1


def render_chat(messages: Sequence[Message]) -> Tuple[Tuple[Segment, ...], int]:
    """Qwen3 chat-template rendering of a conversation as loss segments; returns (segments, dropped reasoning).

    Mirrors the template (``QWEN3_CHAT_TEMPLATE``; ``reasoning`` is its ``reasoning_content``): every message is
    ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. An assistant turn after the last user message is rendered
    ``<think>\\n{reasoning}\\n</think>\\n\\n{content}`` when it is the final message or has reasoning — so a final
    answer without reasoning gets the empty think block of the non-thinking mode. Assistant turns before the last
    user message are rendered as plain content: the template drops their reasoning (counted in the return value).

    Loss: each assistant turn's body and its closing ``<|im_end|>`` are targets; the ``<|im_start|>assistant\\n``
    header, the newline after ``<|im_end|>`` and all system/user turns are not.

    Mode switches: a ``/think`` or ``/no_think`` in a system/user message governs the assistant turns after it
    (Qwen3's soft switch; the latest one wins). A rendered think block must agree with it: reasoning under
    ``/no_think``, or an empty think block under ``/think``, is an error.
    """
    last_query = _last_query_index(messages)
    segments: List[Segment] = []
    context = ""  # no-loss text accumulated until the next assistant body
    dropped = 0
    switch = None  # latest mode switch seen: "think" or "no_think"
    for i, m in enumerate(messages):
        if m.role != "assistant":
            context += f"{IM_START}{m.role}\n{m.content}{IM_END}\n"
            found = _MODE_SWITCH_RE.findall(m.content)
            if found:
                switch = "no_think" if found[-1] else "think"
            continue
        reasoning = m.reasoning or ""
        if i > last_query and (i == len(messages) - 1 or reasoning):
            thought, answer = reasoning.strip("\n"), m.content.lstrip("\n")
            if switch == "no_think" and thought:
                raise SampleError("mode_switch", f"message {i}: reasoning given under /no_think")
            if switch == "think" and not thought:
                raise SampleError("mode_switch", f"message {i}: empty think block under /think")
            body = f"{THINK_START}\n{thought}\n{THINK_END}\n\n{answer}"
        else:
            body = m.content
            dropped += bool(reasoning)
        segments.append(Segment(context + f"{IM_START}assistant\n", False))
        segments.append(Segment(body + IM_END, True))
        context = "\n"
    segments.append(Segment(context, False))
    return tuple(segments), dropped


def count_itemic_references(text: str, vocab: Optional[ItemicVocab]) -> int:
    """Number of itemic tokens written in ``text``; raises :class:`SampleError` for any the vocabulary lacks.

    Full patterns (``<|prod_begin|><a_1><b_2><c_3>`` in the default scheme) must be well formed; bare code tokens
    (``<a_3664><b_3076>``, the prefix semantics of token-granularity data) are allowed, but each must name a level
    and code that exist (:meth:`ItemicScheme.count_tokens`). Without a vocabulary (``None``) any itemic-looking
    token is an error. Also rejects text that is not valid Unicode (a lone surrogate from a JSON escape), on which
    the tokenizer would fail for the whole batch.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SampleError("invalid_utf8", f"text is not valid Unicode: {e}") from None
    if vocab is None:
        found = ITEMIC_LIKE_RE.search(text)
        if found:
            raise SampleError("itemic", f"itemic token {found.group(0)!r} in the text, but the tokenizer has no "
                                        f"itemic vocabulary ({ITEMIC_JSON})")
        return 0
    try:
        return vocab.scheme.count_tokens(text)
    except ItemicPatternError as e:
        raise SampleError("itemic", str(e)) from None


class SampleEncoder:
    """Tokenizes samples with a HF tokenizer directory's ``tokenizer.json`` (``tokenizers``, batched); its
    ``itemic_tokens.json``, when there is one, names the itemic vocabulary."""

    def __init__(self, tokenizer_dir: str, config: FormatConfig = FormatConfig()) -> None:
        path = os.path.join(tokenizer_dir, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no tokenizer.json (need a fast HF tokenizer directory)")
        self.tokenizer = read_tokenizer_json(path)
        has_itemic = os.path.exists(os.path.join(tokenizer_dir, ITEMIC_JSON))
        self.vocab = ItemicVocab.load(tokenizer_dir) if has_itemic else None
        self.config = config
        self.eod_id = self.tokenizer.token_to_id(EOD_TOKEN)
        if self.eod_id is None:
            raise ValueError(f"{path}: tokenizer has no {EOD_TOKEN} token")

    def encode(self, samples: Sequence[Sample]) -> List[Union[EncodedSample, SampleError]]:
        """Encode a batch; a sample that fails gets its :class:`SampleError` in its place."""
        texts: List[str] = []
        expected: List[Union[int, SampleError]] = []
        for sample in samples:
            try:
                expected.append(sum(count_itemic_references(s.text, self.vocab) for s in sample.segments))
            except SampleError as e:
                expected.append(e)
                continue
            texts.extend(s.text for s in sample.segments if s.text)
        encodings = iter(self.tokenizer.encode_batch_fast(texts, add_special_tokens=False))
        out: List[Union[EncodedSample, SampleError]] = []
        for sample, want_itemic in zip(samples, expected):
            if isinstance(want_itemic, SampleError):
                out.append(want_itemic)
                continue
            ids, masks = [], []
            for seg in sample.segments:
                if seg.text:
                    seg_ids = next(encodings).ids
                    ids.append(np.asarray(seg_ids, dtype=np.int32))
                    masks.append(np.full(len(seg_ids), seg.loss, dtype=np.uint8))
            if sample.kind in ("segments", "text") and self.config.append_eod:
                ids.append(np.array([self.eod_id], dtype=np.int32))
                masks.append(np.array([sample.segments[-1].loss], dtype=np.uint8))
            tokens = np.concatenate(ids)
            itemic = 0 if self.vocab is None else int(np.count_nonzero(self.vocab.itemic_mask(tokens)))
            if itemic != want_itemic:
                out.append(SampleError(
                    "itemic", f"text names {want_itemic} itemic tokens but the tokenizer produced {itemic} "
                              "(not the extended tokenizer, or a code written with leading zeros?)"))
                continue
            out.append(EncodedSample(tokens, np.concatenate(masks), itemic))
        return out


def record_columns(config: FormatConfig) -> Tuple[str, ...]:
    """The columns a record of ``config``'s input format may use (a parquet file's others are never read)."""
    return ("segments", "messages", "message", "source", "domain", *config.json_keys)


def open_parquet(path: str):
    """``pyarrow.parquet.ParquetFile`` of ``path`` (reads only its footer); ``ValueError`` naming a file that is not
    parquet — call it on every input before writing anything."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({_first_line(e)})") from None


def _first_line(exc: BaseException) -> str:
    """pyarrow's messages may run over several lines (thrift's): the first says what is wrong."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def iter_input(path: str, columns: Optional[Sequence[str]] = None
               ) -> Iterator[Tuple[int, Union[bytes, Dict[str, Any]]]]:
    """``(line number, raw line)`` of a JSONL file, or ``(row number, row dict)`` of a parquet file (1-based).

    Lines stay bytes: decoding happens in :func:`parse_json_line`, so bad UTF-8 is reported with its line. Parquet
    is read batch by batch within row groups (never whole), only the ``columns`` it has (all when None); a file
    that is not readable parquet raises ``ValueError`` naming it.
    """
    if path.endswith(".parquet"):
        import pyarrow as pa

        row = 0
        try:
            parquet = open_parquet(path)
            names = parquet.schema_arrow.names
            wanted = None if columns is None else [c for c in names if c in set(columns)]
            for batch in parquet.iter_batches(batch_size=4096, columns=wanted):
                for record in batch.to_pylist():
                    row += 1
                    yield row, record
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable parquet file after row {row} ({_first_line(e)})") from None
        return
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            yield lineno, line
