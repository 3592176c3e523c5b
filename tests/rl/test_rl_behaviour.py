"""Behaviour-policy correction (decoupled PPO with truncated IS weights), the sampling distribution's one
definition, and the RL diagnostics (IS statistics, actor–rollout gap, invalid itemic tokens, mini-batch reduction)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from megatron_onereason.rl.losses import grpo_policy_loss, importance_weights, shared_prefix_policy_loss
from megatron_onereason.rl.metrics import (
    ItemValidity,
    importance_weight_stats,
    logprob_gap_stats,
    mean_over_minibatches,
)
from megatron_onereason.rl.sampling import (
    allowed_log_mass,
    renormalised_logprobs,
    sampling_logprobs,
    vocab_parallel_allowed_log_mass,
)
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab, preset

COT, ITEM = (0.2, 0.28), (0.1, 0.1)


def test_importance_weights_hand_case():
    # π_old / μ = 0.5, 1, 1.5, 3: TIS truncates to [0, 2]; eq. 17's mask mode zeroes outside [0.8, 2].
    old = torch.log(torch.tensor([[0.5, 1.0, 1.5, 3.0]], dtype=torch.float64))
    rollout = torch.zeros(1, 4, dtype=torch.float64)
    w, ratio = importance_weights(old, rollout)
    assert w.tolist() == [[pytest.approx(0.5), 1.0, pytest.approx(1.5), 2.0]]
    assert ratio.tolist() == [[pytest.approx(0.5), 1.0, pytest.approx(1.5), pytest.approx(3.0)]]
    w_mask, _ = importance_weights(old, rollout, low=0.8, high=2.0, mode="mask")
    assert w_mask.tolist() == [[0.0, 1.0, pytest.approx(1.5), 0.0]]
    w_low, _ = importance_weights(old, rollout, low=0.9, high=1.2)
    assert w_low.tolist() == [[0.9, 1.0, 1.2, 1.2]]
    masked, _ = importance_weights(old.masked_fill(torch.tensor([[False, True, False, False]]), float("nan")),
                                   rollout, mask=torch.tensor([[1, 0, 1, 1]]))
    assert masked.tolist() == [[pytest.approx(0.5), 0.0, pytest.approx(1.5), 2.0]]
    with pytest.raises(ValueError, match="mode"):
        importance_weights(old, rollout, mode="clip")
    with pytest.raises(ValueError, match="low <= high"):
        importance_weights(old, rollout, low=2.0, high=1.0)


def test_three_policy_token_loss_by_hand():
    # One reasoning token, one item token. μ drew them; π_old/μ = 1.5 and 0.5 (TIS weights 1.5, 0.5);
    # π_θ/π_old = 1.5 and 1.05. A = +1: the reasoning token clips at 1.28, the item token is inside [0.9, 1.1].
    mu = torch.zeros(1, 2, dtype=torch.float64)
    old = torch.log(torch.tensor([[1.5, 0.5]], dtype=torch.float64))
    logp = (old + torch.log(torch.tensor([[1.5, 1.05]], dtype=torch.float64))).requires_grad_()
    w, _ = importance_weights(old, mu)
    loss, m = grpo_policy_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2),
                               torch.tensor([[False, True]]), COT, ITEM, is_weights=w)
    assert loss.item() == pytest.approx((-1.5 * 1.28 - 0.5 * 1.05) / 2)
    loss.backward()
    # d/dlogp of -w·r·A = -w·r·A on the unclipped branch; 0 on the clipped one.
    assert logp.grad.tolist() == [[0.0, pytest.approx(-0.5 * 1.05 / 2)]]
    assert m["clipfrac_cot"].item() == 1.0 and m["clipfrac_item"].item() == 0.0


def reference_token_losses(logp, old, mu, adv, mask, item, cap):
    """Decoupled PPO per token in float64 Python: w = min(π_old/μ, cap) times the stage-wise clipped surrogate."""
    total, n = 0.0, 0
    for b in range(len(mask)):
        for t in range(len(mask[b])):
            if not mask[b][t]:
                continue
            w = min(math.exp(old[b][t] - mu[b][t]), cap)
            r = math.exp(logp[b][t] - old[b][t])
            lo, hi = ITEM if item[b][t] else COT
            total += w * max(-adv[b] * r, -adv[b] * min(max(r, 1 - lo), 1 + hi))
            n += 1
    return total / n


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cap=st.floats(1.0, 3.0))
def test_decoupled_loss_matches_float64_reference(seed, cap):
    g = torch.Generator().manual_seed(seed)
    b, t = 3, 6
    mu = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = mu + (torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5) * 2  # π_old/μ in [0.37, 2.7]
    logp = old + (torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5) * 0.8
    mask = torch.arange(t)[None] < torch.randint(1, t + 1, (b,), generator=g)[:, None]
    item = torch.rand(b, t, generator=g) < 0.4
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    w, _ = importance_weights(old, mu, mask, high=cap)
    loss, _ = grpo_policy_loss(logp, old, adv, mask, item, COT, ITEM, is_weights=w)
    expected = reference_token_losses(logp.tolist(), old.tolist(), mu.tolist(), adv.tolist(), mask.tolist(),
                                      item.tolist(), cap)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_bypass_equals_decoupled_when_old_is_the_behaviour_policy():
    g = torch.Generator().manual_seed(0)
    mu = -torch.rand(2, 5, generator=g, dtype=torch.float64)
    logp = mu + 0.3 * torch.randn(2, 5, generator=g, dtype=torch.float64)
    mask, item, adv = torch.ones(2, 5, dtype=torch.bool), torch.rand(2, 5, generator=g) < 0.5, torch.randn(2)
    w, ratio = importance_weights(mu, mu)
    assert (w == 1).all() and (ratio == 1).all()
    decoupled, _ = grpo_policy_loss(logp, mu, adv.double(), mask, item, is_weights=w)
    bypass, _ = grpo_policy_loss(logp, mu, adv.double(), mask, item)
    assert decoupled.item() == bypass.item()


def test_shared_prefix_loss_with_is_weights_equals_materialised_rollouts():
    g = torch.Generator().manual_seed(1)
    n, k, tr, tc = 2, 3, 4, 2
    lp = lambda *s: -torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    trace_lp, trace_old, child_lp, child_old = lp(n, tr), lp(n, tr), lp(n, k, tc), lp(n, k, tc)
    trace_w, child_w = 2 * torch.rand(n, tr, generator=g, dtype=torch.float64), torch.rand(n, k, tc, generator=g,
                                                                                           dtype=torch.float64)
    trace_mask, child_mask = torch.ones(n, tr, dtype=torch.bool), torch.ones(n, k, tc, dtype=torch.bool)
    adv = torch.randn(n, k, generator=g, dtype=torch.float64)
    loss, _ = shared_prefix_policy_loss(trace_lp, trace_old, trace_mask, child_lp, child_old, child_mask, adv,
                                        trace_is_weights=trace_w, child_is_weights=child_w)
    rows = [(torch.cat([trace_lp[i], child_lp[i, j]]), torch.cat([trace_old[i], child_old[i, j]]),
             torch.cat([trace_w[i], child_w[i, j]])) for i in range(n) for j in range(k)]
    item = torch.tensor([[False] * tr + [True] * tc] * (n * k))
    flat, _ = grpo_policy_loss(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                               adv.reshape(-1), torch.ones(n * k, tr + tc, dtype=torch.bool), item,
                               is_weights=torch.stack([r[2] for r in rows]))
    assert loss.item() == pytest.approx(flat.item(), rel=1e-12)
    with pytest.raises(ValueError, match="both trace_is_weights and child_is_weights"):
        shared_prefix_policy_loss(trace_lp, trace_old, trace_mask, child_lp, child_old, child_mask, adv,
                                  trace_is_weights=trace_w)


def test_negative_is_weights_are_refused():
    x = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="non-negative"):
        grpo_policy_loss(x, x, torch.ones(1, dtype=torch.float64), torch.ones(1, 2), torch.zeros(1, 2),
                         is_weights=torch.tensor([[1.0, -0.1]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- sampling
def test_sampling_logprobs_by_hand():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0), 5.0]], dtype=torch.float64)
    tokens = torch.tensor([1])
    assert sampling_logprobs(logits, tokens).item() == pytest.approx(math.log(2.0 / (6.0 + math.exp(5.0))))
    allowed = torch.tensor([[True, True, True, False]])
    assert sampling_logprobs(logits, tokens, allowed).item() == pytest.approx(math.log(2.0 / 6.0))
    # Temperature 2 halves the logits: p ∝ (1, √2, √3) on the allowed set.
    assert sampling_logprobs(logits, tokens, allowed, 2.0).item() == pytest.approx(
        math.log(math.sqrt(2) / (1 + math.sqrt(2) + math.sqrt(3))))
    assert sampling_logprobs(logits, tokens, allowed, 0.0).item() == pytest.approx(math.log(2.0 / 6.0))
    with pytest.raises(ValueError, match="not allowed"):
        sampling_logprobs(logits, torch.tensor([3]), allowed)


def test_renormalised_actor_logprobs_equal_the_constrained_rollout_distribution():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    allowed = torch.rand(5, 11, generator=g) < 0.4
    allowed[:, 3] = True
    tokens = torch.tensor([3, 3, 3, 3, 3])
    everything = torch.ones_like(allowed)
    raw = sampling_logprobs(logits, tokens)
    assert allowed_log_mass(logits, everything).abs().max().item() < 1e-12
    actor = renormalised_logprobs(raw, allowed_log_mass(logits, allowed))
    rollout = sampling_logprobs(logits, tokens, allowed)
    assert torch.allclose(actor, rollout, rtol=0, atol=1e-12)
    # Gradients through the normaliser: equal to those of the constrained log-softmax itself.
    (ga,) = torch.autograd.grad(actor.sum(), logits, retain_graph=True)
    (gr,) = torch.autograd.grad(rollout.sum(), logits)
    assert torch.allclose(ga, gr, atol=1e-12)
    with pytest.raises(ValueError, match="<= 0"):
        renormalised_logprobs(raw, torch.full_like(raw, 0.5))


# ---------------------------------------------------------------------------------------------- metrics
def test_importance_weight_stats_by_hand():
    old = torch.log(torch.tensor([[0.5, 1.0, 3.0, 9.0]], dtype=torch.float64))
    w, ratio = importance_weights(old, torch.zeros(1, 4, dtype=torch.float64))
    stats = importance_weight_stats(w, ratio, torch.tensor([[True, True, True, False]]))
    assert stats == {"is_weight_mean": pytest.approx(3.5 / 3), "is_weight_min": pytest.approx(0.5),
                     "is_weight_max": 2.0, "is_ratio_mean": pytest.approx(4.5 / 3),
                     "is_clipped_frac": pytest.approx(1 / 3)}
    assert importance_weight_stats(w, ratio, torch.zeros(1, 4, dtype=torch.bool))["is_weight_mean"] == 0.0


def test_logprob_gap_stats_by_hand():
    actor = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    rollout = torch.tensor([[-1.5, -2.0, -0.25]], dtype=torch.float64)
    item = torch.tensor([[False, False, True]])
    s = logprob_gap_stats(actor, rollout, torch.ones(1, 3, dtype=torch.bool), item)
    k3 = lambda d: math.exp(d) - 1 - d  # noqa: E731
    assert s["logp_gap_abs_mean"] == pytest.approx(0.75 / 3)
    assert s["logp_gap_abs_max"] == pytest.approx(0.5)
    assert s["kl_rollout_actor"] == pytest.approx((k3(0.5) + k3(0.0) + k3(-0.25)) / 3)
    assert s["logp_gap_abs_mean_cot"] == pytest.approx(0.25) and s["logp_gap_abs_mean_item"] == pytest.approx(0.25)
    assert s["kl_rollout_actor_item"] == pytest.approx(k3(-0.25))


def test_mean_over_minibatches_by_hand():
    mbs = [{"clipfrac_item": 0.0, "ratio_min": 1.0, "ratio_max": 1.0, "loss": 2.0},
           {"clipfrac_item": 0.3, "ratio_min": 0.7, "ratio_max": 1.4, "loss": 1.0, "grad_norm": 5.0}]
    out = mean_over_minibatches(mbs, weights=[1.0, 3.0])
    assert out == {"clipfrac_item": pytest.approx(0.225), "ratio_min": 0.7, "ratio_max": 1.4,
                   "loss": pytest.approx(1.25), "grad_norm": 5.0}
    assert mean_over_minibatches(mbs)["clipfrac_item"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="no mini-batch"):
        mean_over_minibatches([])
    with pytest.raises(ValueError, match="one non-negative weight"):
        mean_over_minibatches(mbs, weights=[1.0])


@pytest.mark.parametrize("scheme_name", ["onereason_report", "openonerec"])
def test_item_validity_walks_the_catalog_trie(scheme_name):
    scheme = preset(scheme_name, codebook_size=4)
    vocab = ItemicVocab.from_lookup(scheme, {t: 100 + i for i, t in enumerate(scheme.token_strings())})
    catalog = ItemCatalog(["v1", "v2", "p1"], ["video", "video", "prod"],
                          np.array([[0, 1, 2], [0, 3, 3], [1, 1, 1]]), 4)
    validity = ItemValidity(ItemTrie.from_catalog(catalog, scheme), vocab)
    good = vocab.item_ids("video", (0, 1, 2))
    assert validity.first_invalid(good) is None
    assert validity.first_invalid(vocab.item_ids("video", (0, 3, 2))) == 3  # (0, 3, 2) is no item
    assert validity.first_invalid([vocab.begin_id("video"), vocab.code_id(0, 2)]) == 1  # no item starts with 2
    assert validity.first_invalid([7] + good[1:]) == 0  # a text token where the begin token belongs
    assert validity.first_invalid(good + [7]) == len(good)  # a token past the pattern
    assert validity.first_invalid(good[:2]) == 2  # cut short
    # Codes out of level order: <b_1> where <a_*> belongs.
    assert validity.first_invalid([vocab.begin_id("video"), vocab.code_id(1, 0)] + good[2:]) == 1
    rates = validity.rates([good, vocab.item_ids("video", (0, 3, 2)), good[:2]])
    length = len(good)
    assert rates["invalid_item_rate"] == pytest.approx(2 / 3)
    assert rates["invalid_itemic_token_rate"] == pytest.approx(((length - 3) + (length - 2)) / (3 * length))
    if scheme.shared_begin:  # a shared begin token: the codes alone decide, any domain's item is valid
        assert validity.first_invalid(vocab.item_ids(None, (1, 1, 1))) is None
    else:
        assert validity.first_invalid(vocab.item_ids("prod", (0, 1, 2))) == 1  # video codes after prod begin


def test_vocab_parallel_log_mass_equals_the_dense_one_shard_by_shard():
    """Two vocabulary shards summed by hand (what the TP all-reduce does) give the dense log-mass and gradient."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 10, generator=g, dtype=torch.float64, requires_grad=True)
    allowed = torch.zeros(4, 10, dtype=torch.bool)
    ids = torch.tensor([[1, 7, -1], [0, 4, 9], [5, -1, -1], [2, 3, 8]])
    for p, row in enumerate(ids.tolist()):
        allowed[p, [i for i in row if i >= 0]] = True
    dense = allowed_log_mass(logits, allowed)
    single = vocab_parallel_allowed_log_mass(logits, ids)
    assert torch.allclose(single, dense, atol=1e-12)
    # Shards [0, 6) and [6, 10): partial sums shifted by the global max, added across "ranks".
    parts = []
    for start, stop in ((0, 6), (6, 10)):
        holder = []
        vocab_parallel_allowed_log_mass(logits[:, start:stop], ids, vocab_start=start,
                                        reduce_sum=lambda s: holder.append(s) or s)
        parts.append(holder[0])
    # Each shard used its own max here (no group): rescale to a common max before adding.
    maxes = [logits.detach()[:, a:b].max(-1).values for a, b in ((0, 6), (6, 10))]
    common = torch.maximum(*maxes)
    total = sum(part * torch.exp(m - common) for part, m in zip(parts, maxes))
    assert torch.allclose(total[1].log() - total[0].log(), dense, atol=1e-12)
    (g_single,) = torch.autograd.grad(single.sum(), logits, retain_graph=True)
    (g_dense,) = torch.autograd.grad(dense.sum(), logits)
    assert torch.allclose(g_single, g_dense, atol=1e-12)
