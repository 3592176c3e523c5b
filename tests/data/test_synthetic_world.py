"""The learnable world (data/synthetic_world.py): the rule, the exact oracle against hand computation and against
Monte Carlo draws of the generator, and the tool's outputs."""
import json
import os
import subprocess
import sys

import pytest

from megatron_onereason.data.synthetic_world import World, WorldConfig, WorldItem, sft_records
from megatron_onereason.eval.benchmark import BenchmarkUser

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny(follow_prob=0.5, popularity_skew=0.0, popularity_seed=0):
    """Two video interests (3 and 4 items) and one product interest (2 items); codes shuffled against ids so the
    sequence order (by codes) is not the id order."""
    items = [
        WorldItem("video_a0", "video", "video about cooking and travel", (0, 2, 0), 0),
        WorldItem("video_a1", "video", "video about cooking and travel", (0, 0, 0), 0),
        WorldItem("video_a2", "video", "video about cooking and travel", (0, 1, 0), 0),
        WorldItem("video_b0", "video", "video about cars and pets", (1, 0, 1), 1),
        WorldItem("video_b1", "video", "video about cars and pets", (1, 0, 0), 1),
        WorldItem("video_b2", "video", "video about cars and pets", (1, 3, 0), 1),
        WorldItem("video_b3", "video", "video about cars and pets", (1, 2, 0), 1),
        WorldItem("prod_c0", "prod", "product about tea and books", (0, 0, 0), 2),
        WorldItem("prod_c1", "prod", "product about tea and books", (0, 1, 0), 2),
    ]
    return World(items, WorldConfig(target_domains=("video",), follow_prob=follow_prob, interests=(1, 3),
                                    history_length=(3, 6), dominant_share=0.6,
                                    popularity_skew=popularity_skew, popularity_seed=popularity_seed))


def test_sequences_follow_codes_and_wrap():
    world = _tiny()
    assert [i.item_id for i in world.sequences[0]] == ["video_a1", "video_a2", "video_a0"]
    assert [i.item_id for i in world.sequences[1]] == ["video_b1", "video_b0", "video_b3", "video_b2"]
    assert world.successor("video_a2").item_id == "video_a0"
    assert world.successor("video_a0").item_id == "video_a1"  # wraps around


def test_distribution_and_oracle_by_hand():
    world = _tiny(follow_prob=0.5)
    # Interest 1 is the majority of the video history (2 vs 1); its latest item is video_b0 -> successor video_b3.
    history = ("video_b1", "prod_c0", "video_a1", "video_b0", "prod_c1")
    probs = world.next_item_distribution(history, "video")
    assert probs == pytest.approx({"video_b1": 0.125, "video_b0": 0.125, "video_b3": 0.625, "video_b2": 0.125})
    user = BenchmarkUser("u", "p", history, {"video": ("video_b2",)})
    # Bayes-optimal: video_b3 first, then the other three at 1/8 each; beyond the interest nothing.
    assert world.oracle_recall([user], [1, 2, 4, 7]) == pytest.approx({1: 0.625, 2: 0.75, 4: 1.0, 7: 1.0})
    assert world.random_recall([user], [1, 2, 7, 9]) == pytest.approx({1: 1 / 7, 2: 2 / 7, 7: 1.0, 9: 1.0})
    with pytest.raises(ValueError, match="no majority interest"):
        world.next_item_distribution(("video_a1", "video_b1"), "video")  # a tie is not a user of this world


def test_popularity_is_zipf_inside_each_interest_by_hand():
    world = _tiny(follow_prob=0.5, popularity_skew=1.0, popularity_seed=7)
    # Ranks 1..4 of interest 1 weigh 1, 1/2, 1/3, 1/4 over their sum 25/12; 1..3 of interest 0: 1, 1/2, 1/3 over 11/6.
    b = sorted((world.popularity[f"video_b{n}"] for n in range(4)), reverse=True)
    a = sorted((world.popularity[f"video_a{n}"] for n in range(3)), reverse=True)
    assert b == pytest.approx([12 / 25, 6 / 25, 4 / 25, 3 / 25]) and a == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    rankings = {tuple(sorted(range(4), key=lambda n: -_tiny(popularity_skew=1.0, popularity_seed=s)
                             .popularity[f"video_b{n}"])) for s in range(12)}
    assert len(rankings) > 1  # the ranking is the seed's, not the code order
    history = ("video_b1", "prod_c0", "video_a1", "video_b0", "prod_c1")  # successor video_b3, as above
    probs = world.next_item_distribution(history, "video")
    pop = world.popularity
    expected = {f"video_b{n}": 0.5 * pop[f"video_b{n}"] + 0.5 * (n == 3) for n in range(4)}
    assert probs == pytest.approx(expected) and sum(probs.values()) == pytest.approx(1.0)
    top = sorted(expected.values(), reverse=True)
    user = BenchmarkUser("u", "p", history, {"video": ("video_b2",)})
    assert world.oracle_recall([user], [1, 2]) == pytest.approx({1: top[0], 2: top[0] + top[1]})
    no_follow = _tiny(follow_prob=0.0, popularity_skew=1.0, popularity_seed=7)
    assert no_follow.oracle_recall([user], [1])[1] == pytest.approx(12 / 25)  # the most popular item of interest 1


@pytest.mark.parametrize("follow_prob,popularity_skew", [(0.7, 0.0), (0.3, 1.5), (0.0, 1.0)])
def test_generator_matches_the_oracle_by_monte_carlo(follow_prob, popularity_skew):
    """Targets drawn by the generator hit the Bayes-optimal top-K as often as the exact oracle says (4 sigma)."""
    world = _tiny(follow_prob=follow_prob, popularity_skew=popularity_skew, popularity_seed=3)
    users = world.draw_users(4000, seed=5)
    for u in users:
        assert world.dominant_interest(u.history, "video") is not None
        assert set(u.targets) == {"video"} and len(u.targets["video"]) == 1
    for k in (1, 2, 3):
        exact = world.oracle_recall(users, [k])[k]
        hits = 0
        for u in users:
            probs = world.next_item_distribution(u.history, "video")
            top = sorted(probs, key=lambda i: (-probs[i], i))[:k]
            hits += u.targets["video"][0] in top
        sigma = (exact * (1 - exact) / len(users)) ** 0.5
        assert abs(hits / len(users) - exact) < 4 * sigma + 1e-9, (k, hits / len(users), exact)


def test_users_are_deterministic_and_cot_names_the_answer_path():
    world = _tiny()
    a, b = world.draw_users(20, seed=3), world.draw_users(20, seed=3)
    assert a == b and a != world.draw_users(20, seed=4)
    record = sft_records(world, a[:1])[0]
    user = a[0]
    dominant = world.dominant_interest(user.history, "video")
    latest = [i for i in user.history if world.items[i].interest == dominant][-1]
    codes = world.items[latest].codes
    assert f"<a_{codes[0]}><b_{codes[1]}><c_{codes[2]}>" in record["messages"][1]["reasoning"]
    # Without the sequence rule the CoT names the interest only: the latest item plays no part in the answer.
    popular = _tiny(follow_prob=0.0, popularity_skew=1.0)
    reasoning = sft_records(popular, a[:1])[0]["messages"][1]["reasoning"]
    assert reasoning == f"Interest <a_{codes[0]}> ({'cars' if dominant == 1 else 'cooking'})."


def test_config_errors_are_one_line():
    with pytest.raises(ValueError, match="follow_prob"):
        WorldConfig(follow_prob=1.5)
    with pytest.raises(ValueError, match="popularity_skew"):
        WorldConfig(popularity_skew=-1.0)
    with pytest.raises(ValueError, match="target domains"):
        World(_tiny().items.values(), WorldConfig(target_domains=("ad",)))


def test_tool_writes_the_world(tmp_path):
    out = tmp_path / "world"
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_synthetic_world.py"), "--out", str(out),
                          "--seed", "1", "--items-per-domain", "48", "--clusters-per-domain", "4",
                          "--samples-per-task", "3", "--train-users", "10", "--eval-users", "6", "--sft-users", "8",
                          "--pretrain-users", "4", "--target-domains", "video"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert run.returncode == 0, run.stderr
    from megatron_onereason.eval.benchmark import load_benchmark
    from megatron_onereason.tokenizer.item_catalog import ItemCatalog

    catalog = ItemCatalog.load(str(out / "itemic"))
    train = load_benchmark(str(out / "rl_train.jsonl"), catalog)
    held_out = load_benchmark(str(out / "rl_eval.jsonl"), catalog)
    assert len(train) == 10 and len(held_out) == 6
    assert not {u.user_id for u in train} & {u.user_id for u in held_out}
    oracle = json.loads((out / "oracle.json").read_text())["held_out"]
    for k in ("1", "8", "32"):
        assert oracle["random_recall"][k] == pytest.approx(min(int(k), 48) / 48)
        assert oracle["random_recall"][k] < oracle["oracle_recall"][k] <= 1.0 + 1e-12
    sft = [json.loads(line) for line in (out / "corpus" / "sft_chat.jsonl").read_text().splitlines()]
    assert sum(r["source"] == "world_recommend_think" for r in sft) == 8
    assert not any(r["source"] == "sft_recommend_think" for r in sft)  # random-target samples replaced
    rerun = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_synthetic_world.py"), "--out",
                            str(out), "--seed", "1"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert rerun.returncode == 1 and "already exists" in rerun.stderr and len(rerun.stderr.strip().splitlines()) == 1


def test_sft_answers_of_an_interest_demonstrator_are_uniform_in_the_dominant_interest():
    """``answers="interest"``: every answer lies in the user's dominant interest and is uniform there (not the
    popularity the targets follow): 4-sigma binomial bounds on 3000 samples; the targets' own frequencies differ."""
    world = _tiny(follow_prob=0.0, popularity_skew=2.0, popularity_seed=1)
    users = [u for u in world.draw_users(3000, seed=9) if world.dominant_interest(u.history, "video") == 1]
    codes = {f"<a_{i.codes[0]}><b_{i.codes[1]}><c_{i.codes[2]}>": i.item_id for i in world.sequences[1]}
    answers = [codes[r["messages"][1]["content"][-len("<a_0><b_0><c_0>"):]]
               for r in sft_records(world, users, answers="interest", seed=4)]
    n = len(answers)
    for item_id in codes.values():
        sigma = (0.25 * 0.75 / n) ** 0.5
        assert abs(answers.count(item_id) / n - 0.25) < 4 * sigma, item_id
    top = max(codes.values(), key=world.popularity.get)
    assert world.popularity[top] == pytest.approx(1 / (1 + 1 / 4 + 1 / 9 + 1 / 16))  # skew 2: 144/205
    targets = [u.targets["video"][0] for u in users]
    assert targets.count(top) / n > 0.6  # the users' targets follow the popularity
    assert sft_records(world, users[:5]) != sft_records(world, users[:5], answers="interest")
    with pytest.raises(ValueError, match="answers"):
        sft_records(world, users[:1], answers="popular")
