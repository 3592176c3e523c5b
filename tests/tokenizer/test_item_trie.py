"""The valid-item trie allows exactly the catalog's code tuples; batch masks hit exactly the allowed token ids."""
import itertools
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), levels=st.integers(1, 3), k=st.integers(2, 9), n=st.integers(1, 60),
       shared=st.booleans())
def test_csr_trie_allows_exactly_the_catalog_prefix_sets_of_random_catalogs(seed, levels, k, n, shared):
    """Every prefix of every catalog item and random other prefixes: the codes allowed next are exactly those of the
    catalog rows starting with it (sets recomputed from the rows), per begin key; the batched walk agrees."""
    rng = np.random.default_rng(seed)
    keys = rng.choice(k ** levels, size=min(n, k ** levels), replace=False)
    codes = np.stack([keys // k ** (levels - 1 - i) % k for i in range(levels)], axis=1)
    domains = [("video", "prod", "ad")[i] for i in rng.integers(0, 3, len(keys))]
    catalog = ItemCatalog([f"i{i}" for i in range(len(keys))], domains, codes, k)
    scheme = preset("openonerec" if shared else "onereason_report", codebook_size=k, levels=levels)
    trie = ItemTrie.from_catalog(catalog, scheme)
    rows = {d: [tuple(c) for c, dd in zip(codes.tolist(), domains) if shared or dd == d] for d in trie.domains}
    queries = [(d, t[:length]) for d, items in rows.items() for t in items for length in range(levels)]
    queries += [(d, tuple(rng.integers(0, k + 1, length).tolist())) for d in [*trie.domains, "living"]
                for length in range(levels)]
    for domain, prefix in queries:
        want = sorted({t[len(prefix)] for t in rows.get(domain, []) if t[:len(prefix)] == prefix})
        assert trie.allowed_next(domain, prefix).tolist() == want
    nodes = trie.nodes([d for d, _ in queries], [p for _, p in queries])
    assert nodes.tolist() == [trie.node(d, p) for d, p in queries]
    for domain, items in rows.items():
        assert all(trie.contains(domain, t) for t in items)


def test_a_loaded_catalogs_trie_pickles_by_reference(catalog, tmp_path):
    """An actor rank unpickling tree packs gets the one trie its process built from the catalog directory; the
    message carries the directory, not the arrays."""
    import pickle

    catalog.save(str(tmp_path))
    with open(tmp_path / "manifest.json", "w") as f:
        json.dump({"levels": 3, "codebook_size": K}, f)
    trie = ItemTrie.from_catalog(ItemCatalog.load(str(tmp_path)), REPORT)
    message = pickle.dumps(trie)
    assert len(message) < 2000 < trie.offsets.nbytes + trie.edge_key.nbytes
    first, again = pickle.loads(message), pickle.loads(message)
    assert first is again and first is not trie
    assert [first.allowed_next(d, ()).tolist() for d in DOMAINS] == [trie.allowed_next(d, ()).tolist() for d in DOMAINS]
    in_memory = ItemTrie.from_catalog(catalog, REPORT)  # no directory: the arrays travel
    assert pickle.loads(pickle.dumps(in_memory)).edge_key.tolist() == in_memory.edge_key.tolist()
    os.utime(tmp_path / "catalog.parquet", ns=(1, 1))  # touched, same content (a copy on another node)
    assert pickle.loads(message) is first
    edited = ItemCatalog(catalog.item_ids[1:], catalog.domains[1:], catalog.codes[1:], K)
    edited.save(str(tmp_path))
    with pytest.raises(RuntimeError, match="differs from the catalog the trie sent to this process was built from"):
        pickle.loads(message)
    (tmp_path / "catalog.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="every node of a run must see the catalog directory"):
        pickle.loads(message)
