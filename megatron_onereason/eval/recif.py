"""RecIF-Bench (OpenOneRec's recommendation benchmark): task files, stored generations and their per-sample scores.

**Task files.** ``{task}/{task}_{split}.parquet`` (or a JSONL file with the same fields), one sample per row:

- ``messages``: a JSON string (or a list) of chat turns, system + user; ``content`` is a string or a list of
  ``{"type": "text", "text": ...}`` parts, joined (:func:`~megatron_onereason.data.formats.message_text`);
- ``metadata``: a JSON string (or an object) with ``answer`` — the ground-truth items written in the checkpoint's
  scheme, in order, the first being the user's next interaction — and ``uid``, ``answer_pid`` (the answer's
  product ids; ``answer_iid`` for the goods task) and other fields, kept as they are.

A sample's id is its 0-based row number (OpenOneRec's dataframe index), so dumps line up with OpenOneRec's.
``sid2pid.json`` maps a code tuple, encoded ``c1·8192² + c2·8192 + c3``, to the products sharing it:
``{"key": [{"pid": int, "count": int, "count_after_downsample": int}, ...]}``.

**Generation dumps** (OpenOneRec's ``{task}_generated.json``; ``evaluate --recif`` writes the same layout):
``{"model_name", "task_name", "split", ..., "samples": {id: {"prompt", "generations": [str], "ground_truth": str,
"metadata": {...}, "logprobs": [float], "pid_generations": [int]}}}`` (``logprobs`` and ``pid_generations``
optional).

Items are written in an itemic scheme (:mod:`~megatron_onereason.tokenizer.itemic_tokens`): RecIF-Bench and
released OpenOneRec checkpoints use ``openonerec`` (``<|sid_begin|><s_a_N><s_b_N><s_c_N><|sid_end|>``).

**Scoring** (OpenOneRec's recommendation evaluator with its defaults, ``select_k="first_k"``): a sample's
predictions are its generations in stored order, duplicates included; each is read as one item
(:func:`generation_item`). ``pass@K``, ``position1_pass@K`` and ``recall@K`` are
:mod:`~megatron_onereason.eval.metrics`' over code tuples (OpenOneRec compares the text between the begin and end
tokens: the codes). The ``pid_*`` versions take product ids instead: targets are ``answer_pid`` without zeros,
predictions each generation's item mapped through ``sid2pid`` (or the dump's ``pid_generations``); an unmapped item
never hits. A sample with no generation or no target scores 0 (as in OpenOneRec) and is counted.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

from megatron_onereason.data.formats import (
    NO_THINK,
    THINK,
    THINK_END,
    SampleError,
    iter_input,
    message_text,
    parse_json_line,
)
from megatron_onereason.eval.metrics import pass_at_k, position1_pass_at_k, recall_at_k
from megatron_onereason.fileio import atomic_file
from megatron_onereason.tokenizer.itemic_tokens import ItemicPatternError, ItemicScheme, ItemMatch

RECIF_ANSWER_SEPARATOR = "\n"  # OpenOneRec's stage 2 continues the trace with "</think>\n" and the begin token
DEFAULT_KS = (1, 32, 128)  # OpenOneRec's k_values
SID2PID_RADIX = 8192  # OpenOneRec's key encoding, whatever the codebook size
DEFAULT_SCHEME = "openonerec"  # the scheme RecIF-Bench files and OpenOneRec's dumps are written in
PID_STRATEGIES = ("most_popular_after_downsampling", "most_popular_originally", "random")
Codes = Tuple[int, ...]


class RecifError(ValueError):
    """Bad RecIF input; the message names the file, the sample and the field."""


# ---------------------------------------------------------------------------------------------- item text
def _codes_text(scheme: ItemicScheme, codes: Codes) -> str:
    return "".join(scheme.code_for(level, code) for level, code in enumerate(codes))


def answer_items(answer: str, scheme: ItemicScheme) -> List[ItemMatch]:
    """The ground-truth items of ``answer``, in order: complete patterns of ``scheme`` with only whitespace around
    them, each written exactly as the scheme writes it; anything else raises ``ValueError``."""
    items, pos = [], 0
    for match in scheme.find_items(answer):
        gap = answer[pos:match.start]
        if gap.strip() or answer[match.start:match.end] != scheme.format_item(match.domain, match.codes):
            break
        items.append(match)
        pos = match.end
    if answer[pos:].strip():
        raise ValueError(f"malformed item at {answer[pos:].strip()[:60]!r}")
    return items


def generation_item(generation: str, scheme: ItemicScheme) -> Optional[Codes]:
    """The codes of the one item a generation names, or None.

    The answer is the text after the last ``</think>``, stripped. It names an item when it is exactly one pattern
    written as ``scheme`` writes it (the end token may be missing: generation stops after the last code) or exactly
    the code tokens (a non-thinking dump stores only what followed the forced begin token). OpenOneRec takes the
    first non-empty piece between begin tokens; the two differ only on answers holding several patterns or text
    beside one, which neither decoding produces.
    """
    answer = generation.split(THINK_END)[-1].strip()
    bare = scheme.loose_item_re.match(answer) is None  # no begin token in front: the code tokens alone
    try:
        domain, codes = scheme.parse_item((scheme.begin_for(scheme.marker_keys()[0]) if bare else "") + answer,
                                          require_end=False)
        codes_text, begin = _codes_text(scheme, codes), scheme.begin_for(domain)
    except ItemicPatternError:
        return None
    written = {codes_text} if bare else {begin + codes_text, begin + codes_text + (scheme.end_for(domain) or "")}
    return codes if answer in written else None


# ---------------------------------------------------------------------------------------------- task files
@dataclass(frozen=True)
class RecifSample:
    sample_id: str
    messages: Tuple[Dict[str, str], ...]  # {"role", "content"} with content flattened to a string
    answer: str  # the ground truth as written
    targets: Tuple[ItemMatch, ...]  # its items, in order (domain None for a shared begin token)
    metadata: Dict[str, Any]  # the row's metadata without "answer"


@dataclass
class RecifTask:
    name: str
    path: str
    samples: List[RecifSample]
    skipped: Dict[str, int] = field(default_factory=dict)  # reason -> rows skipped (--skip-invalid)


def task_file(path: str, split: str = "test") -> Tuple[str, str]:
    """``(task name, data file)`` for a task folder (``{task}/{task}_{split}.parquet``), a parquet or a JSONL file."""
    if os.path.isdir(path):
        name = os.path.basename(os.path.normpath(path))
        candidates = [os.path.join(path, f"{name}_{split}.{ext}") for ext in ("parquet", "jsonl")]
        for candidate in candidates:
            if os.path.exists(candidate):
                return name, candidate
        raise RecifError(f"{path}: a RecIF task folder needs {os.path.basename(candidates[0])} (or .jsonl)")
    if not os.path.exists(path):
        raise RecifError(f"{path}: no such file or directory")
    if not path.endswith((".parquet", ".jsonl")):
        raise RecifError(f"{path}: expected a task folder, a .parquet or a .jsonl file")
    name = os.path.basename(path).rsplit(".", 1)[0]
    suffix = f"_{split}"
    return (name[:-len(suffix)] if name.endswith(suffix) else name), path


def json_field(row: Dict[str, Any], key: str, kind: type) -> Any:
    """``row[key]`` as a ``kind`` (list or dict), given as is or as a JSON string; else :class:`SampleError`."""
    value = row.get(key)
    if value is None:
        raise SampleError("schema", f"missing {key!r}")
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SampleError("schema", f"{key!r} is not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise SampleError("schema", f"{key!r} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def chat_messages(row: Dict[str, Any], key: str) -> List[Dict[str, str]]:
    """The prompt turns in ``row[key]`` (a list or a JSON string), content flattened to a string; they must end
    with the user turn the model answers. Bad input raises :class:`SampleError` naming the field."""
    messages = []
    for i, m in enumerate(json_field(row, key, list)):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise SampleError("schema", f"{key}[{i}] must be an object with role system, user or assistant")
        content = message_text(m.get("content"), i)
        if content is None:
            raise SampleError("schema", f"{key}[{i}] has no content")
        messages.append({"role": m["role"], "content": content})
    if not messages or messages[-1]["role"] != "user":
        raise SampleError("schema", f"{key!r} must end with the user turn the model answers")
    return messages


def _parse_row(row: Dict[str, Any], sample_id: str, scheme: ItemicScheme) -> RecifSample:
    messages = chat_messages(row, "messages")
    metadata = json_field(row, "metadata", dict)
    answer = metadata.pop("answer", None)
    if not isinstance(answer, str) or not answer.strip():
        raise SampleError("no_answer", "'metadata' has no non-empty string 'answer'")
    try:
        targets = answer_items(answer, scheme)
    except ValueError as e:
        raise SampleError("answer", f"metadata.answer is not written in scheme {scheme.name!r}: {e}") from None
    if not targets:
        raise SampleError("answer", f"metadata.answer names no item: {answer[:80]!r}")
    return RecifSample(sample_id, tuple(messages), answer.strip(), tuple(targets), metadata)


def _records(path: str) -> Iterator[Tuple[int, Any]]:
    """``(0-based row, parquet row dict or raw JSONL line)``; an unreadable file raises :class:`RecifError`."""
    try:
        for number, raw in iter_input(path, columns=("messages", "metadata")):
            yield number - 1, raw
    except ValueError as e:  # names the file
        raise RecifError(str(e).splitlines()[0]) from None
    except OSError as e:
        raise RecifError(f"{path}: not readable ({e})") from None


def load_recif_task(path: str, scheme: ItemicScheme, split: str = "test", skip_invalid: bool = False,
                    limit: int = 0) -> RecifTask:
    """Read a RecIF task whose answers are written in ``scheme``; a bad row raises :class:`RecifError` naming
    ``file: row N: field`` (or, with ``skip_invalid``, is skipped and counted by reason). ``limit``: keep the first
    N valid samples."""
    name, data_file = task_file(path, split)
    task = RecifTask(name, data_file, [])
    for number, raw in _records(data_file):
        if limit and len(task.samples) >= limit:
            break
        if isinstance(raw, bytes) and not raw.strip():
            continue
        try:
            row = parse_json_line(raw) if isinstance(raw, bytes) else raw
            task.samples.append(_parse_row(row, str(number), scheme))
        except SampleError as e:
            if not skip_invalid:
                raise RecifError(f"{data_file}: row {number}: {e}") from None
            task.skipped[e.reason] = task.skipped.get(e.reason, 0) + 1
    if not task.samples:
        raise RecifError(f"{data_file}: no valid samples ({sum(task.skipped.values())} skipped)")
    return task


def soft_switch(messages: Sequence[Dict[str, str]], thinking: bool) -> List[Dict[str, str]]:
    """Qwen3's soft switch as OpenOneRec applies it: ``/think`` or ``/no_think`` appended to the last user turn."""
    out = [dict(m) for m in messages]
    last_user = max(i for i, m in enumerate(out) if m["role"] == "user")
    out[last_user]["content"] += THINK if thinking else NO_THINK
    return out


def prompt_text(tokenizer, messages: Sequence[Dict[str, str]], thinking: bool) -> str:
    """The benchmark's prompt, rendered as OpenOneRec's ``qwen3_soft_switch`` template renders it.

    That template is Qwen3's with the switch appended to the last user turn: the messages are used verbatim, a
    thinking prompt ends with ``<|im_start|>assistant\\n`` (the model opens its reasoning itself), a non-thinking
    one with the empty think block ``<think>\\n\\n</think>\\n\\n``.
    """
    return tokenizer.apply_chat_template(soft_switch(messages, thinking), tokenize=False, add_generation_prompt=True,
                                         enable_thinking=thinking)


# ---------------------------------------------------------------------------------------------- sid2pid
class Sid2Pid:
    """Item code tuple → one product id, chosen among the products sharing the tuple as OpenOneRec chooses.

    ``most_popular_after_downsampling`` (OpenOneRec's default): the highest ``count_after_downsample``, ties drawn
    at random; ``most_popular_originally``: the first listed (highest ``count``); ``random``: any. The draws come
    from a seeded generator, so a run is reproducible (OpenOneRec's are not).
    """

    def __init__(self, table: Dict[int, List[Dict[str, int]]], strategy: str = PID_STRATEGIES[0], seed: int = 0):
        if strategy not in PID_STRATEGIES:
            raise ValueError(f"unknown sid2pid strategy {strategy!r} (known: {PID_STRATEGIES})")
        self.table = table
        self.strategy = strategy
        self.rng = random.Random(seed)

    @classmethod
    def load(cls, path: str, strategy: str = PID_STRATEGIES[0], seed: int = 0) -> "Sid2Pid":
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RecifError(f"{path}: not a readable sid2pid JSON file ({e})") from None
        if not isinstance(raw, dict):
            raise RecifError(f"{path}: expected an object {{encoded code tuple: [{{pid, count, ...}}]}}")
        table = {}
        for key, entries in raw.items():
            if not key.lstrip("-").isdigit() or not isinstance(entries, list) or not all(
                    isinstance(e, dict) and isinstance(e.get("pid", e.get("iid")), int) for e in entries):
                raise RecifError(f"{path}: entry {key!r} must map an integer key to a list of {{\"pid\": int, ...}}")
            table[int(key)] = entries
        needs = {"most_popular_after_downsampling": "count_after_downsample"}.get(strategy)
        if needs and any(needs not in e for entries in table.values() for e in entries):
            raise RecifError(f"{path}: strategy {strategy} needs {needs!r} in every entry")
        return cls(table, strategy, seed)

    @staticmethod
    def key(codes: Codes) -> int:
        key = 0
        for code in codes:
            key = key * SID2PID_RADIX + int(code)
        return key

    def pid(self, codes: Optional[Codes]) -> Optional[int]:
        entries = self.table.get(self.key(codes)) if codes is not None else None
        if not entries:
            return None
        ids = [e.get("pid", e.get("iid")) for e in entries]
        if self.strategy == "most_popular_originally":
            return ids[0]
        if self.strategy == "most_popular_after_downsampling":
            best = max(e["count_after_downsample"] for e in entries)
            ids = [i for i, e in zip(ids, entries) if e["count_after_downsample"] == best]
        return ids[0] if len(ids) == 1 else self.rng.choice(ids)


# ---------------------------------------------------------------------------------------------- dumps
@dataclass
class StoredSample:
    sample_id: str
    generations: List[str]
    ground_truth: str
    metadata: Dict[str, Any]
    pid_generations: Optional[List[int]] = None  # OpenOneRec's mapping of each generation (0 / -1: none)
    prompt: str = ""
    logprobs: Optional[List[float]] = None  # each generation's item log-probability (its beam score)


def read_generations(path: str) -> Tuple[Dict[str, Any], List[StoredSample]]:
    """``(header fields, samples in file order)`` of a generation dump."""
    try:
        with open(path, encoding="utf-8") as f:
            dump = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecifError(f"{path}: not a readable generation dump ({e})") from None
    if not isinstance(dump, dict) or not isinstance(dump.get("samples"), dict):
        raise RecifError(f"{path}: a generation dump is an object with 'samples': {{id: sample}}")
    samples = []
    for sample_id, s in dump["samples"].items():
        where = f"{path}: sample {sample_id}"
        if not isinstance(s, dict):
            raise RecifError(f"{where}: expected an object")
        generations, truth = s.get("generations"), s.get("ground_truth")
        if not isinstance(generations, list) or not all(isinstance(g, str) for g in generations):
            raise RecifError(f"{where}: 'generations' must be a list of strings")
        if not isinstance(truth, str):
            raise RecifError(f"{where}: 'ground_truth' must be a string")
        metadata = s.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise RecifError(f"{where}: 'metadata' must be an object")
        pids = s.get("pid_generations")
        if pids is not None and (not isinstance(pids, list) or len(pids) != len(generations)
                                 or not all(isinstance(p, int) for p in pids)):
            raise RecifError(f"{where}: 'pid_generations' must be one integer per generation")
        samples.append(StoredSample(str(sample_id), generations, truth, metadata, pids, s.get("prompt", ""),
                                    s.get("logprobs")))
    header = {k: v for k, v in dump.items() if k != "samples"}
    return header, samples


def write_generations(path: str, header: Dict[str, Any], samples: Sequence[StoredSample],
                      per_sample: Sequence[Dict[str, Any]]) -> None:
    """A generation dump in OpenOneRec's layout, each sample with its scores (as OpenOneRec's debug dump has)."""
    dump = dict(header, samples={})
    for s, scores in zip(samples, per_sample):
        entry = {"prompt": s.prompt, "generations": s.generations, "ground_truth": s.ground_truth,
                 "metadata": s.metadata}
        if s.logprobs is not None:
            entry["logprobs"] = s.logprobs
        entry.update((k, v) for k, v in scores.items() if k != "id")
        dump["samples"][s.sample_id] = entry
    with atomic_file(path) as f:
        json.dump(dump, f, ensure_ascii=False, indent=1)


# ---------------------------------------------------------------------------------------------- scoring
def sample_metrics(predictions: Sequence[Optional[Hashable]], targets: Sequence[Hashable], ks: Sequence[int],
                   prefix: str = "") -> Dict[str, float]:
    """``pass@K``, ``position1_pass@K``, ``recall@K`` of one sample; all 0 without a target (OpenOneRec)."""
    out = {}
    for k in ks:
        out[f"{prefix}pass@{k}"] = pass_at_k(predictions, targets, k) if targets else 0.0
        out[f"{prefix}position1_pass@{k}"] = position1_pass_at_k(predictions, targets, k) if targets else 0.0
        out[f"{prefix}recall@{k}"] = recall_at_k(predictions, targets, k) if targets else 0.0
    return out


def answer_pids(metadata: Dict[str, Any], where: str) -> List[int]:
    """The product-id targets: ``answer_pid`` (``answer_iid`` for goods) without zeros, in order."""
    pids = metadata.get("answer_pid", metadata.get("answer_iid"))
    if isinstance(pids, str):
        try:
            pids = json.loads(pids)
        except json.JSONDecodeError:
            pids = None
    if not isinstance(pids, list) or not all(isinstance(p, int) for p in pids):
        raise RecifError(f"{where}: pid metrics need metadata.answer_pid, a list of integer product ids")
    return [p for p in pids if p != 0]


def score_samples(samples: Sequence[StoredSample], scheme: ItemicScheme, ks: Sequence[int] = DEFAULT_KS,
                  sid2pid: Optional[Sid2Pid] = None, source: str = "generations") -> Dict:
    """``{"k", "pid_source", "counts", "mean", "per_sample"}``; ``per_sample`` in the order of ``samples``.

    ``pid_*`` metrics come from ``sid2pid`` when given, else from the samples' ``pid_generations`` when every
    sample has them, else are not computed. ``source`` names the input in error messages.
    """
    if not samples:
        raise RecifError(f"{source}: no samples")
    stored_pids = [s.pid_generations is not None for s in samples]
    if sid2pid is None and any(stored_pids) and not all(stored_pids):
        missing = samples[stored_pids.index(False)].sample_id
        raise RecifError(f"{source}: sample {missing} has no 'pid_generations' while others do; pass --sid2pid")
    with_pids = sid2pid is not None or all(stored_pids)
    counts = {"samples": len(samples), "no_generations": 0, "no_target": 0, "no_pid_target": 0,
              "unparsed_generations": 0, "generations": 0}
    per_sample = []
    for s in samples:
        where = f"{source}: sample {s.sample_id}"
        try:
            targets = [m.codes for m in answer_items(s.ground_truth, scheme)]
        except ValueError as e:
            raise RecifError(f"{where}: ground_truth: {e}") from None
        items = [generation_item(g, scheme) for g in s.generations]
        counts["generations"] += len(items)
        counts["unparsed_generations"] += sum(i is None for i in items)
        counts["no_generations"] += not items
        counts["no_target"] += not targets
        row: Dict[str, Any] = {"id": s.sample_id, **sample_metrics(items, targets, ks)}
        if with_pids:
            pid_targets = answer_pids(s.metadata, where)
            counts["no_pid_target"] += not pid_targets
            if sid2pid is not None:
                pids = [sid2pid.pid(i) for i in items]
            else:
                pids = [p if p > 0 else None for p in s.pid_generations]
            row.update(sample_metrics(pids, pid_targets, ks, prefix="pid_"))
        per_sample.append(row)
    most = max(len(s.generations) for s in samples)
    if max(ks) > most:
        raise RecifError(f"{source}: K={max(ks)} is above the {most} generations a sample has at most: Pass@{max(ks)} "
                         f"would be Pass@{most} under another name; use K values <= {most} (--k)")
    metric_names = [k for k in per_sample[0] if k != "id"]
    mean = {name: sum(r[name] for r in per_sample) / len(per_sample) for name in metric_names}
    return {"k": list(ks), "pid_source": None if not with_pids else ("sid2pid" if sid2pid else "pid_generations"),
            "counts": counts, "mean": mean, "per_sample": per_sample}


def score_generations(path: str, ks: Sequence[int] = DEFAULT_KS, sid2pid: Optional[Sid2Pid] = None,
                      scheme: Optional[ItemicScheme] = None) -> Dict:
    """Score a generation dump file (see :func:`score_samples`). The scheme: ``scheme``, else the one the dump
    records (``evaluate --recif`` writes it), else :data:`DEFAULT_SCHEME` (RecIF-Bench's)."""
    header, samples = read_generations(path)
    if scheme is None:
        try:
            scheme = ItemicScheme.from_dict(header.get("scheme", DEFAULT_SCHEME), where=f"{path}: scheme")
        except ValueError as e:
            raise RecifError(f"{path}: 'scheme': {e}") from None
    return {"source": path, "model_name": header.get("model_name"), "task_name": header.get("task_name"),
            "scheme": scheme.name, **score_samples(samples, scheme, ks, sid2pid, path)}


# ---------------------------------------------------------------------------------------------- evaluation
def generated_sample(sample: RecifSample, prompt: str, output, tokenizer) -> StoredSample:
    """A sample's generations as OpenOneRec stores them: trace-major (trace 0's items best first, then trace 1's),
    each the decoded trace (reasoning, ``</think>``, separator) plus the item; ``logprobs`` the item's code tokens'
    log-probability (OpenOneRec's beam ``cum_logprob``: the begin token is part of the context)."""
    generations, logprobs = [], []
    for trace in output.traces:
        reasoning = tokenizer.decode(trace.token_ids, skip_special_tokens=False)
        for completion in trace.completions:
            generations.append(reasoning + tokenizer.decode(completion.token_ids, skip_special_tokens=False))
            logprobs.append(float(sum(completion.model_logprobs[1:])))
    return StoredSample(sample.sample_id, generations, sample.answer, sample.metadata, prompt=prompt,
                        logprobs=logprobs)


def markdown_table(results: Dict[str, Dict]) -> str:
    """One row per mode, a column per metric (in %)."""
    names = [n for n in next(iter(results.values()))["mean"]]
    lines = ["| mode | samples | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for mode, r in results.items():
        cells = [mode, str(r["counts"]["samples"])] + [f"{100 * r['mean'][n]:.2f}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
