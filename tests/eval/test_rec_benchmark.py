"""Benchmark JSONL: synthetic users are consistent, files round-trip, bad lines are reported with file:line."""
import json

import numpy as np
import pytest

from megatron_onereason.data.synthetic_catalog import make_synthetic_catalog
from megatron_onereason.eval.benchmark import (
    BenchmarkUser,
    SyntheticBenchmarkConfig,
    load_benchmark,
    make_synthetic_benchmark,
    rec_instances,
    rec_messages,
    task_instances,
    task_messages,
    write_benchmark,
)
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.itemic_tokens import DEFAULT_SCHEME, preset


@pytest.fixture(scope="module")
def catalogs():
    synthetic = make_synthetic_catalog(items_per_domain=20, domains=("video", "prod"), seed=1)
    i = np.arange(len(synthetic.item_ids))
    codes = np.stack([i % 4, i // 4 % 8, i // 32], axis=1)  # unique; only 4 first codes, so clusters span domains
    return synthetic, ItemCatalog(synthetic.item_ids, synthetic.domains, codes, 8)


def test_synthetic_users_hold_out_their_targets(catalogs):
    synthetic, catalog = catalogs
    config = SyntheticBenchmarkConfig(num_users=30, history_length=(4, 8), seed=3)
    users = make_synthetic_benchmark(synthetic, catalog, config)
    assert len(users) == 30 and len({u.user_id for u in users}) == 30
    for user in users:
        assert 4 <= len(user.history) <= 8 and user.targets
        first_codes = {catalog.codes_for(i)[0] for i in user.history}
        for domain, items in user.targets.items():
            assert 1 <= len(items) <= 3 and len(set(items)) == len(items)
            for item in items:
                assert catalog.domain_for(item) == domain and item not in user.history
        assert len(first_codes) <= 3  # one to three interest clusters
    assert make_synthetic_benchmark(synthetic, catalog, config) == users  # deterministic
    assert make_synthetic_benchmark(synthetic, catalog, SyntheticBenchmarkConfig(num_users=30, seed=4)) != users


def test_round_trip_and_prompt(catalogs, tmp_path):
    synthetic, catalog = catalogs
    users = make_synthetic_benchmark(synthetic, catalog, SyntheticBenchmarkConfig(num_users=5, seed=0))
    path = str(tmp_path / "bench.jsonl")
    write_benchmark(path, users)
    assert load_benchmark(path, catalog) == users
    instance = rec_instances(users)[0]
    content = rec_messages(instance, catalog, DEFAULT_SCHEME)[0]["content"]
    patterns = ["<|%s_begin|><a_%d><b_%d><c_%d>" % ((catalog.domain_for(i),) + catalog.codes_for(i))
                for i in instance.user.history]
    assert ", ".join(patterns) in content
    sid = rec_messages(instance, catalog, preset("openonerec"))[0]["content"]  # the model's scheme writes the items
    assert ", ".join("<|sid_begin|><s_a_%d><s_b_%d><s_c_%d><|sid_end|>" % catalog.codes_for(i)
                     for i in instance.user.history) in sid
    assert content.startswith(instance.user.portrait) and ", ".join(patterns) in content
    noun = {"video": "video", "prod": "product"}[instance.domain]
    assert content.endswith(f"Recommend the next {noun}.")


@pytest.mark.parametrize("line, message", [
    ("{not json", "Expecting property name"),
    ('{"user_id": "u", "portrait": "p", "history": []}', "missing field"),
    ('{"user_id": "u", "portrait": "p", "history": ["nope"], "targets": {"video": ["video_000001"]}}',
     "item id 'nope' is not in the catalog"),
    ('{"user_id": "u", "portrait": "p", "history": [], "targets": {"video": ["prod_000001"]}}',
     "of domain 'prod'"),
    ('{"user_id": "u", "portrait": "p", "history": [], "targets": {"video": []}}', "non-empty list"),
    ('{"user_id": "u000000", "portrait": "p", "history": [], "targets": {"video": ["video_000001"]}}',
     "duplicate user_id"),
    ('{"user_id": "u", "portrait": "p", "history": ["video_000001"], "targets": {"video": ["video_000002"]}, '
     '"evolution": [{"topic": "t", "actions": ["video_000003"]}]}', "not in the user's history"),
    ('{"user_id": "u", "portrait": "p", "history": ["video_000001"], "targets": {"video": ["video_000002"]}, '
     '"evolution": [{"topic": "", "actions": ["video_000001"]}]}', "non-empty string 'topic'"),
])
def test_bad_lines_name_file_and_line(catalogs, tmp_path, line, message):
    _, catalog = catalogs
    good = BenchmarkUser("u000000", "p", ("video_000002",), {"video": ("video_000003",)})
    path = tmp_path / "bad.jsonl"
    path.write_text(good.to_json() + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:3: .*{message}"):
        load_benchmark(str(path), catalog)
    assert json.loads(good.to_json())["targets"] == {"video": ["video_000003"]}


def test_mix_rl_tasks_r2_evolution_and_r3_recommendation(catalogs, tmp_path):
    """Mix-RL (§6.2) draws R2 evolution and R3 recommendation instances from one benchmark file."""
    synthetic, catalog = catalogs
    config = SyntheticBenchmarkConfig(num_users=6, seed=2, evolution=True)
    users = make_synthetic_benchmark(synthetic, catalog, config)
    plain = make_synthetic_benchmark(synthetic, catalog, SyntheticBenchmarkConfig(num_users=6, seed=2))
    assert [(u.history, u.targets) for u in users] == [(u.history, u.targets) for u in plain]  # same users
    captions = dict(zip(synthetic.item_ids, synthetic.captions))
    for user in users:
        clusters = {catalog.codes_for(i)[0] for i in user.history}
        assert 1 <= len(user.evolution) <= len(clusters)
        for task in user.evolution:  # the actions of topic t: exactly the history items whose caption names t
            named = [i for i in dict.fromkeys(user.history) if task.topic in captions[i].split(" about ", 1)[1]]
            assert list(task.actions) == named and named
    path = str(tmp_path / "mix.jsonl")
    write_benchmark(path, users)
    loaded = load_benchmark(path, catalog)
    assert loaded == users
    mix = task_instances(loaded, ("rec", "evolution"))
    assert len(mix) == sum(len(u.targets) + len(u.evolution) for u in users)
    assert task_instances(loaded, ("rec",)) == rec_instances(loaded)
    evolution = [i for i in mix if i.task == "evolution"]
    assert evolution and all(i.domain is None and i.targets == i.actions for i in evolution)
    content = task_messages(evolution[0], catalog, DEFAULT_SCHEME)[0]["content"]
    assert f"interest in {evolution[0].topic}" in content and content.startswith(evolution[0].user.portrait)
    rec = next(i for i in mix if i.task == "rec")
    assert task_messages(rec, catalog, DEFAULT_SCHEME) == rec_messages(rec, catalog, DEFAULT_SCHEME)
    only_video = task_instances(loaded, ("rec", "evolution"), domains=["video"])
    assert {i.domain for i in only_video if i.task == "rec"} == {"video"} and len(only_video) < len(mix)
    with pytest.raises(ValueError, match="unknown task"):
        task_instances(loaded, ("rec", "r4"))
    assert "evolution" not in json.loads(plain[0].to_json())  # files without R2 tasks are unchanged
