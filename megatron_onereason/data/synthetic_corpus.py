"""A synthetic four-granularity recommendation corpus (OneReason §4.2.1, appendix C.3) plus chat SFT samples.

Built from an item list — id, domain, caption, codes — which :func:`items_from_catalogs` joins from the synthetic
catalog (captions) and the itemic tokenizer's :class:`ItemCatalog` (codes). Every pre-training sample is a
``segments`` record whose template text is loss-masked context and whose target carries the loss; SFT samples are
``messages`` records (thinking and non-thinking). Tasks, by output file:

- ``token_granularity``: single-token semantics (``<a_i>`` → meaning), compositional prefix semantics
  (``<a_i><b_j>`` → shared meaning), prefix grounding (meaning → ``<a_i><b_j>``), part-to-whole (each sub-token's
  meaning, then the caption);
- ``item_granularity``: captioning (item → caption), grounding (caption → item), multi-perspective QA;
- ``relational_granularity``: direct item-to-item associations and multi-item interest flows, written
  ``item → explanation → item → …`` (Eq. 1);
- ``user_granularity``: domain-grouped multi-turn QA over a user's history, and chronologically interleaved
  histories with some items replaced by their captions;
- ``sft_chat``: caption generation with coarse-to-fine reasoning (thinking) or without (non-thinking, some with
  ``/no_think``), and next-item recommendation with a short reasoning trace.

The meaning of a code prefix is summarised from the captions of the items sharing it (its most distinctive words),
as the paper has an LLM summarise them. Users are mixtures of one to three interest clusters (items sharing an
``a`` code). Deterministic given the seed.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from megatron_onereason.data.synthetic_catalog import DOMAIN_NOUNS, SyntheticCatalog
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.itemic_tokens import DEFAULT_SCHEME, LEVEL_LETTERS, ItemicScheme

CORPUS_FILES = ("token_granularity", "item_granularity", "relational_granularity", "user_granularity", "sft_chat")


@dataclass(frozen=True)
class CorpusItem:
    item_id: str
    domain: str
    caption: str
    codes: Tuple[int, ...]


@dataclass(frozen=True)
class CorpusConfig:
    samples_per_task: int = 200
    seed: int = 0
    history_length: Tuple[int, int] = (8, 32)  # events per synthetic user (inclusive range)
    caption_replace_prob: float = 0.3  # interleaved histories: chance an item is written as its caption
    flow_length: Tuple[int, int] = (3, 5)  # items per multi-item interest flow
    scheme: ItemicScheme = DEFAULT_SCHEME  # how items and code tokens are written


def items_from_catalogs(synthetic: SyntheticCatalog, catalog: ItemCatalog) -> List[CorpusItem]:
    """Join captions (synthetic catalog) with codes (itemic tokenizer catalog) by item id."""
    items = []
    for item_id, domain, caption in zip(synthetic.item_ids, synthetic.domains, synthetic.captions):
        if catalog.domain_for(item_id) != domain:
            raise ValueError(f"item {item_id!r}: domain {domain!r} in the synthetic catalog, "
                             f"{catalog.domain_for(item_id)!r} in the item catalog")
        items.append(CorpusItem(item_id, domain, caption, catalog.codes_for(item_id)))
    return items


def _noun(domain: str) -> str:
    return DOMAIN_NOUNS.get(domain, domain)


def _ctx(text: str) -> Dict:
    return {"text": text, "loss": False}


def _tgt(text: str) -> Dict:
    return {"text": text, "loss": True}


class _Semantics:
    """Meaning of a code prefix in a domain: the most distinctive caption words of the items that share it."""

    def __init__(self, items: Sequence[CorpusItem]) -> None:
        self.groups: Dict[Tuple[str, Tuple[int, ...]], List[CorpusItem]] = defaultdict(list)
        doc_freq: Dict[str, Counter] = defaultdict(Counter)
        per_domain: Counter = Counter()
        for item in items:
            per_domain[item.domain] += 1
            doc_freq[item.domain].update(set(item.caption.split()))
            for depth in range(1, len(item.codes)):
                self.groups[(item.domain, item.codes[:depth])].append(item)
        # Words in more than half of a domain's captions ("video", "about") say nothing about a prefix.
        self.common = {d: {w for w, n in c.items() if n > per_domain[d] / 2} for d, c in doc_freq.items()}
        self._cache: Dict[Tuple[str, Tuple[int, ...]], str] = {}

    def content_words(self, item: CorpusItem) -> List[str]:
        return [w for w in item.caption.split() if w not in self.common[item.domain]]

    def keywords(self, domain: str, prefix: Tuple[int, ...], k: int = 3) -> List[str]:
        counts = Counter(w for item in self.groups[(domain, prefix)] for w in self.content_words(item))
        return [w for w, _ in counts.most_common(k)]

    def describe(self, domain: str, prefix: Tuple[int, ...]) -> str:
        key = (domain, prefix)
        if key not in self._cache:
            words = self.keywords(domain, prefix)
            size = len(self.groups[key])
            head = " and ".join(words[:2]) if words else "varied topics"
            tail = f", often {words[2]}" if len(words) > 2 else ""
            self._cache[key] = (f"These {_noun(domain)}s ({size} of them) are mostly about {head}{tail}.")
        return self._cache[key]


class _Generator:
    def __init__(self, items: Sequence[CorpusItem], config: CorpusConfig) -> None:
        self.items = list(items)
        self.cfg = config
        self.rng = random.Random(config.seed)
        self.sem = _Semantics(self.items)
        self.by_domain: Dict[str, List[CorpusItem]] = defaultdict(list)
        self.by_cluster: Dict[Tuple[int, ...], List[CorpusItem]] = defaultdict(list)  # interest = shared `a` code
        for item in self.items:
            self.by_domain[item.domain].append(item)
            self.by_cluster[item.codes[:1]].append(item)
        self.clusters = sorted(self.by_cluster)
        self.scheme = config.scheme

    def _item(self, item: CorpusItem) -> str:
        return self.scheme.format_item(item.domain, item.codes)

    def _code(self, item: CorpusItem, level: int) -> str:
        return self.scheme.code_for(level, item.codes[level])

    def _prefix(self, item: CorpusItem, depth: int) -> str:
        return "".join(self._code(item, level) for level in range(depth))

    # token granularity
    def single_token(self) -> Dict:
        item = self.rng.choice(self.items)
        q = self.rng.choice(["User: In the {n} domain, what does {t} mean?\nAssistant: ",
                             "User: Explain the {n} token {t}.\nAssistant: "])
        return self._pretrain("single_token_semantics", item.domain, [
            _ctx(q.format(n=_noun(item.domain), t=self._prefix(item, 1))),
            _tgt(self.sem.describe(item.domain, item.codes[:1]))])

    def prefix_semantics(self) -> Dict:
        item = self.rng.choice(self.items)
        q = self.rng.choice(["User: In the {n} domain, what does {t} represent?\nAssistant: ",
                             "User: What do {n}s starting with {t} have in common?\nAssistant: "])
        return self._pretrain("compositional_prefix_semantics", item.domain, [
            _ctx(q.format(n=_noun(item.domain), t=self._prefix(item, 2))),
            _tgt(self.sem.describe(item.domain, item.codes[:2]))])

    def prefix_grounding(self) -> Dict:
        item = self.rng.choice(self.items)
        return self._pretrain("prefix_itemic_token_grounding", item.domain, [
            _ctx(f"User: Which {_noun(item.domain)} token prefix matches this description? "
                 f"{self.sem.describe(item.domain, item.codes[:2])}\nAssistant: "),
            _tgt(self._prefix(item, 2))])

    def part_to_whole(self) -> Dict:
        item = self.rng.choice(self.items)
        parts = [f"{self._code(item, level)}: {self.sem.describe(item.domain, item.codes[:level + 1])}"
                 for level in range(len(item.codes) - 1)]
        parts.append(f"{self._code(item, len(item.codes) - 1)}: identifies this specific "
                     f"{_noun(item.domain)}.")
        return self._pretrain("part_to_whole_semantics", item.domain, [
            _ctx(f"User: Explain each token of {self._item(item)}, then describe the {_noun(item.domain)}.\n"
                 "Assistant: "),
            _tgt("\n".join(parts) + f"\nOverall: {item.caption}.")])

    # item granularity
    def caption(self) -> Dict:
        item = self.rng.choice(self.items)
        q = self.rng.choice(["User: Please describe this {n} {p}.\nAssistant: ", "User: {p}\nAssistant: ",
                             "User: What is {p} about?\nAssistant: "])
        return self._pretrain("item_captioning", item.domain, [
            _ctx(q.format(n=_noun(item.domain), p=self._item(item))), _tgt(f"It is a {item.caption}.")])

    def grounding(self) -> Dict:
        item = self.rng.choice(self.items)
        return self._pretrain("item_grounding", item.domain, [
            _ctx(f"User: Give the {_noun(item.domain)} tokens for: {item.caption}.\nAssistant: "),
            _tgt(self._item(item))])

    def item_qa(self) -> Dict:
        item = self.rng.choice(self.items)
        pool = self.by_domain[item.domain]
        if self.rng.random() < 0.5:  # multiple choice among captions of the same domain
            options = [item] + self.rng.sample(pool, min(3, len(pool)))
            options = list({o.item_id: o for o in options}.values())
            self.rng.shuffle(options)
            letters = "ABCD"
            listing = "\n".join(f"{letters[i]}. {o.caption}" for i, o in enumerate(options))
            answer = letters[options.index(item)]
            question = (f"User: Which description fits {self._item(item)}?\n{listing}\nAnswer with a letter.\n"
                        "Assistant: ")
        else:  # yes/no about a word from this or another item's caption
            other = self.rng.choice(pool)
            word = self.rng.choice(self.sem.content_words(other) or other.caption.split())
            answer = "Yes" if word in item.caption.split() else "No"
            question = f"User: Is {self._item(item)} related to \"{word}\"? Answer Yes or No.\nAssistant: "
        return self._pretrain("item_qa", item.domain, [_ctx(question), _tgt(answer)])

    # relational granularity
    def _related(self, item: CorpusItem) -> CorpusItem:
        """An item sharing the interest cluster (`a` code), preferably from another domain."""
        pool = [o for o in self.by_cluster[item.codes[:1]] if o.item_id != item.item_id] or self.items
        other_domain = [o for o in pool if o.domain != item.domain]
        return self.rng.choice(other_domain or pool)

    def _explain(self, src: CorpusItem, dst: CorpusItem) -> str:
        shared = [w for w in self.sem.content_words(src) if w in self.sem.content_words(dst)]
        why = f"both are about {' and '.join(dict.fromkeys(shared))}" if shared else "the interests are adjacent"
        return (f" → People who liked this {src.caption} often move on to a {dst.caption}, since {why}. → ")

    def direct_association(self) -> Dict:
        src = self.rng.choice(self.items)
        dst = self._related(src)
        return self._pretrain("direct_item_to_item", "mixed", [
            _ctx(self._item(src)), _tgt(self._explain(src, dst) + self._item(dst))])

    def interest_flow(self) -> Dict:
        chain = [self.rng.choice(self.items)]
        for _ in range(self.rng.randint(*self.cfg.flow_length) - 1):
            chain.append(self._related(chain[-1]))
        segments = [_ctx(self._item(chain[0]))]
        for src, dst in zip(chain, chain[1:]):
            segments.append(_tgt(self._explain(src, dst) + self._item(dst)))
        return self._pretrain("multi_item_interest_flow", "mixed", segments)

    # user granularity
    def _user(self) -> Tuple[str, List[CorpusItem]]:
        """A profile text and a chronological history drawn from one to three interest clusters."""
        interests = self.rng.sample(self.clusters, min(len(self.clusters), self.rng.randint(1, 3)))
        pool = [item for c in interests for item in self.by_cluster[c]]
        history = [self.rng.choice(pool) for _ in range(self.rng.randint(*self.cfg.history_length))]
        words = Counter(w for item in pool for w in self.sem.content_words(item))
        likes = ", ".join(w for w, _ in words.most_common(4))
        age = self.rng.choice(["a student", "a young professional", "a parent", "a retiree"])
        return f"The user is {age} who often engages with content about {likes}.", history

    def domain_grouped(self) -> Dict:
        profile, history = self._user()
        grouped: Dict[str, List[CorpusItem]] = defaultdict(list)
        for item in history:
            grouped[item.domain].append(item)
        segments = [_ctx(f"User: Given the following user info: {profile}\n")]
        for turn, (domain, items) in enumerate(sorted(grouped.items())):
            noun = _noun(domain)
            if turn > 0 and len(items) > 2 and self.rng.random() < 0.5:
                shown = len(items) // 2
                question = (f"User: {', '.join(self._item(i) for i in items[:shown])} are part of this user's {noun} "
                            f"records. Please continue with the others.\nAssistant: ")
                items = items[shown:]
            else:
                question = f"User: Which {noun}s did this user interact with? Return a list.\nAssistant: "
            segments.append(_ctx(question if turn == 0 else "\n" + question))
            segments.append(_tgt(str([self._item(i) for i in items])))
        return self._pretrain("domain_grouped_behavior", "mixed", segments)

    def interleaved(self) -> Dict:
        profile, history = self._user()
        events = []
        for step, item in enumerate(history):
            shown = (f"[{_noun(item.domain)}: {item.caption}]" if self.rng.random() < self.cfg.caption_replace_prob
                     else self._item(item))
            events.append(f"t{step}: {shown}")
        return self._pretrain("chronological_interleaved_behavior", "mixed", [
            _ctx(f"User profile: {profile}\nBehavior timeline:\n"), _tgt("\n".join(events))])

    # SFT chat
    def sft_caption(self) -> Dict:
        item = self.rng.choice(self.items)
        question = f"Describe the {_noun(item.domain)} {self._item(item)}."
        answer = f"It is a {item.caption}."
        if self.rng.random() < 0.5:
            steps = [f"{self._code(item, level)} suggests: "
                     f"{self.sem.describe(item.domain, item.codes[:level + 1])}"
                     for level in range(len(item.codes) - 1)]
            last = self._code(item, len(item.codes) - 1)
            reasoning = " ".join(steps) + f" The last token {last} pins down the exact item."
            messages = [{"role": "user", "content": question},
                        {"role": "assistant", "content": answer, "reasoning": reasoning}]
            source = "sft_caption_think"
        else:
            suffix = " /no_think" if self.rng.random() < 0.5 else ""
            messages = [{"role": "user", "content": question + suffix}, {"role": "assistant", "content": answer}]
            source = "sft_caption_nothink"
        messages.insert(0, {"role": "system", "content": f"You understand {_noun(item.domain)} itemic tokens."})
        return {"messages": messages, "source": source, "domain": item.domain}

    def sft_recommend(self) -> Dict:
        profile, history = self._user()
        target = history.pop()
        interest = Counter(self.sem.keywords(i.domain, i.codes[:1], 1)[0] for i in history
                           if self.sem.keywords(i.domain, i.codes[:1], 1))
        top = ", ".join(w for w, _ in interest.most_common(2)) or "varied topics"
        reasoning = (f"Persona: {profile} Interests in the history: {top}. The most recent item was about "
                     f"{history[-1].caption}; a {_noun(target.domain)} continuing these interests fits best.")
        messages = [
            {"role": "user", "content": f"{profile} History: {', '.join(self._item(i) for i in history)}. "
                                        f"Recommend the next {_noun(target.domain)}."},
            {"role": "assistant", "content": self._item(target), "reasoning": reasoning},
        ]
        return {"messages": messages, "source": "sft_recommend_think", "domain": target.domain}

    def _pretrain(self, source: str, domain: str, segments: List[Dict]) -> Dict:
        return {"segments": segments, "source": source, "domain": domain}


_TASKS = {
    "token_granularity": ("single_token", "prefix_semantics", "prefix_grounding", "part_to_whole"),
    "item_granularity": ("caption", "grounding", "item_qa"),
    "relational_granularity": ("direct_association", "interest_flow"),
    "user_granularity": ("domain_grouped", "interleaved"),
    "sft_chat": ("sft_caption", "sft_recommend"),
}


def generate_corpus(items: Sequence[CorpusItem], config: CorpusConfig = CorpusConfig()) -> Dict[str, List[Dict]]:
    """Records per output file (:data:`CORPUS_FILES`), ``config.samples_per_task`` per task, deterministic."""
    if not items:
        raise ValueError("the corpus needs at least one item")
    if any(len(item.codes) < 2 for item in items):
        raise ValueError("items need at least two code levels (prefix semantics use the first two)")
    if len({len(item.codes) for item in items}) > 1 or len(items[0].codes) > len(LEVEL_LETTERS):
        raise ValueError("all items must have the same number of code levels")
    gen = _Generator(items, config)
    return {name: [getattr(gen, task)() for task in tasks for _ in range(config.samples_per_task)]
            for name, tasks in _TASKS.items()}
