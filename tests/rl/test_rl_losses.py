"""Stage-wise clipped GRPO loss (eqs. 10–13), its shared-prefix form, hit weights (eq. 13) and the SFT loss (eq. 15)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from megatron_onereason.rl.losses import (
    aggregate_token_losses,
    grpo_policy_loss,
    hit_sample_weights,
    sft_loss,
    shared_prefix_policy_loss,
)

COT, ITEM = (0.2, 0.28), (0.1, 0.1)


def reference_loss(logp, old, adv, mask, item, clip_cot, clip_item, weight=None, agg="token-mean",
                   normalizer=None, ref=None, kl_coef=0.0, estimator="k3"):
    """Eqs. 10–13 token by token in float64 Python, then the aggregation."""
    seq_sum, seq_len = [], []
    for b in range(len(mask)):
        total, n = 0.0, 0
        for t in range(len(mask[b])):
            if not mask[b][t]:
                continue
            r = math.exp(logp[b][t] - old[b][t])
            lo, hi = clip_item if item[b][t] else clip_cot
            r_clipped = min(max(r, 1 - lo), 1 + hi)
            a = adv[b] if not isinstance(adv[b], list) else adv[b][t]
            loss = max(-a * r, -a * r_clipped) * (1.0 if weight is None else weight[b])
            if ref is not None:
                d = ref[b][t] - logp[b][t]
                loss += kl_coef * (-d if estimator == "k1" else math.exp(d) - d - 1)
            total, n = total + loss, n + 1
        seq_sum.append(total)
        seq_len.append(n)
    if agg == "token-mean":
        return sum(seq_sum) / (normalizer or sum(seq_len))
    per_seq = [s / n for s, n in zip(seq_sum, seq_len) if n]
    return sum(per_seq) / (normalizer or len(per_seq))


def random_batch(seed, b, t, item_frac=0.3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=dtype) * 3
    logp = old + (torch.rand(b, t, generator=g, dtype=dtype) - 0.5) * 0.8  # ratios in [0.67, 1.49]
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    item = torch.rand(b, t, generator=g) < item_frac
    adv = torch.randn(b, generator=g, dtype=dtype)
    weight = torch.where(torch.rand(b, generator=g) < 0.5, 1.0, 0.3).to(dtype)
    ref = old + (torch.rand(b, t, generator=g, dtype=dtype) - 0.5)
    return logp, old, adv, mask, item, weight, ref


def test_hand_case_stage_wise_clipping():
    # Token 0 (reasoning) and token 1 (item), both with ratio 1.5 and A = +1: clipped at 1.28 and 1.1.
    # Token 2 (reasoning, ratio 0.5, A = -1 → clipped at 0.8) and token 3 (item, ratio 0.5, A = -1 → 0.9).
    logp = torch.log(torch.tensor([[1.5, 1.5], [0.5, 0.5]], dtype=torch.float64)).requires_grad_()
    old = torch.zeros(2, 2, dtype=torch.float64)
    item = torch.tensor([[False, True], [False, True]])
    loss, metrics = grpo_policy_loss(logp, old, torch.tensor([1.0, -1.0], dtype=torch.float64),
                                     torch.ones(2, 2, dtype=torch.bool), item)
    assert loss.item() == pytest.approx((-1.28 - 1.1 + 0.8 + 0.9) / 4)
    loss.backward()
    assert logp.grad.tolist() == [[0.0, 0.0], [0.0, 0.0]]  # every token is on its clipped branch
    assert metrics["clipfrac_cot"].item() == 1.0 and metrics["clipfrac_item"].item() == 1.0
    assert metrics["ratio_min"].item() == pytest.approx(0.5) and metrics["ratio_max"].item() == pytest.approx(1.5)


def test_hand_case_inside_band_and_sample_weight():
    # Ratio 1.1 is inside both bands: loss -A·r·w, gradient -A·r·w / num_tokens.
    logp = torch.full((2, 1), math.log(1.1), dtype=torch.float64, requires_grad=True)
    loss, metrics = grpo_policy_loss(logp, torch.zeros(2, 1, dtype=torch.float64),
                                     torch.tensor([2.0, 2.0], dtype=torch.float64), torch.ones(2, 1),
                                     torch.tensor([[False], [True]]), sample_weight=torch.tensor([1.0, 0.25]))
    assert loss.item() == pytest.approx((-2 * 1.1 * 1.0 - 2 * 1.1 * 0.25) / 2)
    loss.backward()
    assert logp.grad[:, 0].tolist() == pytest.approx([-2 * 1.1 / 2, -2 * 1.1 * 0.25 / 2])
    assert metrics["clipfrac"].item() == 0.0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 5), t=st.integers(1, 8),
       agg=st.sampled_from(["token-mean", "seq-mean-token-mean"]), estimator=st.sampled_from(["k1", "k3"]),
       token_adv=st.booleans())
def test_matches_loop_reference(seed, b, t, agg, estimator, token_adv):
    logp, old, adv, mask, item, weight, ref = random_batch(seed, b, t)
    if token_adv:
        adv = adv[:, None] * torch.linspace(0.5, 1.5, t, dtype=torch.float64)
    loss, _ = grpo_policy_loss(logp, old, adv, mask, item, COT, ITEM, weight, agg, ref_logp=ref, kl_coef=0.05,
                               kl_estimator=estimator)
    expected = reference_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), item.tolist(), COT, ITEM,
                              weight.tolist(), agg, ref=ref.tolist(), kl_coef=0.05, estimator=estimator)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 5), t=st.integers(1, 8), eps=st.floats(0.05, 0.3))
def test_reduces_to_standard_ppo_clip_with_beta_one_and_equal_ranges(seed, b, t, eps):
    logp, old, adv, mask, item, _, _ = random_batch(seed, b, t)
    loss, _ = grpo_policy_loss(logp, old, adv, mask, item, (eps, eps), (eps, eps), torch.ones(b, dtype=torch.float64))
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    standard = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)  # PPO's clipped surrogate
    assert loss.item() == pytest.approx((standard[mask].sum() / mask.sum()).item(), rel=1e-12, abs=1e-12)
    unweighted, _ = grpo_policy_loss(logp, old, adv, mask, item, (eps, eps), (eps, eps))
    assert unweighted.item() == loss.item()


def test_gradients_flow_only_through_logp():
    logp, old, adv, mask, item, weight, ref = random_batch(3, 3, 5)
    leaves = [x.clone().requires_grad_() for x in (logp, old, adv, weight, ref)]
    loss, _ = grpo_policy_loss(leaves[0], leaves[1], leaves[2], mask, item, COT, ITEM, leaves[3],
                               ref_logp=leaves[4], kl_coef=0.1)
    loss.backward()
    assert leaves[0].grad is not None and leaves[0].grad[mask].abs().sum() > 0
    assert (leaves[0].grad[~mask] == 0).all()
    assert all(x.grad is None for x in leaves[1:])


def test_padding_may_be_nan_or_inf():
    logp, old, adv, mask, item, _, _ = random_batch(5, 3, 6)
    clean, _ = grpo_policy_loss(logp, old, adv, mask, item)
    dirty_logp = logp.masked_fill(~mask, float("nan")).requires_grad_()
    dirty, _ = grpo_policy_loss(dirty_logp, old.masked_fill(~mask, float("-inf")), adv, mask, item)
    dirty.backward()
    assert dirty.item() == clean.item()
    assert torch.isfinite(dirty_logp.grad).all()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_sum_to_global_batch_with_normalizer(agg):
    logp, old, adv, mask, item, weight, _ = random_batch(11, 6, 7)
    full, _ = grpo_policy_loss(logp, old, adv, mask, item, sample_weight=weight, agg=agg)
    normalizer = mask.sum().item() if agg == "token-mean" else 6
    parts = [grpo_policy_loss(logp[s], old[s], adv[s], mask[s], item[s], sample_weight=weight[s], agg=agg,
                              loss_normalizer=normalizer)[0] for s in (slice(0, 2), slice(2, 6))]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), rel=1e-12)


def test_metrics_against_loop():
    logp, old, adv, mask, item, _, _ = random_batch(17, 4, 6, item_frac=0.5)
    _, m = grpo_policy_loss(logp, old, adv, mask, item, COT, ITEM)
    clipped = {False: [], True: []}
    k3 = []
    for b in range(4):
        for t in range(6):
            if mask[b, t]:
                r, a = math.exp(logp[b, t] - old[b, t]), adv[b].item()
                lo, hi = ITEM if item[b, t] else COT
                clipped[bool(item[b, t])].append((a > 0 and r > 1 + hi) or (a < 0 and r < 1 - lo))
                k3.append(r - 1 - math.log(r))
    assert m["clipfrac_cot"].item() == pytest.approx(sum(clipped[False]) / max(1, len(clipped[False])))
    assert m["clipfrac_item"].item() == pytest.approx(sum(clipped[True]) / max(1, len(clipped[True])))
    assert m["approx_kl"].item() == pytest.approx(sum(k3) / len(k3))


@pytest.mark.parametrize("change,match", [
    (dict(old_logp=torch.zeros(2, 4)), "old_logp has shape"),
    (dict(logp=torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]])), "logp holds NaN"),
    (dict(advantages=torch.zeros(3)), "advantages has shape"),
    (dict(item_mask=torch.zeros(3, 2)), "item_mask"),
    (dict(sample_weight=torch.ones(3)), "sample_weight"),
    (dict(sample_weight=torch.tensor([1.0, -1.0])), "non-negative"),
    (dict(kl_coef=0.1), "ref_logp"),
    (dict(agg="sum"), "agg"),
    (dict(clip_item=(1.0, 0.1)), "clip_item"),
    (dict(response_mask=torch.zeros(2, 3)), "no token"),
    (dict(loss_normalizer=0), "loss_normalizer"),
])
def test_bad_input(change, match):
    args = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), advantages=torch.zeros(2),
                response_mask=torch.ones(2, 3), item_mask=torch.zeros(2, 3))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        grpo_policy_loss(**args)


def test_empty_micro_batch_with_normalizer_is_zero():
    loss, _ = grpo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.zeros(1, 2),
                               torch.zeros(1, 2), loss_normalizer=10)
    assert loss.item() == 0.0


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3), k=st.integers(1, 4), tr=st.integers(1, 6),
       tc=st.integers(1, 4), agg=st.sampled_from(["token-mean", "seq-mean-token-mean"]), kl=st.booleans())
def test_shared_prefix_equals_materialised_loss_and_gradients(seed, n, k, tr, tc, agg, kl):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    trace_old, child_old = -torch.rand(n, tr, **f64) * 2, -torch.rand(n, k, tc, **f64) * 2
    trace_logp = trace_old + (torch.rand(n, tr, **f64) - 0.5) * 0.8
    child_logp = child_old + (torch.rand(n, k, tc, **f64) - 0.5) * 0.8
    trace_ref, child_ref = trace_old + torch.rand(n, tr, **f64) - 0.5, child_old + torch.rand(n, k, tc, **f64) - 0.5
    trace_len = torch.randint(1, tr + 1, (n,), generator=g)
    child_len = torch.randint(1, tc + 1, (n, k), generator=g)
    trace_mask = torch.arange(tr) < trace_len[:, None]
    child_mask = torch.arange(tc) < child_len[..., None]
    adv = torch.randn(n, k, **f64)
    weight = torch.where(torch.rand(n, k, generator=g) < 0.5, 1.0, 0.4).double()
    trace_logp.requires_grad_()
    child_logp.requires_grad_()
    loss, metrics = shared_prefix_policy_loss(
        trace_logp, trace_old, trace_mask, child_logp, child_old, child_mask, adv, COT, ITEM, weight, agg,
        trace_ref_logp=trace_ref if kl else None, child_ref_logp=child_ref if kl else None, kl_coef=0.1 if kl else 0.0)
    loss.backward()

    # Materialise the N×K sequences [trace_i ; child_ij], right-padded, the way a plain GRPO batch looks.
    t = tr + tc
    rows = [(i, j) for i in range(n) for j in range(k)]
    mat = {name: torch.zeros(n * k, t, dtype=torch.float64) for name in ("logp", "old", "ref")}
    mask = torch.zeros(n * k, t, dtype=torch.bool)
    item = torch.zeros(n * k, t, dtype=torch.bool)
    for r, (i, j) in enumerate(rows):
        lt, lc = int(trace_len[i]), int(child_len[i, j])
        for name, trace, child in (("logp", trace_logp, child_logp), ("old", trace_old, child_old),
                                   ("ref", trace_ref, child_ref)):
            mat[name][r, :lt] = trace[i, :lt].detach()
            mat[name][r, lt:lt + lc] = child[i, j, :lc].detach()
        mask[r, :lt + lc] = True
        item[r, lt:lt + lc] = True
    mat_logp = mat["logp"].requires_grad_()
    expected, expected_metrics = grpo_policy_loss(
        mat_logp, mat["old"], adv.reshape(-1), mask, item, COT, ITEM, weight.reshape(-1), agg,
        ref_logp=mat["ref"] if kl else None, kl_coef=0.1 if kl else 0.0)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-14)
    for key in ("clipfrac_cot", "clipfrac_item", "approx_kl"):
        assert metrics[key].item() == pytest.approx(expected_metrics[key].item(), rel=1e-12, abs=1e-14)
    # A trace token's gradient is the sum over the K copies of it in the materialised batch.
    for i in range(n):
        lt = int(trace_len[i])
        copies = [mat_logp.grad[i * k + j, :lt] for j in range(k)]
        torch.testing.assert_close(trace_logp.grad[i, :lt], torch.stack(copies).sum(0), rtol=1e-12, atol=1e-14)
        assert (trace_logp.grad[i, lt:] == 0).all()
        for j in range(k):
            lc = int(child_len[i, j])
            torch.testing.assert_close(child_logp.grad[i, j, :lc], mat_logp.grad[i * k + j, lt:lt + lc],
                                       rtol=1e-12, atol=1e-14)


def test_shared_prefix_bad_input():
    args = dict(trace_logp=torch.zeros(2, 3), trace_old_logp=torch.zeros(2, 3), trace_mask=torch.ones(2, 3),
                child_logp=torch.zeros(2, 4, 2), child_old_logp=torch.zeros(2, 4, 2), child_mask=torch.ones(2, 4, 2),
                advantages=torch.zeros(2, 4))
    for change, match in [(dict(advantages=torch.zeros(8)), r"\[N, K\]"),
                          (dict(child_logp=torch.zeros(2, 3, 2)), "child_logp"),
                          (dict(trace_old_logp=torch.zeros(2, 5)), "old_logp"),
                          (dict(sample_weight=torch.ones(8)), "sample_weight"),
                          (dict(trace_ref_logp=torch.zeros(2, 3)), "both")]:
        with pytest.raises(ValueError, match=match):
            shared_prefix_policy_loss(**{**args, **change})


def test_hit_sample_weights():
    assert hit_sample_weights(torch.tensor([True, False, True]), 0.25).tolist() == [1.0, 0.25, 1.0]
    with pytest.raises(ValueError, match="beta"):
        hit_sample_weights(torch.tensor([True]), 1.5)


def test_sft_loss_aggregations_by_hand():
    logp = torch.tensor([[-1.0, -2.0, float("nan")], [-3.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sft_loss(logp, mask).item() == pytest.approx(6 / 3)
    assert sft_loss(logp, mask, agg="seq-mean-token-sum").item() == pytest.approx((3 + 3) / 2)  # eq. 15
    loss = sft_loss(logp, mask, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx((1.5 + 3) / 2)
    loss.backward()
    assert logp.grad.tolist() == [[-0.25, -0.25, 0.0], [-0.5, 0.0, 0.0]]
    with pytest.raises(ValueError, match="NaN"):
        sft_loss(logp, torch.ones(2, 3))


def test_aggregate_skips_empty_sequences():
    x = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    mask = torch.tensor([[True, True], [False, False]])
    assert aggregate_token_losses(x, mask, "seq-mean-token-mean").item() == 2.0
    assert aggregate_token_losses(x, mask, "seq-mean-token-sum").item() == 4.0
