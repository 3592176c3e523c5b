"""The actor's allowed sets by reference to the CSR trie: the same sets as the rollout's constraint after the same
tokens, and the same renormalised log-probs as a dense mask (oracles: ``ItemicConstraint.allowed`` on each
materialised item prefix, ``allowed_log_mass`` over a dense boolean mask in float64)."""
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from megatron_onereason.generation.constrained import ItemicConstraint
from megatron_onereason.rl.sampling import allowed_log_mass, item_allowed_ids, vocab_parallel_allowed_log_mass
from megatron_onereason.rl.tree_pack import TreeSequence, pack_trees
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab, preset

FIRST_ID = 40  # itemic tokens after 40 text ids


def _case(seed, k, shared, n_items):
    rng = np.random.default_rng(seed)
    keys = rng.choice(k ** 3, size=min(n_items, k ** 3), replace=False)
    codes = np.stack([keys // (k * k), keys // k % k, keys % k], axis=1)
    domains = [("video", "prod")[i] for i in rng.integers(0, 2, len(keys))]
    catalog = ItemCatalog([f"i{i}" for i in range(len(keys))], domains, codes, k)
    scheme = preset("openonerec" if shared else "onereason_report", codebook_size=k)
    vocab = ItemicVocab.from_lookup(scheme, {t: FIRST_ID + i for i, t in enumerate(scheme.token_strings())})
    width = vocab.max_id + 5  # padded model rows past the last itemic id
    constraint = ItemicConstraint(ItemTrie.from_catalog(catalog, scheme), vocab, width)
    trees, forced = [], []
    for _ in range(int(rng.integers(1, 4))):
        row = int(rng.integers(len(keys)))
        domain = None if shared or rng.random() < 0.5 else domains[row]
        children = []
        for _ in range(3):
            pick = int(rng.integers(len(keys))) if domain is None else int(rng.choice(
                [r for r in range(len(keys)) if domains[r] == domain]))
            item = vocab.item_ids(None if shared else domains[pick], codes[pick])
            children.append(item[:int(rng.integers(1, len(item) + 1))])  # cut short sometimes: fewer positions
        trees.append(TreeSequence(rng.integers(0, FIRST_ID, 3).tolist(), rng.integers(0, FIRST_ID, 2).tolist(),
                                  children))
        forced.append(domain)
    return constraint, trees, forced, rng


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(2, 7), shared=st.booleans(), n_items=st.integers(1, 50))
def test_sets_equal_the_constraint_after_each_item_prefix_and_the_log_mass_equals_the_dense_one(seed, k, shared,
                                                                                                 n_items):
    constraint, trees, forced, rng = _case(seed, k, shared, n_items)
    pack = pack_trees(trees)
    positions, sets = item_allowed_ids(pack, trees, forced, constraint)
    want, want_positions = [], []
    for i, (tree, domain) in enumerate(zip(trees, forced)):
        start = ([constraint.vocab.begin_id(domain)] if domain is not None else list(constraint.live_begin_ids))
        context = list(tree.prompt) + list(tree.trace)
        for j, child in enumerate(tree.children):
            for t in range(len(child)):
                row = start if t == 0 else constraint.allowed([context + child[:t]])[0].nonzero().flatten().tolist()
                want.append(sorted(row))
                want_positions.append(int(pack.child_index[i, j, t]))
    assert positions.tolist() == want_positions
    assert sets.sets() == want
    width = constraint.vocab_size
    logits = torch.randn(len(want), width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed),
                         requires_grad=True)
    dense = torch.zeros(len(want), width, dtype=torch.bool)
    for r, ids in enumerate(want):
        dense[r, ids] = True
    expected = allowed_log_mass(logits, dense)
    got = vocab_parallel_allowed_log_mass(logits, sets)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    # two vocabulary shards (what TP ranks hold), summed after a common max: the same log-mass
    cut = int(rng.integers(1, width))
    parts = []
    for a, b in ((0, cut), (cut, width)):
        holder = []
        vocab_parallel_allowed_log_mass(logits[:, a:b], sets, vocab_start=a, reduce_sum=lambda s: holder.append(s) or s)
        parts.append(holder[0] * torch.exp(logits.detach()[:, a:b].max(-1).values
                                           - logits.detach().max(-1).values))
    total = parts[0] + parts[1]
    torch.testing.assert_close(total[1].log() - total[0].log(), expected, atol=1e-12, rtol=0)
    (g_got,) = torch.autograd.grad(got.sum(), logits, retain_graph=True)
    (g_want,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(g_got, g_want, atol=1e-12, rtol=0)


def test_a_token_outside_the_catalog_is_refused_and_a_step_sends_a_few_integers_per_position(tmp_path):
    constraint, trees, forced, _ = _case(0, 6, False, 40)
    vocab = constraint.vocab
    bad = [TreeSequence([1, 2], [], [vocab.item_ids("video", (0, 0, 0))[:1] + [vocab.code_id(1, 0)]])]
    with pytest.raises(ValueError, match=r"tree 0 item 0 token 1 \(\d+\) is not allowed by the constraint"):
        item_allowed_ids(pack_trees(bad), bad, [None], constraint)
    # a catalog loaded from its directory: the trie travels by reference, the step's message is the sets alone
    catalog = ItemCatalog(["a", "b"], ["video", "prod"], np.array([[0, 1, 2], [3, 4, 5]]), 6)
    catalog.save(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"levels": 3, "codebook_size": 6}')
    loaded = ItemicConstraint(ItemTrie.from_catalog(ItemCatalog.load(str(tmp_path)), vocab.scheme), vocab,
                              constraint.vocab_size)
    tree = [TreeSequence([1, 2], [3], [vocab.item_ids("video", (0, 1, 2)), vocab.item_ids("prod", (3, 4, 5))])]
    _, sets = item_allowed_ids(pack_trees(tree), tree, [None], loaded)
    message = pickle.dumps(sets)
    assert len(message) < 4000 and pickle.loads(message).sets() == sets.sets()
