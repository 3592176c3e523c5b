import pytest
import torch

from megatron_onereason.model.packed_attention import block_causal_mask


def test_block_causal_mask_matches_hand_built_mask():
    cu = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
    allowed = torch.zeros(6, 6, dtype=torch.bool)
    for start, end in [(0, 2), (2, 5), (5, 6)]:
        for q in range(start, end):
            allowed[q, start:q + 1] = True
    assert torch.equal(block_causal_mask(cu, 6)[0, 0], ~allowed)


@pytest.mark.parametrize("cu", [[1, 6], [0, 5], [0, 4, 3, 6]])
def test_block_causal_mask_rejects_bad_boundaries(cu):
    with pytest.raises(ValueError, match="cu_seqlens"):
        block_causal_mask(torch.tensor(cu), 6)
