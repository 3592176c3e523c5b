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


def _tiny(follow_prob=0.5):
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
                                    history_length=(3, 6), dominant_share=0.6))


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


def test_generator_matches_the_oracle_by_monte_carlo():
    """Targets drawn by the generator hit the Bayes-optimal top-K as often as the exact oracle says (4 sigma)."""
    world = _tiny(follow_prob=0.7)
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


def test_config_errors_are_one_line():
    with pytest.raises(ValueError, match="follow_prob"):
        WorldConfig(follow_prob=1.5)
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
