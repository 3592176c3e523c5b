"""The valid-item trie allows exactly the catalog's code tuples; batch masks hit exactly the allowed token ids."""
import itertools

import numpy as np
import pytest

from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import DOMAINS, ItemicPatternError, ItemicVocab, preset

K = 6
REPORT = preset("onereason_report", codebook_size=K)


def contiguous_vocab(scheme, first_id):
    """The scheme's tokens at ids first_id, first_id + 1, ... in its token order (a test layout)."""
    return ItemicVocab.from_lookup(scheme, {t: first_id + i for i, t in enumerate(scheme.token_strings())})


@pytest.fixture(scope="module")
def catalog():
    rng = np.random.default_rng(4)
    keys = rng.choice(K ** 3, size=120, replace=False)  # unique tuples, clumped enough to share prefixes
    codes = np.stack([keys // (K * K), keys // K % K, keys % K], axis=1)
    domains = [("video", "prod", "living")[i % 3] for i in range(120)]
    return ItemCatalog([f"item{i}" for i in range(120)], domains, codes, K)


def catalog_tuples(catalog, domain):
    return {tuple(c) for c, d in zip(catalog.codes.tolist(), catalog.domains) if d == domain}


def test_trie_allows_exactly_the_catalog_tuples(catalog):
    trie = ItemTrie.from_catalog(catalog, REPORT)
    for domain in ("video", "prod", "living", "ad"):
        want = catalog_tuples(catalog, domain)
        # walk the trie from the root: every accepted path must be a catalog tuple and vice versa
        walked = set()
        for a in trie.allowed_next(domain, ()):
            for b in trie.allowed_next(domain, (a,)):
                for c in trie.allowed_next(domain, (a, b)):
                    walked.add((int(a), int(b), int(c)))
        assert walked == want
        # every prefix, valid or not, against a brute-force scan of the catalog
        for length in range(3):
            for prefix in itertools.product(range(K), repeat=length):
                oracle = sorted({t[length] for t in want if t[:length] == prefix})
                assert trie.allowed_next(domain, prefix).tolist() == oracle
        for t in itertools.product(range(K), repeat=3):
            assert trie.contains(domain, t) == (t in want)
    assert trie.allowed_next("video", (K, 0)).tolist() == []  # out-of-range code: nothing continues it
    assert trie.allowed_next("video", (0, 1, 2)).tolist() == []  # a complete item has no next code
    assert trie.allowed_next("shop", ()).tolist() == []  # no items under that begin key
    with pytest.raises(ItemicPatternError):
        trie.allowed_next("video", (0, 1, 2, 3))


def test_shared_begin_token_groups_every_domain(catalog):
    """With one begin token for all domains the text cannot say the domain: every catalog item is allowed."""
    trie = ItemTrie.from_catalog(catalog, preset("openonerec", codebook_size=K))
    assert trie.domains == [None]
    everything = {tuple(c) for c in catalog.codes.tolist()}
    for t in itertools.product(range(K), repeat=3):
        assert trie.contains(None, t) == (t in everything)
    assert trie.allowed_next("video", ()).tolist() == []


def test_catalog_domains_the_scheme_cannot_write_are_refused(catalog):
    with pytest.raises(ItemicPatternError, match=r"catalog domains \['living'\] have no begin token"):
        ItemTrie.from_catalog(catalog, preset("onereason", codebook_size=K, domains=["video", "prod"]))


def test_batch_mask_marks_exactly_the_allowed_token_ids(catalog):
    trie = ItemTrie.from_catalog(catalog, REPORT)
    vocab = contiguous_vocab(preset("onereason_report", codebook_size=8), 53)
    video = sorted(catalog_tuples(catalog, "video"))
    prod = sorted(catalog_tuples(catalog, "prod"))
    rows = [("video", ()), ("prod", prod[3][:1]), ("video", video[5][:2]), ("living", (K - 1, K - 1)), ("ad", ())]
    mask = trie.allowed_token_mask(vocab, [d for d, _ in rows], [p for _, p in rows], vocab_size=128)
    assert mask.shape == (5, 128) and str(mask.dtype) == "torch.bool"
    for b, (domain, prefix) in enumerate(rows):
        want = {t[len(prefix)] for t in catalog_tuples(catalog, domain) if t[:len(prefix)] == prefix}
        # independent id arithmetic: after 5 begin tokens come 8 ids per level
        want_ids = sorted(53 + len(DOMAINS) + 8 * len(prefix) + c for c in want)
        assert np.flatnonzero(mask[b].numpy()).tolist() == want_ids
    assert mask[4].sum() == 0  # no "ad" items in this catalog
    assert mask.shape[1] == 128
    assert trie.allowed_token_mask(vocab, ["video"], [()]).shape == (1, 53 + len(DOMAINS) + 3 * 8)
    with pytest.raises(ItemicPatternError, match="already a complete item"):
        trie.allowed_token_mask(vocab, ["video"], [video[0]])
    with pytest.raises(ValueError, match="3 levels x 4 codes, the catalog 3 x 6"):
        trie.allowed_token_mask(contiguous_vocab(preset("onereason_report", codebook_size=4), 53), ["video"], [()])
