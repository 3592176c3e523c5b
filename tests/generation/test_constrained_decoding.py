"""The trie constraint and the per-request token rules allow exactly the catalog's items: never an illegal triple,
every legal one reachable, in every itemic scheme (end tokens included, ids scattered over the vocabulary)."""
import itertools
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_onereason.generation.constrained import (
    ItemicConstraint,
    TokenRule,
    decode_item,
    rule_masks,
)
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab, preset

K = 5  # codebook size
TEXT_TOKENS = 40  # ids below this are ordinary text
REPORT = preset("onereason_report", codebook_size=K)
VOCAB = ItemicVocab.from_lookup(REPORT, {t: TEXT_TOKENS + i for i, t in enumerate(REPORT.token_strings())})
WIDTH = VOCAB.max_id + 1 + 7  # the model's logits are padded past the last token


def _catalog(seed=3, n=30):
    rng = np.random.default_rng(seed)
    keys = rng.choice(K ** 3, size=n, replace=False)
    codes = np.stack([keys // (K * K), keys // K % K, keys % K], axis=1)
    domains = [("video", "prod")[i % 2] for i in range(n)]  # "ad", "living", "sid" have no items
    return ItemCatalog([f"i{i}" for i in range(n)], domains, codes, K)


CATALOG = _catalog()
LEGAL = {(d, tuple(int(c) for c in codes)) for d, codes in zip(CATALOG.domains, CATALOG.codes)}
CONSTRAINT = ItemicConstraint(ItemTrie.from_catalog(CATALOG, REPORT), VOCAB, WIDTH)


def item_tokens(domain, codes):
    return VOCAB.item_ids(domain, codes)


def test_item_state_reads_the_tail_by_hand():
    video, (a, b, c) = "video", (1, 2, 3)
    text = [5, 7, 11]
    state = CONSTRAINT.item_state
    assert state(text) is None
    assert state(text + [VOCAB.begin_id(video)]) == (video, ())
    assert state(text + item_tokens(video, (a, b, c))[:2]) == (video, (a,))
    assert state(text + item_tokens(video, (a, b, c))[:3]) == (video, (a, b))
    assert state(text + item_tokens(video, (a, b, c))) is None  # complete
    assert state(item_tokens(video, (a, b, c)) + [9]) is None  # text after an item
    assert state([VOCAB.begin_id(video), VOCAB.code_id(1, b)]) is None  # level b straight after the begin: broken
    assert state(item_tokens("prod", (a, b, c)) + [VOCAB.begin_id(video)]) == (video, ())  # the latest begin rules


def test_decode_item_by_hand():
    assert decode_item(VOCAB, item_tokens("prod", (4, 0, 2))) == ("prod", (4, 0, 2))
    assert decode_item(VOCAB, item_tokens("prod", (4, 0, 2))[:3]) is None
    assert decode_item(VOCAB, [VOCAB.begin_id("ad"), VOCAB.code_id(0, 1), VOCAB.code_id(2, 1), VOCAB.code_id(2, 1)]) \
        is None
    assert decode_item(VOCAB, [3, VOCAB.code_id(0, 1), VOCAB.code_id(1, 1), VOCAB.code_id(2, 1)]) is None


def _allowed_ids(rule, prompt, output, width=WIDTH, num_valid=WIDTH, constraint=CONSTRAINT):
    mask = rule_masks([rule], [len(output)], [list(prompt) + list(output)], num_valid, width, constraint)
    return mask[0].nonzero().flatten().tolist()


def item_rule(first=None, forced=()):
    return TokenRule(forced=tuple(forced), first=tuple(first if first is not None else CONSTRAINT.live_begin_ids),
                     trie=True)


def test_item_rule_reaches_exactly_the_catalog_items():
    """Exhaustive walk of every path the item rule allows from an item start: the reached set is the catalog."""
    rule = item_rule()
    prompt = [3, 17, 9]
    reached, frontier = set(), [[]]
    for _ in range(VOCAB.levels + 1):
        frontier = [out + [t] for out in frontier for t in _allowed_ids(rule, prompt, out)]
    for out in frontier:
        reached.add(decode_item(VOCAB, out))
    assert reached == LEGAL
    assert len(frontier) == len(LEGAL)  # no path reaches the same item twice or ends malformed


def test_forced_begin_and_inside_reasoning():
    """A forced begin token limits the items to its domain; a begin token written mid-text is constrained too."""
    prod = item_rule(first=[VOCAB.begin_id("prod")])
    assert _allowed_ids(prod, [1, 2], []) == [VOCAB.begin_id("prod")]
    free = TokenRule(trie=True)
    text = [4, 8, 15]
    allowed = _allowed_ids(free, [1], text)
    # outside an item: text and the live begin tokens, not the begin tokens of domains without items
    assert set(range(TEXT_TOKENS)) <= set(allowed)
    assert {VOCAB.begin_id(d) for d in ("video", "prod")} <= set(allowed)
    assert not {VOCAB.begin_id(d) for d in ("ad", "living", "sid")} & set(allowed)
    assert max(_allowed_ids(free, [1], text, width=WIDTH + 5)) == WIDTH - 1  # columns past the width are masked
    assert max(_allowed_ids(TokenRule(), [1], text, num_valid=TEXT_TOKENS)) == TEXT_TOKENS - 1  # only valid ids
    # mid-text begin: only the catalog's first codes of that domain
    first_codes = sorted({codes[0] for d, codes in LEGAL if d == "video"})
    allowed = _allowed_ids(free, [1], text + [VOCAB.begin_id("video")])
    assert allowed == [VOCAB.code_id(0, a) for a in first_codes]


def test_banned_ids_are_never_allowed():
    allowed = _allowed_ids(TokenRule(banned=(7, 11), trie=True), [1], [2, 3])
    assert 7 not in allowed and 11 not in allowed and 8 in allowed


def test_forced_tokens_come_first_then_the_item_start():
    """Closing tokens forced one by one, then the item start set, then the trie; the rule survives extra_args."""
    rule = TokenRule.from_args(item_rule(first=[VOCAB.begin_id("video")], forced=(31, 32)).to_args())
    assert [_allowed_ids(rule, [1], out) for out in ([], [31])] == [[31], [32]]
    assert _allowed_ids(rule, [1], [31, 32]) == [VOCAB.begin_id("video")]
    assert _allowed_ids(rule, [1], [31, 32, VOCAB.begin_id("video")]) == \
        [VOCAB.code_id(0, a) for a in sorted({c[0] for d, c in LEGAL if d == "video"})]
    rows = rule_masks([rule, TokenRule()], [0, 0], [[1], [1]], WIDTH, WIDTH, CONSTRAINT)  # batched rows
    assert rows[0].nonzero().flatten().tolist() == [31] and bool(rows[1].all())


def test_prefix_outside_the_catalog_is_an_error():
    video = {codes for d, codes in LEGAL if d == "video"}
    a, b = next((a, b) for a in sorted({c[0] for c in video}) for b in range(K)
                if not any(c[:2] == (a, b) for c in video))
    history = [VOCAB.begin_id("video"), VOCAB.code_id(0, a), VOCAB.code_id(1, b)]
    with pytest.raises(ValueError, match="no catalog item under begin key 'video' continues"):
        CONSTRAINT.allowed([history])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), domain=st.sampled_from([None, "video", "prod"]),
       bias=st.floats(0.0, 50.0), temperature=st.floats(0.05, 3.0))
def test_sampling_under_adversarial_logits_never_emits_an_illegal_item(seed, domain, bias, temperature):
    """Random logits, with a large bonus on random illegal itemic tokens, sampled through the item rule."""
    generator = torch.Generator().manual_seed(seed)
    first = CONSTRAINT.live_begin_ids if domain is None else [VOCAB.begin_id(domain)]
    rule = item_rule(first=first)
    prompt = torch.randint(0, TEXT_TOKENS, (6,), generator=generator).tolist()
    output = []
    for _ in range(VOCAB.levels + 1):
        logits = torch.randn(WIDTH, generator=generator) * 5
        boosted = torch.randint(TEXT_TOKENS, WIDTH, (10,), generator=generator)
        logits[boosted] += bias
        allowed = rule_masks([rule], [len(output)], [prompt + output], WIDTH, WIDTH, CONSTRAINT)[0]
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")) / temperature, dim=-1)
        output.append(int(torch.multinomial(probs, 1, generator=generator)))
    item = decode_item(VOCAB, output)
    assert item in LEGAL
    if domain is not None:
        assert item[0] == domain


def _scattered(scheme, seed=0):
    """The scheme's tokens at shuffled ids after the text tokens, with gaps: no layout to rely on."""
    tokens = scheme.token_strings()
    ids = random.Random(seed).sample(range(TEXT_TOKENS, TEXT_TOKENS + 2 * len(tokens)), len(tokens))
    return ItemicVocab.from_lookup(scheme, dict(zip(tokens, ids)))


def _walk(rule, constraint, steps, prompt=(3, 17, 9)):
    width = constraint.vocab_size
    frontier = [[]]
    for _ in range(steps):
        frontier = [out + [t] for out in frontier
                    for t in _allowed_ids(rule, list(prompt), out, width, width, constraint)]
    return frontier


@pytest.mark.parametrize("name", ["openonerec", "onereason"])
def test_end_token_schemes_reach_exactly_the_catalog_items(name):
    scheme = preset(name, codebook_size=K, domains=None if name == "openonerec" else ["ad", "prod", "video"])
    vocab = _scattered(scheme)
    constraint = ItemicConstraint(ItemTrie.from_catalog(CATALOG, scheme), vocab, vocab.max_id + 4)
    frontier = _walk(TokenRule(first=tuple(constraint.live_begin_ids), trie=True), constraint, scheme.item_length)
    legal = {(scheme.begin_key(d), codes) for d, codes in LEGAL}
    assert {vocab.decode_item(out) for out in frontier} == legal and len(frontier) == len(legal)
    domain, codes = sorted(LEGAL)[0]
    item = vocab.item_ids(domain, codes)
    free, width = TokenRule(trie=True), constraint.vocab_size
    assert _allowed_ids(free, [1], [4] + item[:-1], width, width, constraint) == [item[-1]]  # codes done: end
    after = set(_allowed_ids(free, [1], [4] + item, width, width, constraint))
    assert set(range(TEXT_TOKENS)) <= after and not after & set(vocab.end_ids.values())  # outside: no stray end
    if name == "onereason":  # no "ad" items: its begin token is dead, and each item ends with its domain's end
        assert vocab.begin_id("ad") not in after and vocab.begin_id("video") in after
        assert {out[-1] for out in frontier} == {vocab.item_end_id(d) for d in ("prod", "video")}


def test_without_a_catalog_only_the_pattern_is_enforced():
    """OpenOneRec's decoding over the code tokens: after the begin token any code of the right level, then the end."""
    scheme = preset("openonerec", codebook_size=K)
    vocab = _scattered(scheme, seed=1)
    constraint = ItemicConstraint(None, vocab, vocab.max_id + 1)
    frontier = _walk(TokenRule(first=(vocab.begin_id(None),), trie=True), constraint, scheme.item_length)
    assert sorted(vocab.decode_item(out)[1] for out in frontier) == list(itertools.product(range(K), repeat=3))
