"""MOPD (eqs. 16–20) and OpenOneRec's itemic-token penalty (§5.2)."""
import json
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st

from megatron_onereason.generation.hf_backend import TransformersScorer
from megatron_onereason.rl.distill import (
    check_teacher_vocabulary,
    general_itemic_penalty,
    information_gain_filter,
    information_gain_scores,
    itemic_penalty,
    itemic_token_mask,
    load_general_prompts,
    mopd_advantages,
    mopd_loss,
    route_to_teachers,
    teacher_input_ids,
    truncated_is_weights,
)
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab, preset


def test_mopd_advantages_hand_case_stop_gradient_and_clip():
    teacher = torch.tensor([[-1.0, -3.0, float("nan")]])
    student = torch.tensor([[-2.0, -1.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    adv = mopd_advantages(teacher, student, mask)
    assert adv.tolist() == [[1.0, -2.0, 0.0]]
    assert not adv.requires_grad
    assert mopd_advantages(teacher, student, mask, clip=(-1.5, 0.5)).tolist() == [[0.5, -1.5, 0.0]]
    with pytest.raises(ValueError, match="teacher_logp holds NaN"):
        mopd_advantages(teacher, student, torch.ones(1, 3))
    with pytest.raises(ValueError, match="student_logp has shape"):
        mopd_advantages(teacher, student[:, :2], mask)
    with pytest.raises(ValueError, match="clip"):
        mopd_advantages(teacher, student, mask, clip=(1.0, -1.0))


def test_truncated_is_weights_hand_case():
    train = torch.log(torch.tensor([[0.5, 1.0, 1.5, 3.0]], dtype=torch.float64))
    rollout = torch.zeros(1, 4, dtype=torch.float64)
    w = truncated_is_weights(train, rollout, 0.8, 2.0)
    assert w.tolist() == [[0.0, 1.0, pytest.approx(1.5), 0.0]]
    assert truncated_is_weights(train, rollout, 1.0, 1.0).tolist() == [[0.0, 1.0, 0.0, 0.0]]  # inclusive band
    masked = truncated_is_weights(train.masked_fill(torch.tensor([[False, True, False, False]]), float("nan")),
                                  rollout, 0.8, 2.0, mask=torch.tensor([[1, 0, 1, 1]]))
    assert masked.tolist() == [[0.0, 0.0, pytest.approx(1.5), 0.0]]
    with pytest.raises(ValueError, match="low"):
        truncated_is_weights(train, rollout, 2.0, 1.0)
    with pytest.raises(ValueError, match="target_logp holds NaN"):
        truncated_is_weights(torch.full((1, 2), float("nan")), torch.zeros(1, 2), 0.5, 2.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), low=st.floats(0.0, 1.0), width=st.floats(0.0, 2.0))
def test_truncated_is_weights_exactly_zero_outside_band(seed, low, width):
    g = torch.Generator().manual_seed(seed)
    train = -torch.rand(3, 7, generator=g, dtype=torch.float64) * 3
    rollout = train + torch.randn(3, 7, generator=g, dtype=torch.float64)
    high = low + width
    w = truncated_is_weights(train, rollout, low, high)
    for b in range(3):
        for t in range(7):
            ratio = math.exp(train[b, t].item() - rollout[b, t].item())
            if abs(ratio - low) < 1e-12 or abs(ratio - high) < 1e-12:
                continue
            assert w[b, t].item() == (pytest.approx(ratio, rel=1e-12) if low <= ratio <= high else 0.0)


def reference_mopd_loss(logp, adv, w, mask):
    per_traj = []
    for b in range(len(mask)):
        terms = [w[b][t] * adv[b][t] * logp[b][t] for t in range(len(mask[b])) if mask[b][t]]
        if terms:
            per_traj.append(-sum(terms) / len(terms))
    return sum(per_traj) / len(per_traj)


def test_mopd_loss_hand_case_and_gradient():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-4.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[0.5, -1.0, 9.0], [2.0, 9.0, 9.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0, 0.0, 9.0], [0.5, 9.0, 9.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, metrics = mopd_loss(logp, adv, w, mask)
    # trajectory 0: -(0.5·(-1) + 0)/2 = 0.25; trajectory 1: -(0.5·2·(-4))/1 = 4
    assert loss.item() == pytest.approx((0.25 + 4.0) / 2)
    loss.backward()
    assert logp.grad.tolist() == [[-0.5 / 2 / 2, 0.0, 0.0], [-1.0 / 2, 0.0, 0.0]]
    assert adv.grad is None and w.grad is None
    assert metrics["is_zero_frac"].item() == pytest.approx(1 / 3)
    assert metrics["adv_abs_mean"].item() == pytest.approx((0.5 + 1.0 + 2.0) / 3)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 5), t=st.integers(1, 8))
def test_mopd_loss_matches_eq18_loop(seed, b, t):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 4
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    w = torch.rand(b, t, generator=g, dtype=torch.float64) * (torch.rand(b, t, generator=g) > 0.2)
    mask = torch.arange(t) < torch.randint(1, t + 1, (b, 1), generator=g)
    loss, _ = mopd_loss(logp, adv, w, mask)
    expected = reference_mopd_loss(logp.tolist(), adv.tolist(), w.tolist(), mask.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    halves = [mopd_loss(logp[s], adv[s], w[s], mask[s], loss_normalizer=b)[0]
              for s in (slice(0, b // 2), slice(b // 2, b)) if s.stop > s.start]
    assert sum(h.item() for h in halves) == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_mopd_loss_rejects_nan():
    with pytest.raises(ValueError, match="advantages holds NaN"):
        mopd_loss(torch.zeros(1, 2), torch.tensor([[0.0, float("nan")]]), torch.ones(1, 2), torch.ones(1, 2))


def test_information_gain_scores_eq19():
    adv = torch.tensor([[1.0, -3.0, 100.0], [0.0, -0.5, 0.5], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert information_gain_scores(adv, mask).tolist() == pytest.approx([2.0, 1 / 3, 0.0])


def test_information_gain_filter_hand_cases():
    scores = torch.tensor([1.0, 4.0, 0.0, 3.0, 2.0])  # total 10; sorted 4, 3, 2, 1, 0
    assert information_gain_filter(scores, 0.7).tolist() == [1, 3]  # 7/10 reaches 0.7
    assert information_gain_filter(scores, 0.71).tolist() == [1, 3, 4]
    assert information_gain_filter(scores, 1.0).tolist() == [0, 1, 3, 4]  # a zero score never adds share
    assert information_gain_filter(torch.tensor([2.0, 2.0, 2.0, 2.0]), 0.5).tolist() == [0, 1]  # ties: batch order
    assert information_gain_filter(torch.tensor([1.0, 2.0, 2.0]), 0.4).tolist() == [1]  # 2/5; tie → lower index
    assert information_gain_filter(torch.tensor([1.0, 2.0, 2.0]), 0.5).tolist() == [1, 2]
    assert information_gain_filter(torch.tensor([1.0, 2.0, 2.0]), 0.9).tolist() == [0, 1, 2]
    assert information_gain_filter(torch.zeros(3), 0.8).tolist() == [0, 1, 2]  # all-zero → keep all


@settings(max_examples=40, deadline=None)
@given(scores=st.lists(st.integers(0, 20), min_size=1, max_size=12), rho64=st.integers(1, 64))
def test_information_gain_filter_keeps_minimal_top_prefix(scores, rho64):
    rho = rho64 / 64
    kept = information_gain_filter(torch.tensor(scores, dtype=torch.float32), rho).tolist()
    total = sum(scores)
    if total == 0:
        assert kept == list(range(len(scores)))
        return
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    share = [Fraction(sum(scores[i] for i in order[:m]), total) for m in range(len(scores) + 1)]
    m = next(m for m in range(1, len(scores) + 1) if share[m] >= Fraction(rho))
    assert kept == sorted(order[:m])
    assert Fraction(sum(scores[i] for i in kept), total) >= Fraction(rho)  # share ≥ ρ ...
    assert share[m - 1] < Fraction(rho)  # ... and no smaller set reaches ρ (the top m-1 scores don't)


@pytest.mark.parametrize("scores,rho,match", [
    (torch.ones(3), 0.0, "rho"), (torch.ones(3), 1.5, "rho"), (torch.ones(0), 0.5, "non-empty"),
    (torch.ones(2, 2), 0.5, "1-D"), (torch.tensor([1.0, -1.0]), 0.5, "non-negative"),
    (torch.tensor([1.0, float("nan")]), 0.5, "finite"),
])
def test_information_gain_filter_bad_input(scores, rho, match):
    with pytest.raises(ValueError, match=match):
        information_gain_filter(scores, rho)


def test_route_to_teachers():
    routes = route_to_teachers(["video", "ad", "video", "general", "living"],
                               {"video": "t_video", "ad": "t_ad", "living": "t_live", "general": "qwen3"})
    assert list(routes) == ["t_video", "t_ad", "qwen3", "t_live"]
    assert {k: v.tolist() for k, v in routes.items()} == {"t_video": [0, 2], "t_ad": [1], "qwen3": [3], "t_live": [4]}
    shared = route_to_teachers(["ad", "prod"], {"ad": "t", "prod": "t"})
    assert {k: v.tolist() for k, v in shared.items()} == {"t": [0, 1]}
    with pytest.raises(ValueError, match="'sid'"):
        route_to_teachers(["video", "sid"], {"video": "t_video"})


def test_itemic_penalty_and_truncation():
    scheme = preset("onereason_report", codebook_size=4)
    vocab = ItemicVocab.from_lookup(scheme, {t: 100 + i for i, t in enumerate(scheme.token_strings())})  # 100..116
    ids = torch.tensor([[5, 100, 7, 116], [5, 6, 7, 117]])
    is_itemic = itemic_token_mask(ids, vocab)
    assert is_itemic.tolist() == [[False, True, False, True], [False, False, False, False]]
    sid = preset("openonerec", codebook_size=4)  # end tokens count, wherever the ids are
    scattered = ItemicVocab.from_lookup(sid, {t: 300 - 2 * i for i, t in enumerate(sid.token_strings())})
    assert itemic_token_mask(torch.tensor([[300, 299, 274, 272]]), scattered).tolist() == [[True, False, True, False]]
    teacher = torch.full((2, 4), -0.5)
    penalised, keep = itemic_penalty(teacher, is_itemic)
    assert penalised.tolist() == [[-0.5, -1e9, -0.5, -1e9], [-0.5] * 4]
    assert keep.tolist() == [[True, True, False, False], [True] * 4]
    _, keep_all = itemic_penalty(teacher, is_itemic, truncate=False)
    assert keep_all.all()
    # With OpenOneRec's reward clip the penalty becomes the bounded signal α at the itemic token.
    adv = mopd_advantages(penalised, torch.full((2, 4), -1.0), keep, clip=(-5.0, 5.0))
    assert adv.tolist() == [[0.5, -5.0, 0.0, 0.0], [0.5] * 4]
    with pytest.raises(ValueError, match="token_is_itemic"):
        itemic_penalty(teacher, is_itemic[:, :3])


def test_itemic_penalty_touches_general_prompts_only():
    scheme = preset("onereason_report", codebook_size=4)
    vocab = ItemicVocab.from_lookup(scheme, {t: 100 + i for i, t in enumerate(scheme.token_strings())})
    # Row 0: a general prompt whose rollout cites an item; row 1: a recommendation rollout with the same tokens.
    ids = torch.tensor([[5, 100, 104, 7], [5, 100, 104, 7]])
    teacher = torch.full((2, 4), -0.5)
    penalised, keep = general_itemic_penalty(teacher, itemic_token_mask(ids, vocab), torch.tensor([True, False]))
    assert penalised.tolist() == [[-0.5, -1e9, -1e9, -0.5], [-0.5] * 4]
    assert keep.tolist() == [[True, True, False, False], [True] * 4]
    assert teacher_input_ids(ids, itemic_token_mask(ids, vocab), fill_id=3).tolist() == [[5, 3, 3, 7]] * 2
    with pytest.raises(ValueError, match="is_general"):
        general_itemic_penalty(teacher, itemic_token_mask(ids, vocab), torch.tensor([True]))


def test_plain_qwen3_teacher_loads_and_scores_student_tokens(tokenizers_3x32):
    """OpenOneRec §5.2's teacher: the base Qwen3 (no itemic_tokens.json) scores the extended student's rollouts."""
    import os

    from transformers import AutoTokenizer

    base, extended = tokenizers_3x32["base"], tokenizers_3x32["extended"]
    assert not os.path.exists(os.path.join(base, "itemic_tokens.json"))
    student_tok, teacher_tok = AutoTokenizer.from_pretrained(extended), AutoTokenizer.from_pretrained(base)
    vocab = ItemicVocab.load(extended)
    check_teacher_vocabulary(student_tok.get_vocab(), teacher_tok.get_vocab(), vocab, base)
    teacher = TransformersScorer.from_pretrained(base).model
    text = "hello world " + vocab.scheme.format_item("video", (1, 2, 3)) + " bye"
    ids = torch.tensor([student_tok.encode(text, add_special_tokens=False)])
    is_itemic = itemic_token_mask(ids, vocab)
    assert is_itemic.any() and (ids[is_itemic] >= len(teacher_tok)).all()
    safe = teacher_input_ids(ids, is_itemic, fill_id=teacher_tok.pad_token_id)
    with torch.no_grad():
        logp = torch.log_softmax(teacher(safe).logits[0, :-1].double(), -1).gather(-1, safe[0, 1:, None])[:, 0]
    first = int(is_itemic[0].nonzero()[0])
    # Up to the first itemic token the teacher's scores do not depend on what replaced the itemic ids.
    prefix = torch.tensor([student_tok.encode("hello world ", add_special_tokens=False)])
    assert first == prefix.shape[1]
    with torch.no_grad():
        alone = torch.log_softmax(teacher(prefix).logits[0, :-1].double(), -1).gather(-1, prefix[0, 1:, None])[:, 0]
    assert torch.allclose(logp[: first - 1], alone, atol=1e-10)
    # A teacher from another tokenizer is refused by name.
    shifted = {t: i + 1 for t, i in teacher_tok.get_vocab().items()}
    with pytest.raises(ValueError, match="has id"):
        check_teacher_vocabulary(student_tok.get_vocab(), shifted, vocab, "other")
    smaller = {t: i for t, i in teacher_tok.get_vocab().items() if i != 7}
    with pytest.raises(ValueError, match="lacks the student's non-itemic token"):
        check_teacher_vocabulary(student_tok.get_vocab(), smaller, vocab, "other")
    with pytest.raises(ValueError, match="no config.json"):
        TransformersScorer.from_pretrained(os.path.dirname(base))


def test_general_prompts_load_skip_and_count(tmp_path):
    scheme = preset("onereason_report", codebook_size=4)
    path = tmp_path / "general.jsonl"
    records = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                      {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "Describe " + scheme.format_item("video", (1, 2, 3))}]},
        {"messages": [{"role": "assistant", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    out = load_general_prompts(str(path), scheme)
    assert out.prompts == [records[0]["messages"][:2], records[3]["messages"]]
    assert out.skipped == {"no_user_message": 1, "itemic_tokens": 1}
    path.write_text(json.dumps(records[0]) + "\n" + '{"messages": [{"role": "bot", "content": "x"}]}\n')
    with pytest.raises(ValueError, match=r"general.jsonl:2: 'messages'"):
        load_general_prompts(str(path), scheme)
    path.write_text(json.dumps(records[1]) + "\n")
    with pytest.raises(ValueError, match="no usable general-domain prompt"):
        load_general_prompts(str(path), scheme)
