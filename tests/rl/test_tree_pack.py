"""Tree packing gives every trace and item token the log-prob of its materialised rollout (oracle: transformers
on each ``prompt + trace + child`` sequence on its own)."""
import pytest
import torch

from megatron_onereason.model.hf_qwen3 import make_hf_qwen3
from megatron_onereason.model.qwen3_config import qwen3_preset
from megatron_onereason.rl.rollout_batch import group_into_packs
from megatron_onereason.rl.tree_pack import TreeSequence, pack_trees, tree_logprobs_layout
from megatron_onereason.rl.workers import hf_tree_logprobs


@pytest.fixture(scope="module")
def model():
    return make_hf_qwen3(qwen3_preset("tiny"), seed=0)


def _tokens(g, n):
    return torch.randint(0, 1000, (n,), generator=g).tolist()


def test_tree_logprobs_equal_materialised_rollouts(model):
    g = torch.Generator().manual_seed(0)
    trees = [TreeSequence(_tokens(g, 5), _tokens(g, 7), [_tokens(g, 4), _tokens(g, 3), _tokens(g, 4)]),
             TreeSequence(_tokens(g, 3), [], [_tokens(g, 2), _tokens(g, 4), _tokens(g, 1)])]  # non-thinking
    pack = pack_trees(trees, length=70)
    trace_lp, child_lp = tree_logprobs_layout(hf_tree_logprobs(model, pack).double(), pack)
    for i, tree in enumerate(trees):
        for j, child in enumerate(tree.children):
            seq = torch.tensor(list(tree.prompt) + list(tree.trace) + list(child))
            with torch.no_grad():
                logp = torch.log_softmax(model(seq[None]).logits[0].double(), -1)
            per_token = logp[:-1].gather(-1, seq[1:, None])[:, 0]
            p = len(tree.prompt)
            torch.testing.assert_close(trace_lp[i, : len(tree.trace)], per_token[p - 1: p - 1 + len(tree.trace)],
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(child_lp[i, j, : len(child)], per_token[p - 1 + len(tree.trace):],
                                       atol=1e-5, rtol=0)
    assert pack.trace_mask.sum() == 7 and pack.child_mask.sum() == 4 + 3 + 4 + 2 + 4 + 1


def test_constrained_positions_are_renormalised_over_their_allowed_ids(model):
    """A scorer (MOPD teacher, KL reference) gives item tokens the constrained distribution's log-probs, as the actor
    does: log π(x) − log Σ_{a∈A} π(a) (oracle: a float64 softmax over the allowed ids of the materialised rollout)."""
    g = torch.Generator().manual_seed(1)
    tree = TreeSequence(_tokens(g, 4), _tokens(g, 3), [[11, 12, 13], [21, 22]])
    pack = pack_trees([tree], length=24)
    raw = hf_tree_logprobs(model, pack)
    allowed = {(0, 0, 1): [12, 5, 7], (0, 1, 1): [22, 30]}  # (tree, child, token) -> allowed ids there
    positions = torch.tensor([int(pack.child_index[k]) for k in allowed])
    ids = torch.full((2, 3), -1, dtype=torch.long)
    for r, a in enumerate(allowed.values()):
        ids[r, : len(a)] = torch.tensor(a)
    pack.item_allowed = (positions, ids)
    renormalised = hf_tree_logprobs(model, pack)
    others = torch.ones_like(raw, dtype=torch.bool)
    others[positions] = False
    assert torch.equal(renormalised[others], raw[others])
    for (i, j, t), a in allowed.items():
        seq = torch.tensor(list(tree.prompt) + list(tree.trace) + list(tree.children[j]))
        with torch.no_grad():
            logits = model(seq[None]).logits[0].double()
        row = logits[len(tree.prompt) + len(tree.trace) + t - 1]
        expected = row[tree.children[j][t]] - torch.logsumexp(row[a], 0)
        assert float(renormalised[int(pack.child_index[i, j, t])]) == pytest.approx(float(expected), abs=1e-5)


def test_tree_is_shorter_than_materialised_rollouts():
    trace, children = list(range(100)), [[1, 2, 3, 4]] * 8
    pack = pack_trees([TreeSequence([7] * 20, trace, children)])
    assert pack.tokens.numel() == 20 + 100 + 8 * 5  # the trace once, not 8 times: 160 vs 8 × 124 = 992


def test_padding_is_its_own_causal_segment_and_bad_input_is_refused():
    pack = pack_trees([TreeSequence([1, 2], [3], [[4], [5]])], length=12)  # 3 + 2 × 2 positions, then 5 of padding
    assert pack.allowed[7:, :7].sum() == 0 and pack.allowed[:7, 7:].sum() == 0
    assert torch.equal(pack.allowed[7:, 7:], torch.ones(5, 5, dtype=torch.bool).tril())
    assert pack.labels[7:].sum() == 0 and pack.tokens[7:].sum() == 0
    with pytest.raises(ValueError, match="same K"):
        pack_trees([TreeSequence([1], [], [[2]]), TreeSequence([1], [], [[2], [3]])])
    with pytest.raises(ValueError, match="more than length"):
        pack_trees([TreeSequence([1, 2, 3], [4], [[5]])], length=4)
    assert group_into_packs([5, 5, 5, 2], 10) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="pack_length"):
        group_into_packs([11], 10)
