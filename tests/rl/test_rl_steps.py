"""Pure parts of the GRPO / MOPD steps: eq. 13's weights with a beam, over-long trees left out."""
import torch

from megatron_onereason.rl.grpo_step import rollout_weights
from megatron_onereason.rl.rollout_batch import RolloutTree, tree_length, trees_within
from megatron_onereason.rl.tree_pack import TreeSequence


def test_eq13_weights_per_item_when_sampled_per_trace_with_a_beam():
    hit = torch.tensor([[[False, True, False, False], [False, False, False, False]]])  # 1 user, N=2, K=4
    sampled = rollout_weights(hit, 0.25, beam=False)
    assert sampled.tolist() == [[[0.25, 1.0, 0.25, 0.25], [0.25] * 4]]
    beam = rollout_weights(hit, 0.25, beam=True)
    assert beam.tolist() == [[[1.0] * 4, [0.25] * 4]]
    # The loss counts a trace token once per item with that item's weight: its weight is the mean over K.
    assert beam.mean(-1).tolist() == [[1.0, 0.25]] and sampled.mean(-1)[0, 0].item() == 0.25 + 0.75 / 4


def test_trees_longer_than_a_pack_are_left_out_in_order():
    def tree(prompt, trace, children):
        t = TreeSequence([1] * prompt, [2] * trace, [[3] * c for c in children])
        return RolloutTree(0, 0, t, *[torch.zeros(0)] * 6)

    trees = [tree(10, 5, [4, 4]), tree(40, 20, [4]), tree(3, 0, [4])]
    assert [tree_length(t.tree) for t in trees] == [25, 65, 8]
    assert trees_within(trees, [0, 1, 2], 64) == [0, 2]
    assert trees_within(trees, [2, 1], 65) == [2, 1]
