"""RL prompts from users' files (rl/data.py): RecIF-Bench task files, verl-style parquet, the synthetic benchmark."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from megatron_onereason.eval.benchmark import BenchmarkUser, task_instances, task_messages, write_benchmark
from megatron_onereason.generation.prompts import chat_prompt_ids
from megatron_onereason.rl.data import PromptRenderer, detect_format, load_prompts
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab

SYSTEM_ZH = "你是一名推荐助手，请根据用户的历史行为推荐下一个视频。"


@pytest.fixture(scope="module")
def setup(tiny_recommender):
    tokenizer = AutoTokenizer.from_pretrained(tiny_recommender.model_dir)
    scheme = ItemicVocab.load(tiny_recommender.model_dir).scheme
    catalog = ItemCatalog.load(tiny_recommender.catalog_dir)
    return tokenizer, scheme, catalog


def renderer(setup, thinking=True, budget=4096):
    tokenizer, scheme, _ = setup
    return PromptRenderer(tokenizer, scheme, thinking, budget)


def item_text(catalog, scheme, row):
    return scheme.format_item(catalog.domains[row], catalog.codes[row])


def recif_rows(catalog, scheme, n=3):
    rows = []
    for r in range(n):
        history = "".join(item_text(catalog, scheme, r + j) for j in range(2 + r))  # lengths differ by row
        user = [{"type": "text", "text": "用户历史："}, {"type": "text", "text": history}]  # content as text parts
        messages = [{"role": "system", "content": SYSTEM_ZH}, {"role": "user", "content": user}]
        answer = item_text(catalog, scheme, 10 + r) + item_text(catalog, scheme, 11 + r)
        rows.append({"messages": json.dumps(messages, ensure_ascii=False),  # a JSON string, as RecIF-Bench ships
                     "metadata": json.dumps({"answer": answer, "uid": f"u{r}"})})
    return rows


def test_recif_parquet_renders_the_soft_switch_prompt_and_reads_items_as_catalog_ids(setup, tmp_path):
    tokenizer, scheme, catalog = setup
    path = str(tmp_path / "video_train.parquet")
    pq.write_table(pa.Table.from_pylist(recif_rows(catalog, scheme)), path)
    assert detect_format(path) == "recif"
    for thinking in (True, False):
        got = load_prompts(path, catalog, renderer(setup, thinking), skip_invalid=False)
        assert got.format == "recif" and len(got.prompts) == 3 and got.too_long == 0
        p = got.prompts[1]
        assert p.source == f"{path}: row 1" and p.user_id == "u1"
        assert p.targets == (catalog.item_ids[11], catalog.item_ids[12]) and p.domain == catalog.domains[11]
        # Oracle: the chat template applied by hand to the turns with OpenOneRec's switch on the last user turn.
        history = "".join(item_text(catalog, scheme, 1 + j) for j in range(3))
        by_hand = tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM_ZH},
             {"role": "user", "content": "用户历史：" + history + ("/think" if thinking else "/no_think")}],
            tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
        assert list(p.prompt.token_ids) == tokenizer.encode(by_hand, add_special_tokens=False)
        assert SYSTEM_ZH in tokenizer.decode(list(p.prompt.token_ids))
        assert [c for _, c in p.history] == [tuple(catalog.codes[1 + j]) for j in range(3)]


def test_recif_jsonl_with_plain_fields_reads_the_same(setup, tmp_path):
    _, scheme, catalog = setup
    rows = [{"messages": json.loads(r["messages"]), "metadata": json.loads(r["metadata"])}
            for r in recif_rows(catalog, scheme)]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    parquet = str(tmp_path / "rows.parquet")
    pq.write_table(pa.Table.from_pylist(recif_rows(catalog, scheme)), parquet)
    a = load_prompts(str(jsonl), catalog, renderer(setup)).prompts
    b = load_prompts(parquet, catalog, renderer(setup)).prompts
    assert [(p.prompt, p.targets) for p in a] == [(p.prompt, p.targets) for p in b]


def test_verl_parquet_ground_truth_as_items_or_catalog_ids(setup, tmp_path):
    tokenizer, scheme, catalog = setup
    prompt = [{"role": "system", "content": SYSTEM_ZH}, {"role": "user", "content": "推荐一个视频"}]
    rows = [{"data_source": "onerec/video", "prompt": prompt, "ability": "rec",
             "reward_model": {"style": "rule", "ground_truth": [item_text(catalog, scheme, 5)]},
             "extra_info": {"index": 0, "split": "train"}},
            {"data_source": "onerec/video", "prompt": prompt, "ability": "rec",
             "reward_model": {"style": "rule", "ground_truth": [catalog.item_ids[5], catalog.item_ids[6]]},
             "extra_info": {"index": 1, "split": "train"}}]
    path = str(tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert detect_format(path) == "verl"
    got = load_prompts(path, catalog, renderer(setup)).prompts
    assert got[0].targets == (catalog.item_ids[5],)
    assert got[1].targets == (catalog.item_ids[5], catalog.item_ids[6])
    assert got[1].user_id == "1" and got[0].prompt.token_ids == got[1].prompt.token_ids
    assert "推荐一个视频/think" in tokenizer.decode(list(got[0].prompt.token_ids))


def test_benchmark_adapter_renders_the_chat_layout_of_its_instances(setup, tmp_path):
    tokenizer, scheme, catalog = setup
    users = [BenchmarkUser("u0", "Likes cooking.", tuple(catalog.item_ids[:3]), {"video": (catalog.item_ids[4],)})]
    path = str(tmp_path / "bench.jsonl")
    write_benchmark(path, users)
    got = load_prompts(path, catalog, renderer(setup)).prompts
    (instance,) = task_instances(users)
    assert list(got[0].prompt.token_ids) == chat_prompt_ids(tokenizer, task_messages(instance, catalog, scheme), True)
    assert got[0].targets == (catalog.item_ids[4],) and got[0].domain == "video" and got[0].user_id == "u0"


def test_bad_rows_are_named_or_skipped_and_counted_and_long_prompts_dropped(setup, tmp_path):
    _, scheme, catalog = setup
    rows = recif_rows(catalog, scheme, 4)
    rows[1]["metadata"] = json.dumps({"uid": "u1"})  # no answer
    rows[2]["messages"] = "not json"
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError, match=f"^{path}: row 1: 'metadata' has no non-empty string 'answer'"):
        load_prompts(path, catalog, renderer(setup))
    got = load_prompts(path, catalog, renderer(setup), skip_invalid=True)
    assert [p.source for p in got.prompts] == [f"{path}: row 0", f"{path}: row 3"]
    assert got.skipped == {"no_answer": 1, "schema": 1}
    # an answer item the catalog lacks is a bad field too
    unknown = recif_rows(catalog, scheme, 1)
    used = {tuple(int(x) for x in c) for c in catalog.codes}
    missing = next((a, b, c) for a in range(8) for b in range(8) for c in range(8) if (a, b, c) not in used)
    unknown[0]["metadata"] = json.dumps({"answer": scheme.format_item(catalog.domains[0], missing)})
    pq.write_table(pa.Table.from_pylist(unknown), path)
    with pytest.raises(ValueError, match=f"^{path}: row 0: metadata.answer: item .* is not in data.catalog"):
        load_prompts(path, catalog, renderer(setup))
    # prompts longer than the rollout context leaves are dropped and counted
    pq.write_table(pa.Table.from_pylist(recif_rows(catalog, scheme, 3)), path)
    lengths = [len(p.prompt.token_ids) for p in load_prompts(path, catalog, renderer(setup)).prompts]
    cut = sorted(lengths)[1]
    short = load_prompts(path, catalog, renderer(setup, budget=cut))
    assert len(short.prompts) == sum(n <= cut for n in lengths) and short.too_long == sum(n > cut for n in lengths)
    with pytest.raises(ValueError, match="no usable prompt .* too long 3"):
        load_prompts(path, catalog, renderer(setup, budget=5))


def test_a_file_of_another_format_is_refused_in_one_line(setup, tmp_path):
    _, _, catalog = setup
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match="cannot tell the RL data format from its fields \\['text'\\]"):
        load_prompts(str(path), catalog, renderer(setup))
