"""The recommendation benchmark: JSONL format, loading, prompts, and a synthetic benchmark (OneReason §3.1.4 R3).

One user per line::

    {"user_id": "u000007",
     "portrait": "The user is a parent who often engages with content about cooking, baking, coffee.",
     "history": ["video_000012", "prod_000003", ...],
     "targets": {"video": ["video_000040"], "prod": ["prod_000017", "prod_000021"]}}

- ``user_id``: unique string; ``portrait``: the user portrait P, free text;
- ``history``: the multi-domain interaction history H, item ids oldest first (written into the prompt as itemic
  patterns through the item catalog);
- ``targets``: per target domain d, the ground-truth next items (non-empty, each of domain d).

Each ``(user, target domain)`` pair is one cross-domain recommendation instance: portrait + full history + d →
next items of d, scored with Pass@K / Recall@K at item level. Item ids are checked against the catalog on load;
an error names ``file:line``.
"""
from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from megatron_onereason.data.synthetic_catalog import DOMAIN_NOUNS, SyntheticCatalog
from megatron_onereason.data.synthetic_corpus import items_from_catalogs
from megatron_onereason.tokenizer.item_catalog import ItemCatalog, UnknownItemError
from megatron_onereason.tokenizer.itemic_tokens import ItemicScheme

TASKS = ("rec",)
_AGES = ("a student", "a young professional", "a parent", "a retiree")


@dataclass(frozen=True)
class BenchmarkUser:
    user_id: str
    portrait: str
    history: Tuple[str, ...]
    targets: Dict[str, Tuple[str, ...]]  # domain -> item ids

    def to_json(self) -> str:
        return json.dumps({"user_id": self.user_id, "portrait": self.portrait, "history": list(self.history),
                           "targets": {d: list(t) for d, t in self.targets.items()}})


@dataclass(frozen=True)
class RecInstance:
    user: BenchmarkUser
    domain: str

    @property
    def targets(self) -> Tuple[str, ...]:
        return self.user.targets[self.domain]


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
    return BenchmarkUser(record["user_id"], record["portrait"], tuple(history),
                         {d: tuple(items) for d, items in sorted(targets.items())})


def load_benchmark(path: str, catalog: ItemCatalog) -> List[BenchmarkUser]:
    users, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                user = _parse_user(json.loads(line), catalog)
                if user.user_id in seen:
                    raise ValueError(f"duplicate user_id {user.user_id!r}")
            except (json.JSONDecodeError, ValueError, UnknownItemError) as e:
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


def rec_messages(instance: RecInstance, catalog: ItemCatalog, scheme: ItemicScheme) -> List[Dict[str, str]]:
    """The chat prompt, items written in ``scheme``; worded like the synthetic corpus's recommendation SFT samples
    (``sft_recommend``)."""
    history = ", ".join(catalog.item_text(i, scheme) for i in instance.user.history)
    noun = DOMAIN_NOUNS.get(instance.domain, instance.domain)
    return [{"role": "user", "content": f"{instance.user.portrait} History: {history}. Recommend the next {noun}."}]


@dataclass(frozen=True)
class SyntheticBenchmarkConfig:
    num_users: int = 100
    interests: Tuple[int, int] = (1, 3)  # interest clusters (items sharing their first code) per user
    history_length: Tuple[int, int] = (8, 24)
    targets_per_domain: Tuple[int, int] = (1, 3)
    seed: int = 0


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
        topics = Counter(t for item in pool for t in item.caption.split(" about ", 1)[-1].split(" and "))
        likes = ", ".join(t for t, _ in topics.most_common(3))
        portrait = f"The user is {rng.choice(_AGES)} who often engages with content about {likes}."
        users.append(BenchmarkUser(f"u{len(users):06d}", portrait, tuple(i.item_id for i in history), targets))
    if len(users) < config.num_users:
        raise ValueError(f"drew only {len(users)} of {config.num_users} users with a held-out target: the catalog is "
                         "too small for the history length")
    return users
