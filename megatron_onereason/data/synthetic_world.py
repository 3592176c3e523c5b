"""A learnable recommendation world: users whose next item follows a rule their history determines, with the
Recall@K of the Bayes-optimal and of a random policy (the oracle) — so an RL run can be placed between the two.

Why: the synthetic benchmark (:func:`megatron_onereason.eval.benchmark.make_synthetic_benchmark`) draws targets at
random from a user's interest clusters, so even a perfect policy hits with probability ≈ targets / cluster size and
the reward is mostly noise. Here the answer is (mostly) determined, and reasoning helps to find it:

- **Interests** are the catalog's topic clusters (``SyntheticCatalog.clusters``, e.g. "cooking and travel videos").
  The items of an interest form a **sequence**, ordered by their itemic codes (neighbours share code prefixes).
- A **user** has one dominant interest ``c*`` in a target domain ``d`` and up to ``interests - 1`` others (any
  domain). Each history event picks ``c*`` with probability ``dominant_share``, else one of the others uniformly;
  every visit to an interest takes the *next* item of that interest's sequence (a run through it from a random
  start, wrapping around). Users whose history does not make ``c*`` the strict majority interest of ``d`` are
  redrawn, so ``c*`` is a function of the history.
- Every item has a **popularity** inside its interest: Zipf weights ``pop(i) ∝ 1 / rank(i)^popularity_skew`` over
  a seeded random ranking of the interest's items (``popularity_skew = 0``: uniform).
- The **target** (the next ``d`` item, one per user): with probability ``follow_prob`` the successor in ``c*``'s
  sequence of the latest ``c*`` item in the history, else an item of ``c*`` drawn by popularity.

The CoT that helps: name the dominant interest (the most frequent ``d`` cluster of the history, by its topics), then
its latest item; the answer is (mostly) that item's successor (:func:`world_reasoning`). With ``follow_prob = 0`` the
answer is a popular item of the dominant interest and the CoT only names the interest — a world a tiny model can
learn within the CPU demo (it does not learn the successor map from a few hundred samples).

**Oracle** (exact, no sampling): given the history the target's distribution is
``P(i) = follow_prob · [i = succ] + (1 − follow_prob) · pop(i)`` for ``i ∈ c*`` and 0 elsewhere
(:func:`next_item_distribution`), so the Bayes-optimal policy ranks ``c*``'s items by ``P`` and its Recall@K (= hit
rate, one target) is the mass of its K largest values (uniform popularity: ``follow_prob + (1 − follow_prob) ·
min(K, |c*|) / |c*|``). A random policy (K distinct items uniformly from domain ``d``) has Recall@K
``min(K, N_d) / N_d``. Both are averaged over users. Everything is deterministic given the seed.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Literal, Mapping, Optional, Sequence, Tuple

from megatron_onereason.data.synthetic_catalog import DOMAIN_NOUNS, SyntheticCatalog
from megatron_onereason.data.synthetic_corpus import CorpusItem, items_from_catalogs
from megatron_onereason.eval.benchmark import PORTRAIT_AGES, BenchmarkUser
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.itemic_tokens import DEFAULT_SCHEME, ItemicScheme

@dataclass(frozen=True)
class WorldItem(CorpusItem):
    interest: int  # the catalog's topic cluster


@dataclass(frozen=True)
class WorldConfig:
    target_domains: Optional[Tuple[str, ...]] = None  # None: every domain of the catalog
    interests: Tuple[int, int] = (1, 3)  # interests per user, the dominant one included
    history_length: Tuple[int, int] = (8, 16)
    dominant_share: float = 0.6  # chance a history event belongs to the dominant interest
    follow_prob: float = 0.8  # chance the target is the dominant sequence's next item (else drawn by popularity)
    popularity_skew: float = 0.0  # Zipf exponent of the item popularity inside an interest (0: uniform)
    popularity_seed: int = 0  # the popularity ranking's seed

    def __post_init__(self) -> None:
        if not 0.0 <= self.follow_prob <= 1.0 or not 0.0 < self.dominant_share <= 1.0 or self.popularity_skew < 0:
            raise ValueError(f"need 0 <= follow_prob <= 1, 0 < dominant_share <= 1 and popularity_skew >= 0, got "
                             f"{self.follow_prob}, {self.dominant_share}, {self.popularity_skew}")
        if not 1 <= self.interests[0] <= self.interests[1] or not 1 <= self.history_length[0] <= \
                self.history_length[1]:
            raise ValueError(f"need 1 <= min <= max for interests {self.interests} and history_length "
                             f"{self.history_length}")


class World:
    """The items, their interest sequences, and the rule (see the module docstring)."""

    def __init__(self, items: Sequence[WorldItem], config: WorldConfig = WorldConfig()) -> None:
        if not items:
            raise ValueError("the world needs at least one item")
        self.config = config
        self.items = {i.item_id: i for i in items}
        sequences: Dict[int, List[WorldItem]] = {}
        for item in items:
            sequences.setdefault(item.interest, []).append(item)
        for interest, seq in sequences.items():
            if len({i.domain for i in seq}) != 1:
                raise ValueError(f"interest {interest} spans several domains; interests are per-domain clusters")
            seq.sort(key=lambda i: (i.codes, i.item_id))
        self.sequences = sequences
        rng = random.Random(config.popularity_seed)
        self.popularity = {}
        for interest in sorted(sequences):
            ranked = rng.sample(sequences[interest], len(sequences[interest]))
            self.popularity.update(zip((i.item_id for i in ranked), popularity_weights(len(ranked),
                                                                                       config.popularity_skew)))
        self.position = {i.item_id: pos for seq in sequences.values() for pos, i in enumerate(seq)}
        self.domain_sizes = Counter(i.domain for i in items)
        domains = tuple(sorted(self.domain_sizes)) if config.target_domains is None else tuple(config.target_domains)
        unknown = [d for d in domains if d not in self.domain_sizes]
        if unknown or not domains:
            raise ValueError(f"target domains {unknown or list(domains)} have no items (catalog domains: "
                             f"{sorted(self.domain_sizes)})")
        self.target_domains = domains

    def interest_of_domain(self, domain: str) -> List[int]:
        return sorted(c for c, seq in self.sequences.items() if seq[0].domain == domain)

    def successor(self, item_id: str) -> WorldItem:
        item = self.items[item_id]
        seq = self.sequences[item.interest]
        return seq[(self.position[item_id] + 1) % len(seq)]

    def dominant_interest(self, history: Sequence[str], domain: str) -> Optional[int]:
        """The strict majority interest of ``domain`` in the history (None when there is none or it ties)."""
        counts = Counter(self.items[i].interest for i in history if self.items[i].domain == domain)
        top = counts.most_common(2)
        if not top or (len(top) == 2 and top[0][1] == top[1][1]):
            return None
        return top[0][0]

    def next_item_distribution(self, history: Sequence[str], domain: str) -> Dict[str, float]:
        """The target's distribution given the history (the rule of the module docstring); items absent have 0."""
        dominant = self.dominant_interest(history, domain)
        if dominant is None:
            raise ValueError(f"the history has no majority interest in {domain!r}: not a user of this world")
        seq = self.sequences[dominant]
        latest = [i for i in history if self.items[i].interest == dominant][-1]
        probs = {i.item_id: (1.0 - self.config.follow_prob) * self.popularity[i.item_id] for i in seq}
        probs[self.successor(latest).item_id] += self.config.follow_prob
        return probs

    def draw_user(self, rng: random.Random, user_id: str, domain: str) -> BenchmarkUser:
        cfg = self.config
        for _ in range(1000):
            dominant = rng.choice(self.interest_of_domain(domain))
            others = [c for c in self.sequences if c != dominant]
            extra = rng.sample(others, min(len(others), rng.randint(*cfg.interests) - 1))
            cursor = {c: rng.randrange(len(self.sequences[c])) for c in [dominant, *extra]}
            history = []
            for _ in range(rng.randint(*cfg.history_length)):
                c = dominant if not extra or rng.random() < cfg.dominant_share else rng.choice(extra)
                seq = self.sequences[c]
                history.append(seq[cursor[c] % len(seq)].item_id)
                cursor[c] += 1
            if self.dominant_interest(history, domain) != dominant:
                continue  # the rule must be readable from the history
            probs = self.next_item_distribution(history, domain)
            target = rng.choices(list(probs), weights=list(probs.values()))[0]
            portrait = (f"The user is {rng.choice(PORTRAIT_AGES)} who often engages with content about "
                        f"{interest_topics(self.sequences[dominant][0])}.")
            return BenchmarkUser(user_id, portrait, tuple(history), {domain: (target,)})
        raise ValueError(f"could not draw a user whose history has a majority interest in {domain!r}: "
                         "raise dominant_share or history_length")

    def draw_users(self, num_users: int, seed: int, prefix: str = "u") -> List[BenchmarkUser]:
        """``num_users`` users, target domains in turn."""
        rng = random.Random(seed)
        return [self.draw_user(rng, f"{prefix}{n:06d}", self.target_domains[n % len(self.target_domains)])
                for n in range(num_users)]

    def oracle_recall(self, users: Sequence[BenchmarkUser], ks: Sequence[int]) -> Dict[int, float]:
        """Exact Recall@K of the Bayes-optimal policy, averaged over the users' (user, domain) instances: the
        probability mass of the K most probable items (the expected hit of one target)."""
        out = {}
        for k in ks:
            values = [sum(sorted(self.next_item_distribution(u.history, d).values(), reverse=True)[:k])
                      for u in users for d in u.targets]
            out[k] = sum(values) / len(values)
        return out

    def random_recall(self, users: Sequence[BenchmarkUser], ks: Sequence[int]) -> Dict[int, float]:
        """Exact Recall@K of K distinct items drawn uniformly from the target domain (one target per instance)."""
        out = {}
        for k in ks:
            values = [min(k, self.domain_sizes[d]) / self.domain_sizes[d] for u in users for d in u.targets]
            out[k] = sum(values) / len(values)
        return out


def popularity_weights(n: int, skew: float) -> List[float]:
    """Zipf weights of ranks 1..n, normalised: ``w_r = r^-skew / Σ_s s^-skew`` (``skew = 0``: uniform)."""
    raw = [(r + 1) ** -skew for r in range(n)]
    return [w / sum(raw) for w in raw]


def interest_topics(item: WorldItem) -> str:
    """"cooking and travel" for a "cozy video about cooking and travel"."""
    return item.caption.split(" about ", 1)[-1]


def world_items(synthetic: SyntheticCatalog, catalog: ItemCatalog) -> List[WorldItem]:
    """Captions and interests (synthetic catalog) joined with codes (itemic tokenizer catalog) by item id."""
    return [WorldItem(item.item_id, item.domain, item.caption, item.codes, int(cluster))
            for item, cluster in zip(items_from_catalogs(synthetic, catalog), synthetic.clusters.tolist())]


def world_reasoning(world: World, user: BenchmarkUser, domain: str, scheme: ItemicScheme = DEFAULT_SCHEME) -> str:
    """The CoT (~20 tokens): the dominant interest (its first code and topic), then its latest item in the history —
    left out when ``follow_prob = 0``, where the successor plays no part in the answer."""
    dominant = world.dominant_interest(user.history, domain)
    latest = world.items[[i for i in user.history if world.items[i].interest == dominant][-1]]
    topic = interest_topics(latest).split(" and ")[0]
    interest = f"Interest {scheme.code_for(0, latest.codes[0])} ({topic})."
    if world.config.follow_prob == 0:
        return interest
    return f"{interest} Last {scheme.format_item(latest.domain, latest.codes)}."


def history_prompt(world: World, user: BenchmarkUser, domain: str, scheme: ItemicScheme = DEFAULT_SCHEME) -> str:
    """Worded as :func:`megatron_onereason.eval.benchmark.rec_messages` words the RL and evaluation prompts."""
    history = ", ".join(scheme.format_item(world.items[i].domain, world.items[i].codes) for i in user.history)
    return f"{user.portrait} History: {history}. Recommend the next {DOMAIN_NOUNS.get(domain, domain)}."


SFTAnswers = Literal["target", "interest"]


def sft_records(world: World, users: Sequence[BenchmarkUser], scheme: ItemicScheme = DEFAULT_SCHEME,
                answers: SFTAnswers = "target", seed: int = 0) -> List[Dict]:
    """Chat SFT samples with CoT (``reasoning``): prompt as the RL prompts; the answer is the user's target
    (``answers="target"``) or, as a demonstrator that knows the interest but not what users pick would answer, an item
    of the dominant interest drawn uniformly (``"interest"``, seeded): then SFT teaches the format and the interest,
    and only the reward of the users' real next items (RL) can teach the popularity."""
    if answers not in ("target", "interest"):
        raise ValueError(f"answers must be 'target' or 'interest', got {answers!r}")
    rng = random.Random(seed)
    out = []
    for u in users:
        for domain, (target, *_) in u.targets.items():
            item = world.items[target]
            if answers == "interest":
                item = rng.choice(world.sequences[world.dominant_interest(u.history, domain)])
            out.append({"messages": [
                {"role": "user", "content": history_prompt(world, u, domain, scheme)},
                {"role": "assistant", "content": scheme.format_item(item.domain, item.codes),
                 "reasoning": world_reasoning(world, u, domain, scheme)}],
                "source": "world_recommend_think", "domain": domain})
    return out


def pretrain_records(world: World, users: Sequence[BenchmarkUser],
                     scheme: ItemicScheme = DEFAULT_SCHEME) -> List[Dict]:
    """User-granularity pre-training samples: a user's timeline, then its next item (the loss on the items)."""
    out = []
    for u in users:
        target = next(iter(u.targets.values()))[0]
        events = [scheme.format_item(world.items[i].domain, world.items[i].codes) for i in (*u.history, target)]
        out.append({"segments": [{"text": f"User profile: {u.portrait}\nBehavior timeline: ", "loss": False},
                                 {"text": " ".join(events), "loss": True}],
                    "source": "world_timeline", "domain": "mixed"})
    return out


def recall_table(recalls: Mapping[str, Mapping[int, float]]) -> str:
    """A markdown table: one row per policy, one column per K."""
    ks = sorted({k for r in recalls.values() for k in r})
    lines = ["| policy | " + " | ".join(f"Recall@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    lines += [f"| {name} | " + " | ".join(f"{r[k]:.4f}" for k in ks) + " |" for name, r in recalls.items()]
    return "\n".join(lines)
