"""RFT data selection (eq. 14)."""
import pytest
import torch

from megatron_onereason.rl.rft import DROP_REASONS, RFTFilters, select_rft_trajectories
from megatron_onereason.tokenizer.itemic_tokens import DEFAULT_SCHEME, preset

SCHEME = DEFAULT_SCHEME
format_item = SCHEME.format_item

HIST = format_item("video", (1, 2, 3))
GOOD = format_item("video", (4, 5, 6))
OTHER = format_item("prod", (7, 8, 9))


def think(cot, answer):
    return f"<think>\n{cot}\n</think>\n\n{answer}"


def test_selection_by_reason():
    samples = [
        dict(user_id="u1", teacher="video", response=think(f"liked {HIST}", GOOD)),  # kept
        dict(user_id="u1", teacher="video", response=think("x", OTHER)),  # miss
        dict(user_id="u1", teacher="prod", response=think("x", "<|prod_begin|><a_1><c_2>")),  # malformed pattern
        dict(user_id="u2", teacher="prod", response=f"<think>\nnever closed {GOOD}"),  # malformed: unclosed think
        dict(user_id="u2", teacher="prod", response=think(f"liked {GOOD}", "no item here")),  # malformed: no answer
        dict(user_id="u2", teacher="ad", response=think("x", format_item("ad", (0, 0, 0)))),  # illegal item
        dict(user_id="u1", teacher="ad", response=think(f"liked {HIST}", GOOD)),  # duplicate of sample 0
        dict(user_id="u1", teacher="prod", response=think("y", GOOD)),  # kept (2nd for u1)
        dict(user_id="u1", teacher="prod", response=think("z", OTHER)),  # over the cap of 2 for u1
        dict(user_id="u3", teacher="prod", response=OTHER),  # kept: non-thinking answer
    ]
    hit = [True, False, True, True, True, True, True, True, True, True]
    legal = [("video", (1, 2, 3)), ("video", (4, 5, 6)), ("prod", [7, 8, 9])]
    out = select_rft_trajectories(samples, torch.tensor(hit), legal_items=legal, scheme=SCHEME,
                                  filters=RFTFilters(max_per_user=2, drop_force_closed=False,
                                                     require_history_grounding=False))
    assert out.kept == [samples[0], samples[7], samples[9]]
    assert out.dropped == dict.fromkeys(DROP_REASONS, 0) | {"miss": 1, "malformed": 3, "illegal": 1, "duplicate": 1,
                                                            "over_cap": 1}


def test_defaults_keep_every_wellformed_hit_and_duplicates_without_dedupe():
    samples = [dict(user_id=1, response=GOOD, teacher="a"), dict(user_id=1, response=GOOD, teacher="b"),
               dict(user_id=2, response=GOOD)]
    assert len(select_rft_trajectories(samples, [True] * 3, scheme=SCHEME).kept) == 2
    assert select_rft_trajectories(samples, [True] * 3, dedupe=False, scheme=SCHEME).kept == samples
    # Without a legal set any well-formed item is accepted.
    assert select_rft_trajectories([dict(user_id=1, response=format_item("ad", (9, 9, 9)))], [True],
                                   scheme=SCHEME).kept


def test_levels_follow_the_vocabulary():
    two_level = "<|sid_begin|><a_1><b_2>"
    assert select_rft_trajectories([dict(user_id=1, response=two_level)], [True],
                                   scheme=preset("onereason_report", levels=2)).dropped["malformed"] == 0
    assert select_rft_trajectories([dict(user_id=1, response=two_level)], [True],
                                   scheme=SCHEME).dropped["malformed"] == 1


def test_openonerec_items_are_legal_by_their_codes():
    """A shared begin token names no domain: legality is decided by the catalog's code tuples."""
    sid = preset("openonerec")
    good = think("because", sid.format_item(None, (4, 5, 6)))
    samples = [dict(user_id=1, response=good), dict(user_id=2, response=think("x", sid.format_item(None, (0, 0, 0)))),
               dict(user_id=3, response=good[:-len("<|sid_end|>")])]  # no end token: malformed
    out = select_rft_trajectories(samples, [True] * 3, legal_items=[("video", (4, 5, 6))], scheme=sid)
    assert out.kept == samples[:1] and (out.dropped["illegal"], out.dropped["malformed"]) == (1, 1)


def test_bad_input():
    with pytest.raises(ValueError, match="hit has 1"):
        select_rft_trajectories([dict(user_id=1, response=GOOD)] * 2, [True], scheme=SCHEME)
    with pytest.raises(ValueError, match=r"samples\[0\] needs"):
        select_rft_trajectories([dict(response=GOOD)], [True], scheme=SCHEME)
    with pytest.raises(ValueError, match="max_per_user"):
        select_rft_trajectories([], [], filters=RFTFilters(max_per_user=0), scheme=SCHEME)
    with pytest.raises(ValueError, match=r"samples\[0\] needs 'closed_by_model' for the rft.drop_force_closed"):
        select_rft_trajectories([dict(user_id=1, response=think("x", GOOD))], [True], filters=RFTFilters(),
                                scheme=SCHEME)


def test_reasoning_filters_by_reason():
    """§6.2's filters: force-closed CoTs, empty reasoning, length bounds, CoTs citing items outside the history."""
    hist = [("video", (1, 2, 3)), ("prod", (7, 8, 9))]
    base = dict(closed_by_model=True, reasoning_tokens=5, history=hist)
    samples = [
        dict(base, user_id="u1", response=think(f"liked {HIST} and {OTHER}", GOOD)),  # kept: cites history only
        dict(base, user_id="u1", response=think("cut mid-", GOOD), closed_by_model=False),  # force_closed
        dict(base, user_id="u2", response=think("  ", GOOD), reasoning_tokens=1),  # empty_reasoning
        dict(base, user_id="u2", response=think("hm", GOOD), reasoning_tokens=1),  # too_short
        dict(base, user_id="u2", response=think("long " * 40, GOOD), reasoning_tokens=40),  # too_long
        dict(base, user_id="u3", response=think(f"liked {GOOD}", GOOD)),  # ungrounded: GOOD is not in the history
        dict(base, user_id="u3", response=GOOD),  # kept: a non-thinking answer has no reasoning to filter
        dict(user_id="u4", response=think(f"liked {HIST}", OTHER), closed_by_model=False, reasoning_tokens=1,
             history=[]),  # a miss counts as a miss whatever else is wrong
    ]
    hit = [True] * 7 + [False]
    out = select_rft_trajectories(samples, hit, filters=RFTFilters(min_reasoning_tokens=2, max_reasoning_tokens=30),
                                  scheme=SCHEME)
    assert out.kept == [samples[0], samples[6]]
    assert out.dropped == dict.fromkeys(DROP_REASONS, 0) | {"miss": 1, "force_closed": 1, "empty_reasoning": 1,
                                                            "too_short": 1, "too_long": 1, "ungrounded": 1}
    # Each filter can be turned off.
    off = RFTFilters(drop_force_closed=False, drop_empty_reasoning=False, require_history_grounding=False)
    assert len(select_rft_trajectories(samples, hit, filters=off, scheme=SCHEME).kept) == 7
