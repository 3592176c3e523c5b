"""The recommendation benchmark: JSONL format, loading, prompts, and a synthetic benchmark (OneReason §3.1.4 R3,
§3.1.3 R2).

One user per line::

    {"user_id": "u000007",
     "portrait": "The user is a parent who often engages with content about cooking, baking, coffee.",
     "history": ["video_000012", "prod_000003", ...],
     "targets": {"video": ["video_000040"], "prod": ["prod_000017", "prod_000021"]},
     "evolution": [{"topic": "cooking", "actions": ["video_000012", "prod_000003"]}]}

- ``user_id``: unique string; ``portrait``: the user portrait P, free text;
- ``history``: the multi-domain interaction history H, item ids oldest first (written into the prompt as itemic
  patterns through the item catalog);
- ``targets``: per target domain d, the ground-truth next items (non-empty, each of domain d);
- ``evolution`` (optional): R2 Evolution Action Selection tasks — an interest topic t and the history items that
  belong to its evolution (non-empty, each in ``history``).

Tasks (``rl.data.tasks``): each ``(user, target domain)`` pair is one cross-domain recommendation instance (task
``rec``, R3): portrait + full history + d → next items of d, scored with Pass@K / Recall@K at item level. Each
evolution record is one ``evolution`` instance (R2): history + topic → its related actions, one item per answer,
rewarded like a recommendation (eq. 8 against the action set), so Mix-RL over R2 + R3 (§6.2) runs the same two-stage
rollout. Item ids are checked against the catalog on load; an error names ``file:line``.
"""
from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from megatron_onereason.data.formats import parse_json_line
from megatron_onereason.data.synthetic_catalog import DOMAIN_NOUNS, SyntheticCatalog
from megatron_onereason.data.synthetic_corpus import items_from_catalogs
from megatron_onereason.tokenizer.item_catalog import ItemCatalog, UnknownItemError
from megatron_onereason.tokenizer.itemic_tokens import ItemicScheme

TASKS = ("rec",)  # what evaluate.py scores
RL_TASKS = ("rec", "evolution")  # what the RL data can hold (Mix-RL: R3 + R2)
PORTRAIT_AGES = ("a student", "a young professional", "a parent", "a retiree")


@dataclass(frozen=True)
class EvolutionTask:
    topic: str
    actions: Tuple[str, ...]  # history item ids that belong to the topic's evolution


@dataclass(frozen=True)
class BenchmarkUser:
    user_id: str
    portrait: str
    history: Tuple[str, ...]
    targets: Dict[str, Tuple[str, ...]]  # domain -> item ids
    evolution: Tuple[EvolutionTask, ...] = ()

    def to_json(self) -> str:
        record = {"user_id": self.user_id, "portrait": self.portrait, "history": list(self.history),
                  "targets": {d: list(t) for d, t in self.targets.items()}}
        if self.evolution:
            record["evolution"] = [{"topic": e.topic, "actions": list(e.actions)} for e in self.evolution]
        return json.dumps(record)


@dataclass(frozen=True)
class RecInstance:
    user: BenchmarkUser
    domain: str
    task = "rec"

    @property
    def targets(self) -> Tuple[str, ...]:
        return self.user.targets[self.domain]


@dataclass(frozen=True)
class EvolutionInstance:
    """R2 Evolution Action Selection: which history items belong to the evolution of ``topic``. No target domain
    (``domain`` None): the answer's begin token is the model's choice, as the actions span domains."""

    user: BenchmarkUser
    topic: str
    actions: Tuple[str, ...]
    task = "evolution"
    domain = None

    @property
    def targets(self) -> Tuple[str, ...]:
        return self.actions


TaskInstance = Union[RecInstance, EvolutionInstance]


def _parse_evolution(raw: object, history: Sequence[str]) -> Tuple[EvolutionTask, ...]:
    if not isinstance(raw, list):
        raise ValueError("'evolution' must be a list of {topic, actions} objects")
    seen = set(history)
    tasks = []
    for i, e in enumerate(raw):
        if not isinstance(e, dict) or not isinstance(e.get("topic"), str) or not e["topic"].strip():
            raise ValueError(f"evolution[{i}] needs a non-empty string 'topic'")
        actions = e.get("actions")
        if not isinstance(actions, list) or not actions or not all(isinstance(a, str) for a in actions):
            raise ValueError(f"evolution[{i}].actions must be a non-empty list of item id strings")
        outside = [a for a in actions if a not in seen]
        if outside:
            raise ValueError(f"evolution[{i}].actions holds {outside[0]!r}, which is not in the user's history")
        tasks.append(EvolutionTask(e["topic"], tuple(actions)))
    return tuple(tasks)


def _parse_user(record: object, catalog: ItemCatalog) -> BenchmarkUser:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("user_id", "portrait", "history", "targets") if k not in record]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    if not isinstance(record["user_id"], str) or not isinstance(record["portrait"], str):
        raise ValueError("'user_id' and 'portrait' must be strings")
    history, targets = record["history"], record["targets"]
    if not isinstance(history, list) or not all(isinstance(i, str) for i in history):
        raise ValueError("'history' must be a list of item id strings")
    if not isinstance(targets, dict) or not targets:
        raise ValueError("'targets' must be a non-empty object {domain: [item ids]}")
    for item_id in history:
        catalog.domain_for(item_id)  # raises UnknownItemError naming the id
    for domain, items in targets.items():
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise ValueError(f"targets[{domain!r}] must be a non-empty list of item id strings")
        for item_id in items:
            if catalog.domain_for(item_id) != domain:
                raise ValueError(f"targets[{domain!r}] holds {item_id!r} of domain {catalog.domain_for(item_id)!r}")
    evolution = _parse_evolution(record["evolution"], history) if record.get("evolution") is not None else ()
    return BenchmarkUser(record["user_id"], record["portrait"], tuple(history),
                         {d: tuple(items) for d, items in sorted(targets.items())}, evolution)


def load_benchmark(path: str, catalog: ItemCatalog) -> List[BenchmarkUser]:
    users, seen = [], set()
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 (a parquet given as JSONL) is named like any other
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                user = _parse_user(parse_json_line(line), catalog)
                if user.user_id in seen:
                    raise ValueError(f"duplicate user_id {user.user_id!r}")
            except (ValueError, UnknownItemError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            seen.add(user.user_id)
            users.append(user)
    if not users:
        raise ValueError(f"{path}: no users")
    return users


def write_benchmark(path: str, users: Sequence[BenchmarkUser]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(u.to_json() + "\n" for u in users))


def rec_instances(users: Sequence[BenchmarkUser]) -> List[RecInstance]:
    return [RecInstance(u, d) for u in users for d in u.targets]


def task_instances(users: Sequence[BenchmarkUser], tasks: Sequence[str] = ("rec",),
                   domains: Optional[Sequence[str]] = None) -> List[TaskInstance]:
    """The instances of ``tasks`` (from :data:`RL_TASKS`), user by user. ``domains`` keeps only the recommendation
    instances of those target domains (evolution instances have none and are kept)."""
    unknown = [t for t in tasks if t not in RL_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {list(RL_TASKS)}")
    out: List[TaskInstance] = []
    for u in users:
        if "rec" in tasks:
            out.extend(RecInstance(u, d) for d in u.targets if domains is None or d in domains)
        if "evolution" in tasks:
            out.extend(EvolutionInstance(u, e.topic, e.actions) for e in u.evolution)
    return out


def _history_text(instance: TaskInstance, catalog: ItemCatalog, scheme: ItemicScheme) -> str:
    return ", ".join(catalog.item_text(i, scheme) for i in instance.user.history)


def rec_messages(instance: RecInstance, catalog: ItemCatalog, scheme: ItemicScheme) -> List[Dict[str, str]]:
    """The chat prompt, items written in ``scheme``; worded like the synthetic corpus's recommendation SFT samples
    (``sft_recommend``)."""
    noun = DOMAIN_NOUNS.get(instance.domain, instance.domain)
    history = _history_text(instance, catalog, scheme)
    return [{"role": "user", "content": f"{instance.user.portrait} History: {history}. Recommend the next {noun}."}]


def evolution_messages(instance: EvolutionInstance, catalog: ItemCatalog,
                       scheme: ItemicScheme) -> List[Dict[str, str]]:
    """R2 Evolution Action Selection prompt: the history, the topic, one related action asked for."""
    history = _history_text(instance, catalog, scheme)
    return [{"role": "user", "content": f"{instance.user.portrait} History: {history}. Which of these interactions "
                                        f"belong to the user's interest in {instance.topic}? Name one."}]


def task_messages(instance: TaskInstance, catalog: ItemCatalog, scheme: ItemicScheme) -> List[Dict[str, str]]:
    """The chat prompt of any task instance."""
    if instance.task == "evolution":
        return evolution_messages(instance, catalog, scheme)
    return rec_messages(instance, catalog, scheme)


@dataclass(frozen=True)
class SyntheticBenchmarkConfig:
    num_users: int = 100
    interests: Tuple[int, int] = (1, 3)  # interest clusters (items sharing their first code) per user
    history_length: Tuple[int, int] = (8, 24)
    targets_per_domain: Tuple[int, int] = (1, 3)
    seed: int = 0
    evolution: bool = False  # also write R2 evolution tasks (one per interest cluster seen in the history)


def make_synthetic_benchmark(synthetic: SyntheticCatalog, catalog: ItemCatalog,
                             config: SyntheticBenchmarkConfig = SyntheticBenchmarkConfig()) -> List[BenchmarkUser]:
    """Users drawn as in the synthetic corpus: a mix of interest clusters; history and targets come from them.

    Targets are items of the user's clusters not in the history, per domain that has such items — so a model that
    learned which codes go together can find them.
    """
    items = items_from_catalogs(synthetic, catalog)
    by_cluster: Dict[int, list] = defaultdict(list)
    for item in items:
        by_cluster[item.codes[0]].append(item)
    clusters = sorted(by_cluster)
    rng = random.Random(config.seed)
    users = []
    for _ in range(100 * config.num_users):
        if len(users) == config.num_users:
            break
        interests = rng.sample(clusters, min(len(clusters), rng.randint(*config.interests)))
        pool = [item for c in interests for item in by_cluster[c]]
        history = [rng.choice(pool) for _ in range(rng.randint(*config.history_length))]
        seen = {item.item_id for item in history}
        unseen: Dict[str, list] = defaultdict(list)
        for item in pool:
            if item.item_id not in seen:
                unseen[item.domain].append(item.item_id)
        if not unseen:
            continue  # the clusters are exhausted by the history: draw another user
        targets = {d: tuple(rng.sample(ids, min(len(ids), rng.randint(*config.targets_per_domain))))
                   for d, ids in sorted(unseen.items())}
        topics = Counter(t for item in pool for t in _caption_topics(item.caption))
        likes = ", ".join(t for t, _ in topics.most_common(3))
        portrait = f"The user is {rng.choice(PORTRAIT_AGES)} who often engages with content about {likes}."
        evolution = _evolution_tasks(history) if config.evolution else ()
        users.append(BenchmarkUser(f"u{len(users):06d}", portrait, tuple(i.item_id for i in history), targets,
                                   evolution))
    if len(users) < config.num_users:
        raise ValueError(f"drew only {len(users)} of {config.num_users} users with a held-out target: the catalog is "
                         "too small for the history length")
    return users


def _caption_topics(caption: str) -> List[str]:
    return caption.split(" about ", 1)[-1].split(" and ")


def _evolution_tasks(history) -> Tuple[EvolutionTask, ...]:
    """R2 tasks of a synthetic user: per interest cluster in the history (items sharing their first code), its most
    frequent caption topic t; the actions of t are the distinct history items whose caption names t, oldest first."""
    by_cluster: Dict[int, Counter] = defaultdict(Counter)
    for item in history:
        by_cluster[item.codes[0]].update(_caption_topics(item.caption))
    topics = dict.fromkeys(by_cluster[c].most_common(1)[0][0] for c in sorted(by_cluster))
    tasks = []
    for topic in topics:
        actions = dict.fromkeys(i.item_id for i in history if topic in _caption_topics(i.caption))
        tasks.append(EvolutionTask(topic, tuple(actions)))
    return tuple(tasks)
