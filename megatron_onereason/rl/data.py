"""RL prompts from the data users have: ``data.prompts`` (training) and ``data.eval_prompts`` (held out).

Three formats, detected per file from its fields (``data.format`` forces one):

- ``recif`` — RecIF-Bench task files, the very files ``evaluate --recif`` reads (:mod:`megatron_onereason.eval.recif`):
  parquet or JSONL with ``messages`` (system + user turns, any language; a list or a JSON string; content a string or
  a list of text parts) and ``metadata`` (a dict or a JSON string) whose ``answer`` holds the ground-truth items
  written in the checkpoint's itemic scheme.
- ``verl`` — verl-style parquet / JSONL (verl's ``examples/data_preprocess``): ``prompt`` (chat messages, as above),
  ``reward_model.ground_truth`` (items written in the scheme, as one string or a list, or a list of catalog item
  ids) and optionally ``data_source`` (kept as the prompt's source tag).
- ``benchmark`` — the synthetic benchmark JSONL (``user_id``, ``portrait``, ``history``, ``targets``: see
  :mod:`megatron_onereason.eval.benchmark`), one prompt per (user, target domain) and per R2 evolution task.

Ground truth becomes catalog item ids (rewards and Recall@K compare catalog items): items written in the scheme
are looked up in ``data.catalog``. Prompts are rendered with the tokenizer's chat template: RecIF and verl rows as
OpenOneRec renders them (its ``qwen3_soft_switch`` template: ``/think`` or ``/no_think`` appended to the last user
turn, :func:`megatron_onereason.eval.recif.prompt_text`, the rendering ``evaluate --recif`` uses); benchmark rows in
the chat layout of this project's SFT corpus (:func:`megatron_onereason.generation.prompts.chat_prompt_ids`), whose
data they are.

A bad row stops loading with one line naming ``file: row N`` (0-based, as RecIF sample ids) and the field; with
``data.skip_invalid`` it is skipped and counted by reason. A prompt whose tokens leave no room for the rollout
(``max_think_tokens`` and the item, within the rollout context) is dropped and counted.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_onereason.data.formats import SampleError, iter_input, open_parquet, parse_json_line
from megatron_onereason.eval.benchmark import load_benchmark, task_instances, task_messages
from megatron_onereason.eval.recif import answer_items, chat_messages, json_field, load_recif_task, prompt_text
from megatron_onereason.generation.params import Prompt
from megatron_onereason.generation.prompts import chat_prompt_ids
from megatron_onereason.tokenizer.item_catalog import ItemCatalog, UnknownItemError
from megatron_onereason.tokenizer.itemic_tokens import ItemicPatternError, ItemicScheme

log = logging.getLogger("megatron_onereason.rl")

FORMATS = ("recif", "verl", "benchmark")
_SIGNATURES = (("recif", ("messages", "metadata")), ("verl", ("prompt", "reward_model")),
               ("benchmark", ("user_id", "targets")))


@dataclass(frozen=True)
class RLPrompt:
    """One RL prompt: its chat turns, rendered tokens and ground truth."""

    source: str  # "file: row N"
    user_id: str  # groups a user's samples (RFT caps and dedupes per user)
    messages: Tuple[Dict[str, str], ...]  # up to the user turn the model answers
    prompt: Prompt  # rendered token ids + target domain (its begin token forced; None: the model chooses)
    targets: Tuple[str, ...]  # catalog item ids; empty for general-domain prompts
    task: str = "rec"  # rec (R3), evolution (R2), general (MOPD general-domain)
    history: Tuple[Tuple[Optional[str], Tuple[int, ...]], ...] = ()  # items the prompt cites, (domain, codes)

    @property
    def domain(self) -> Optional[str]:
        return self.prompt.domain


@dataclass
class PromptSet:
    path: str
    format: str
    prompts: List[RLPrompt]
    skipped: Dict[str, int] = field(default_factory=dict)  # reason -> rows skipped (data.skip_invalid)
    too_long: int = 0  # prompts dropped: longer than the rollout context allows


class PromptRenderer:
    """Renders chat turns to prompt tokens for one run (its tokenizer, thinking mode and context budget)."""

    def __init__(self, tokenizer, scheme: ItemicScheme, thinking: bool, max_prompt_tokens: int):
        self.tokenizer, self.scheme, self.thinking = tokenizer, scheme, thinking
        self.max_prompt_tokens = max_prompt_tokens

    def soft_switch(self, messages: Sequence[Dict[str, str]]) -> List[int]:
        """OpenOneRec's rendering (RecIF, verl): the ``/think`` or ``/no_think`` soft switch on the last user turn."""
        return self.tokenizer.encode(prompt_text(self.tokenizer, messages, self.thinking), add_special_tokens=False)

    def chat(self, messages: Sequence[Dict[str, str]]) -> List[int]:
        """This project's SFT chat layout (synthetic benchmark, MOPD general-domain prompts)."""
        return chat_prompt_ids(self.tokenizer, messages, self.thinking)

    def history(self, messages: Sequence[Dict[str, str]]):
        """The items the prompt's turns cite, as ``(domain, codes)`` (the RFT grounding filter's history)."""
        out = []
        for m in messages:
            try:
                out.extend((i.domain, i.codes) for i in self.scheme.find_items(m["content"]))
            except ItemicPatternError:
                pass  # a malformed pattern in free text cites nothing
        return tuple(out)


def rollout_prompt_budget(context: int, max_think_tokens: int, levels: int) -> int:
    """Longest prompt that leaves room for the rollout within ``context`` tokens: the reasoning budget, the tokens
    that close it (``</think>`` and the answer separator, at most 3), and the item (begin, ``levels`` codes, end)."""
    return context - max_think_tokens - 3 - (levels + 2)


def prompt_renderer(cfg, tokenizer, scheme: ItemicScheme) -> PromptRenderer:
    """The run's renderer: ``rollout.thinking``; the rollout context is ``rollout.engine_args.max_model_len`` when
    set, else the model's ``max_position_embeddings``."""
    from megatron_onereason.model.qwen3_config import Qwen3Config

    r = cfg.rollout
    context = r.engine_args.get("max_model_len") or Qwen3Config.from_hf_dir(r.model_dir).max_position_embeddings
    budget = rollout_prompt_budget(int(context), r.max_think_tokens if r.thinking else 0, scheme.levels)
    return PromptRenderer(tokenizer, scheme, r.thinking, budget)


def detect_format(path: str) -> str:
    """The format of ``path`` from its fields (parquet schema, or the first JSONL record's keys)."""
    if path.endswith(".parquet"):
        names = set(open_parquet(path).schema_arrow.names)
    else:
        names = set()
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    try:
                        names = set(parse_json_line(line))
                    except SampleError as e:
                        raise ValueError(f"{path}: row 0: {e}") from None
                    break
            else:
                raise ValueError(f"{path}: empty (no prompt records): nothing to train or evaluate on")
    for name, required in _SIGNATURES:
        if set(required) <= names:
            return name
    raise ValueError(f"{path}: cannot tell the RL data format from its fields {sorted(names)}: a RecIF task file has "
                     "messages + metadata, a verl parquet prompt + reward_model, the synthetic benchmark user_id + "
                     f"targets (or set data.format to one of {list(FORMATS)})")


def load_prompts(path: str, catalog: ItemCatalog, renderer: PromptRenderer, fmt: str = "auto",
                 skip_invalid: bool = False, tasks: Sequence[str] = ("rec",),
                 domains: Optional[Sequence[str]] = None) -> PromptSet:
    """Every prompt of ``path`` (format ``fmt``, ``auto``: detected); ``tasks`` / ``domains`` keep the benchmark's
    task kinds and, for every format, the prompts whose target domain is listed."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (RL prompts: a RecIF task file, a verl parquet or a benchmark JSONL)")
    fmt = detect_format(path) if fmt == "auto" else fmt
    out = PromptSet(path, fmt, [])
    if fmt == "benchmark":
        rows = _benchmark_rows(path, catalog, renderer, tasks, domains)
    else:
        reader = _recif_rows if fmt == "recif" else _verl_rows
        rows = reader(path, catalog, renderer, skip_invalid, out.skipped)
    for p in rows:
        if domains is not None and p.domain not in domains:
            continue
        if len(p.prompt.token_ids) > renderer.max_prompt_tokens:
            out.too_long += 1
            continue
        out.prompts.append(p)
    if out.too_long:
        log.warning("%s: %d prompt(s) dropped: longer than the %d tokens the rollout context leaves for a prompt",
                    path, out.too_long, renderer.max_prompt_tokens)
    if out.skipped:
        log.warning("%s: rows skipped (data.skip_invalid): %s", path, out.skipped)
    if not out.prompts:
        raise ValueError(f"{path}: no usable prompt ({fmt} format; skipped {out.skipped or 'none'}, too long "
                         f"{out.too_long}{'' if domains is None else f', domains {list(domains)}'})")
    return out


def _catalog_ids(items, catalog: ItemCatalog, where: str) -> Tuple[str, ...]:
    """Catalog ids of items written in the scheme (``ItemMatch``); an item the catalog lacks is a bad field."""
    ids = []
    for item in items:
        found = catalog.item_ids_for(item.domain, item.codes)
        if not found:
            raise SampleError("unknown_item", f"{where}: item {item.domain or ''}{tuple(item.codes)} is not in "
                                              "data.catalog")
        ids.append(found[0])
    return tuple(ids)


def _is_catalog_id(catalog: ItemCatalog, value: str) -> bool:
    try:
        catalog.domain_for(value)
    except UnknownItemError:
        return False
    return True


def _rec_prompt(source, user_id, messages, targets, catalog: ItemCatalog, renderer: PromptRenderer) -> RLPrompt:
    """A recommendation prompt; its domain (the begin token forced) is its first target's, as the benchmark's."""
    ids = renderer.soft_switch(messages)
    return RLPrompt(source, user_id, tuple(messages), Prompt(tuple(ids), catalog.domain_for(targets[0])), targets,
                    history=renderer.history(messages))


def _recif_rows(path, catalog, renderer, skip_invalid, skipped):
    task = load_recif_task(path, renderer.scheme, skip_invalid=skip_invalid)
    for reason, n in task.skipped.items():
        skipped[reason] = skipped.get(reason, 0) + n
    for s in task.samples:
        source = f"{path}: row {s.sample_id}"
        try:
            targets = _catalog_ids(s.targets, catalog, "metadata.answer")
        except SampleError as e:
            if not skip_invalid:
                raise ValueError(f"{source}: {e}") from None
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            continue
        user = s.metadata.get("uid", s.sample_id)
        yield _rec_prompt(source, str(user), s.messages, targets, catalog, renderer)


def _verl_ground_truth(row: Dict[str, Any], catalog: ItemCatalog, scheme: ItemicScheme) -> Tuple[str, ...]:
    truth = json_field(row, "reward_model", dict).get("ground_truth")
    values = [truth] if isinstance(truth, str) else truth
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise SampleError("no_answer", "reward_model.ground_truth must be items written in the scheme (a string or "
                                       "a list of strings) or a list of catalog item ids")
    ids: List[str] = []
    for value in values:
        if _is_catalog_id(catalog, value.strip()):
            ids.append(value.strip())
            continue
        try:
            items = answer_items(value, scheme)
        except ValueError as e:
            raise SampleError("answer", f"reward_model.ground_truth: neither a catalog item id nor items in scheme "
                                        f"{scheme.name!r}: {e}") from None
        if not items:
            raise SampleError("answer", f"reward_model.ground_truth names no item: {value[:80]!r}")
        ids.extend(_catalog_ids(items, catalog, "reward_model.ground_truth"))
    return tuple(ids)


def _verl_rows(path, catalog, renderer, skip_invalid, skipped):
    try:
        records = list(iter_input(path, columns=("prompt", "reward_model", "data_source", "extra_info")))
    except ValueError as e:
        raise ValueError(str(e).splitlines()[0]) from None
    for number, raw in records:
        row_id = number - 1
        if isinstance(raw, bytes) and not raw.strip():
            continue
        try:
            row = parse_json_line(raw) if isinstance(raw, bytes) else raw
            messages = chat_messages(row, "prompt")
            targets = _verl_ground_truth(row, catalog, renderer.scheme)
        except SampleError as e:
            if not skip_invalid:
                raise ValueError(f"{path}: row {row_id}: {e}") from None
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            continue
        extra = row.get("extra_info")
        user = extra.get("index", row_id) if isinstance(extra, dict) else row_id
        yield _rec_prompt(f"{path}: row {row_id}", str(user), messages, targets, catalog, renderer)


def _benchmark_rows(path, catalog, renderer, tasks, domains):
    """The synthetic benchmark as one adapter: its task instances, their messages rendered in the chat layout."""
    for n, instance in enumerate(task_instances(load_benchmark(path, catalog), tasks, domains)):
        messages = task_messages(instance, catalog, renderer.scheme)
        yield RLPrompt(f"{path}: instance {n}", instance.user.user_id, tuple(messages),
                       Prompt(tuple(renderer.chat(messages)), instance.domain), tuple(instance.targets),
                       instance.task, renderer.history(messages))


def general_prompts(messages: Sequence[Sequence[Dict[str, str]]], renderer: PromptRenderer,
                    source: str) -> List[RLPrompt]:
    """MOPD general-domain prompts (``data.general_prompts``) as RL prompts: no domain, no target."""
    return [RLPrompt(f"{source}: record {i}", f"general/{i}", tuple(m), Prompt(tuple(renderer.chat(m)), None), (),
                     "general") for i, m in enumerate(messages)]


def describe(prompts: PromptSet) -> str:
    return json.dumps({"file": prompts.path, "format": prompts.format, "prompts": len(prompts.prompts),
                       "skipped": prompts.skipped, "too_long": prompts.too_long})


def load_run_prompts(cfg, catalog: ItemCatalog, renderer: PromptRenderer) -> Tuple[PromptSet, Optional[PromptSet]]:
    """The run's training prompts (``data.prompts``, of ``data.tasks``) and held-out prompts (``data.eval_prompts``:
    recommendation prompts only, Recall@K is a recommendation metric; None without)."""
    d = cfg.data
    sets = []
    for path, tasks in ((d.prompts, d.tasks), (d.eval_prompts, ("rec",))):
        prompts = load_prompts(path, catalog, renderer, d.format, d.skip_invalid, tasks, d.domains) if path else None
        if prompts is not None:
            log.info("RL prompts: %s", describe(prompts))
        sets.append(prompts)
    return sets[0], sets[1]
