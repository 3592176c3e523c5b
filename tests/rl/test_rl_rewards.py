"""Rewards: eq. 7 (two-stage), eq. 8 (rule), eq. 9 (diversity), OneRec-Think eq. 6 (Rollout-Beam)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from megatron_onereason.rl.rewards import diversity_factor, rollout_beam_reward, rule_reward, two_stage_rewards


def test_rule_reward_hand_case_ragged_targets():
    pred = torch.tensor([
        [[1, 2, 3], [1, 2, 4], [9, 9, 9]],  # user 0
        [[1, 2, 3], [5, 5, 5], [-1, -1, -1]],  # user 1 (last one failed to decode)
    ])
    targets = [torch.tensor([[1, 2, 3], [9, 9, 9]]), [[5, 5, 5]]]
    assert rule_reward(pred, targets).tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    assert rule_reward(pred, [[], [[1, 2, 4]]]).tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_rule_reward_item_ids_are_one_level_codes():
    pred = torch.tensor([[[5], [7]], [[5], [8]]])
    assert rule_reward(pred, [torch.tensor([5, 9]), torch.tensor([8])]).tolist() == [[1.0, 0.0], [0.0, 1.0]]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), users=st.integers(1, 4), preds=st.integers(1, 6), levels=st.integers(1, 3))
def test_rule_reward_matches_set_membership_loop(seed, users, preds, levels):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(-1, 3, (users, preds, levels), generator=g)
    targets = [torch.randint(0, 3, (int(torch.randint(0, 4, (1,), generator=g)), levels), generator=g)
               for _ in range(users)]
    got = rule_reward(pred, targets)
    for u in range(users):
        target_set = {tuple(row) for row in targets[u].tolist()}
        for m in range(preds):
            assert got[u, m].item() == float(tuple(pred[u, m].tolist()) in target_set)


@pytest.mark.parametrize("pred,targets,match", [
    (torch.zeros(2, 3, 3, dtype=torch.long), [[[0, 0, 0]]], "users"),
    (torch.zeros(1, 3, 3, dtype=torch.long), [[[0, 0]]], r"\[n, 3\]"),
    (torch.zeros(1, 3, 3, dtype=torch.long), [[[0, -1, 0]]], "negative"),
    (torch.zeros(1, 3, 3), [[[0, 0, 0]]], "integer"),
    (torch.zeros(1, 3, 3, dtype=torch.long), [[[0.5, 0, 0]]], "integer"),
])
def test_rule_reward_bad_input(pred, targets, match):
    with pytest.raises(ValueError, match=match):
        rule_reward(pred, targets)


def test_diversity_factor_hand_cases():
    first = torch.tensor([[1, 1, 1, 1], [1, 2, 1, 3], [0, 1, 2, 3], [-1, -1, 2, 2], [-1, -2, 2, 3]])
    expected = [0.0, 2 / 3, 1.0, 0.0, 1 / 3]
    assert diversity_factor(first).tolist() == pytest.approx(expected, abs=1e-7)
    assert diversity_factor(torch.tensor([[4], [5]])).tolist() == [0.0, 0.0]  # K = 1 → 0 by definition


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 5), k=st.integers(2, 8))
def test_diversity_factor_matches_eq9_loop(seed, n, k):
    first = torch.randint(-1, 5, (n, k), generator=torch.Generator().manual_seed(seed))
    got = diversity_factor(first)
    for i in range(n):
        m = len({c for c in first[i].tolist() if c >= 0})
        assert got[i].item() == pytest.approx(max(0, m - 1) / (k - 1), abs=1e-7)


def test_diversity_factor_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        diversity_factor(torch.zeros(2, 2, 2, dtype=torch.long))


def test_rollout_beam_reward_prefix_vs_position():
    target = [[[1, 2, 3]]]
    beam = torch.tensor([[[[1, 2, 9], [1, 5, 3], [7, 2, 3]]]])  # [U=1, N=1, K=3, L=3]
    assert rollout_beam_reward(beam, target, "prefix").tolist() == [[2.0]]
    assert rollout_beam_reward(beam, target, "position").tolist() == [[2.0]]
    beam = torch.tensor([[[[1, 5, 3], [7, 2, 3]]]])
    assert rollout_beam_reward(beam, target, "prefix").tolist() == [[1.0]]
    assert rollout_beam_reward(beam, target, "position").tolist() == [[2.0]]
    # The max also runs over several targets; an empty target set gives 0.
    assert rollout_beam_reward(beam, [[[1, 2, 3], [7, 2, 0]]], "prefix").tolist() == [[2.0]]
    assert rollout_beam_reward(beam, [[]], "position").tolist() == [[0.0]]
    with pytest.raises(ValueError, match="match"):
        rollout_beam_reward(beam, target, "suffix")


def test_two_stage_rewards_hand_case():
    pred = torch.tensor([[  # U=1, N=2, K=3, L=3
        [[1, 2, 3], [4, 5, 6], [1, 2, 3]],  # hits 1,0,1; first codes {1, 4}: m=2 → R_div = 1/2
        [[1, 2, 3], [1, 0, 0], [1, 9, 9]],  # hits 1,0,0; first codes {1}: m=1 → R_div = 0
    ]])
    out = two_stage_rewards(pred, [[[1, 2, 3]]])
    assert out.reward.tolist() == [[[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]]]
    assert out.hit.tolist() == [[[True, False, True], [True, False, False]]]
    assert out.diversity.tolist() == [[0.5, 0.0]]
    plain = two_stage_rewards(pred, [[[1, 2, 3]]], diversity=False)
    assert plain.reward.tolist() == [[[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]]
    # Rollout-Beam: trace 0's beam fully matches (3 codes) → 3 × 1/2 for each of its completions.
    beam = two_stage_rewards(pred, [[[1, 2, 3]]], accuracy="beam-prefix")
    assert beam.reward.tolist() == [[[1.5, 1.5, 1.5], [0.0, 0.0, 0.0]]]
    assert beam.hit.tolist() == out.hit.tolist()
    # Per-completion prefix: leading codes each completion shares with the target, by hand (no diversity).
    prefix = two_stage_rewards(pred, [[[1, 2, 3], [4, 9, 9]]], accuracy="prefix", diversity=False)
    assert prefix.reward.tolist() == [[[3.0, 1.0, 3.0], [3.0, 1.0, 1.0]]]  # [4,5,6] vs target [4,9,9]: 1 code
    with pytest.raises(ValueError, match="accuracy"):
        two_stage_rewards(pred, [[[1, 2, 3]]], accuracy="ndcg")
    with pytest.raises(ValueError, match=r"\[U, N, K, L\]"):
        two_stage_rewards(pred[0], [[[1, 2, 3]]])


@pytest.fixture(scope="module")
def tiny(tiny_recommender):
    from megatron_onereason.generation.hf_backend import TransformersBackend
    from megatron_onereason.tokenizer.item_catalog import ItemCatalog

    rec = tiny_recommender
    return TransformersBackend.from_pretrained(rec.model_dir, rec.catalog_dir), ItemCatalog.load(rec.catalog_dir)


def test_rollout_beam_reward_on_a_real_beam_equals_a_hand_computation(tiny):
    """OneRec-Think eqs. 6–7: beam search of width K after each trace, reward = best code agreement in the beam."""
    from megatron_onereason.generation.params import GenerationParams, Prompt
    from megatron_onereason.generation.prompts import chat_prompt_ids
    from megatron_onereason.rl.rollout_batch import predicted_codes

    backend, catalog = tiny
    k = 3
    prompt = Prompt(chat_prompt_ids(backend.tokenizer, [{"role": "user", "content": "Next video?"}], True), "video")
    params = GenerationParams(num_traces=3, num_items=k, item_strategy="beam", temperature=1.0, max_think_tokens=6,
                              seed=5)
    (out,) = backend.generate([prompt], params)
    # A real beam: K distinct catalog items per trace, best first by log p(item | prompt, trace).
    for trace in out.traces:
        scores = [c.log_prob for c in trace.completions]
        assert len({c.codes for c in trace.completions}) == k and scores == sorted(scores, reverse=True)
    # Targets: an item sharing only the first code with trace 0's best beam item, and one elsewhere in the catalog.
    best = out.traces[0].completions[0].codes
    videos = [tuple(int(x) for x in c) for d, c in zip(catalog.domains, catalog.codes) if d == "video"]
    near = next((c for c in videos if c[0] == best[0] and c[1] != best[1]), videos[-1])
    targets = [near, videos[len(videos) // 2]]

    def by_hand(prefix_only):
        rewards = []
        for trace in out.traces:
            best_match = 0
            for completion in trace.completions:
                for target in targets:
                    matches = 0
                    for predicted, wanted in zip(completion.codes, target):
                        if predicted == wanted:
                            matches += 1
                        elif prefix_only:
                            break
                    best_match = max(best_match, matches)
            rewards.append(float(best_match))
        return rewards

    codes = predicted_codes([out], catalog)
    target_codes = [torch.tensor(targets)]
    eq6 = two_stage_rewards(codes, target_codes, diversity=False, accuracy="rollout-beam")
    prefix = two_stage_rewards(codes, target_codes, diversity=False, accuracy="beam-prefix")
    assert eq6.reward[0, :, 0].tolist() == by_hand(prefix_only=False)
    assert prefix.reward[0, :, 0].tolist() == by_hand(prefix_only=True)
    assert (eq6.reward == eq6.reward[..., :1]).all()  # shared by the K completions of a trace
    assert eq6.reward[0, 0, 0].item() >= 1.0  # trace 0's best item shares the first code with a target
