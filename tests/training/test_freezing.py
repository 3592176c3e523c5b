"""Stage-1 row freezing follows the itemic token ids wherever the scheme put them (no process group needed)."""
import random

import pytest
import torch

from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab, preset
from megatron_onereason.training.freezing import ROW_RANGE_ATTR, local_row_ranges, mask_frozen_row_grads
from megatron_onereason.training.loss import loss_breakdown


def _scattered_vocab(rows):
    scheme = preset("openonerec", codebook_size=6)
    tokens = scheme.token_strings()
    ids = random.Random(0).sample(range(rows), len(tokens))
    return ItemicVocab.from_lookup(scheme, dict(zip(tokens, ids)))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_masked_gradient_keeps_exactly_the_itemic_rows_on_every_shard(tp):
    rows = 64
    vocab = _scattered_vocab(rows)
    assert len(vocab.id_ranges) > 3  # scattered: several runs
    kept = []
    for rank in range(tp):
        param = torch.nn.Parameter(torch.zeros(rows // tp, 3))
        param.main_grad = torch.ones(rows // tp, 3)
        setattr(param, ROW_RANGE_ATTR, local_row_ranges(vocab.id_ranges, rows // tp, rank))
        mask_frozen_row_grads([param])
        kept.append(param.main_grad[:, 0].bool())
    oracle = torch.isin(torch.arange(rows), torch.from_numpy(vocab.itemic_ids))
    assert torch.equal(torch.cat(kept), oracle)


def test_a_shard_without_itemic_rows_is_still_row_frozen():
    """megatron's ParamKey(attr=...) tests the attribute's truth: it must never be an empty list."""
    assert local_row_ranges([(10, 20)], 8, 0) == [(0, 0)]
    param = torch.nn.Parameter(torch.zeros(8, 2))
    param.grad = torch.ones(8, 2)
    setattr(param, ROW_RANGE_ATTR, local_row_ranges([(10, 20)], 8, 0))
    assert getattr(param, ROW_RANGE_ATTR)
    mask_frozen_row_grads([param])
    assert param.grad.abs().sum() == 0


def test_loss_breakdown_counts_scattered_itemic_labels():
    vocab = _scattered_vocab(64)
    labels = torch.arange(64)
    loss = torch.rand(64, dtype=torch.float64)
    mask = torch.ones(64)
    out = loss_breakdown(loss, mask, labels, torch.zeros(64, dtype=torch.long), vocab.id_ranges, 1)
    itemic = torch.isin(labels, torch.from_numpy(vocab.itemic_ids))
    assert out[3].item() == itemic.sum().item() == len(vocab.itemic_ids)
    assert out[2].item() == pytest.approx(loss[itemic].sum().item())
    assert out[5].item() == (~itemic).sum().item()
