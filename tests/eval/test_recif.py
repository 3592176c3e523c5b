"""RecIF-Bench: scoring stored generations against OpenOneRec's own per-sample scores, the task-file loader and the
soft-switch prompt against OpenOneRec's rendering (the real fixture), sid2pid strategies and bad input."""
import json
import os
import re

import pytest
from recif_inputs import fixture_messages, recif_rows, write_recif_task

from megatron_onereason import evaluate
from megatron_onereason.eval.recif import (
    RecifError,
    Sid2Pid,
    answer_items,
    generation_item,
    load_recif_task,
    prompt_text,
)
from megatron_onereason.tokenizer.itemic_tokens import preset

OPENONEREC = preset("openonerec")
KS = (1, 32)
NAMES = [f"{p}{m}@{k}" for p in ("", "pid_") for k in KS for m in ("pass", "position1_pass", "recall")]
_TRIPLE_RE = re.compile(r"<s_a_(\d+)><s_b_(\d+)><s_c_(\d+)>")


def _score(tmp_path, dump, *extra):
    out = tmp_path / "scores.json"
    report = evaluate.main(["--score-generations", str(dump), "--out", str(out), "--k", "1,32", *extra])
    with open(out) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    return report


def _assert_matches_fixture(report, fixture, names):
    assert [row["id"] for row in report["per_sample"]] == [sample_id for sample_id, _ in fixture]
    for row, (sample_id, sample) in zip(report["per_sample"], fixture):
        for name in names:
            assert row[name] == float(sample[name]), (sample_id, name)
    for name in names:
        assert report["mean"][name] == pytest.approx(sum(float(s[name]) for _, s in fixture) / len(fixture))


def test_scoring_reproduces_every_openonerec_per_sample_score(recif_fixture, recif_fixture_path, tmp_path):
    report = _score(tmp_path, recif_fixture_path)
    assert sorted(k for k in report["per_sample"][0] if k != "id") == sorted(NAMES)
    _assert_matches_fixture(report, recif_fixture, NAMES)
    assert report["pid_source"] == "pid_generations"
    assert report["counts"]["samples"] == 100 and report["counts"]["generations"] == 3200
    assert report["mean"]["pass@32"] == pytest.approx(0.16) and report["mean"]["recall@32"] == pytest.approx(0.0506349)


def test_sid2pid_mapping_reproduces_the_pid_scores(recif_fixture, tmp_path):
    """A sid2pid built from OpenOneRec's own mapping of each generation, with a less popular decoy per tuple."""
    table, dump = {}, {"model_name": "OneRec-1.7B", "samples": {}}
    for sample_id, s in recif_fixture:
        for generation, pid in zip(s["generations"], s["pid_generations"]):
            triples = _TRIPLE_RE.findall(generation.split("</think>")[-1])
            if pid > 0:
                key = str(int(triples[0][0]) * 8192 ** 2 + int(triples[0][1]) * 8192 + int(triples[0][2]))
                table[key] = [{"pid": pid, "count": 9, "count_after_downsample": 5},
                              {"pid": 10 ** 12 + pid, "count": 3, "count_after_downsample": 4}]
        dump["samples"][sample_id] = {k: s[k] for k in ("prompt", "generations", "ground_truth", "metadata")}
    (tmp_path / "sid2pid.json").write_text(json.dumps(table))
    (tmp_path / "dump.json").write_text(json.dumps(dump, ensure_ascii=False))
    for strategy in ("most_popular_after_downsampling", "most_popular_originally"):
        report = _score(tmp_path, tmp_path / "dump.json", "--sid2pid", str(tmp_path / "sid2pid.json"),
                        "--sid2pid-strategy", strategy)
        assert report["pid_source"] == "sid2pid"
        _assert_matches_fixture(report, recif_fixture, NAMES)


def test_sid2pid_strategies_by_hand():
    table = {Sid2Pid.key((1, 2, 3)): [{"pid": 11, "count": 10, "count_after_downsample": 2},
                                      {"pid": 22, "count": 5, "count_after_downsample": 7},
                                      {"pid": 33, "count": 1, "count_after_downsample": 7}]}
    assert Sid2Pid.key((1, 2, 3)) == 1 * 8192 ** 2 + 2 * 8192 + 3
    assert Sid2Pid(table, "most_popular_originally").pid((1, 2, 3)) == 11
    tied = Sid2Pid(table, "most_popular_after_downsampling", seed=3)
    draws = [tied.pid((1, 2, 3)) for _ in range(64)]
    assert set(draws) == {22, 33}  # only the tied most popular after downsampling, both drawn
    again = Sid2Pid(table, "most_popular_after_downsampling", seed=3)
    assert [again.pid((1, 2, 3)) for _ in range(64)] == draws  # seeded: reproducible
    anyone = Sid2Pid(table, "random", seed=0)
    assert set(anyone.pid((1, 2, 3)) for _ in range(64)) == {11, 22, 33}
    assert tied.pid((1, 2, 4)) is None and tied.pid(None) is None
    with pytest.raises(ValueError, match="unknown sid2pid strategy"):
        Sid2Pid(table, "best")


@pytest.mark.parametrize("generation, item", [
    ("why <|sid_begin|><s_a_1><s_b_2><s_c_3><|sid_end|>\n</think>\n<|sid_begin|><s_a_4><s_b_5><s_c_6>", (4, 5, 6)),
    ("</think>\n<|sid_begin|><s_a_4><s_b_5><s_c_6><|sid_end|>", (4, 5, 6)),
    ("<s_a_7><s_b_8><s_c_9>", (7, 8, 9)),  # a non-thinking dump stores only the codes after the forced begin token
    ("</think>\n<|sid_begin|>", None),  # beam search found nothing
    ("</think>\n<|sid_begin|><s_a_7><s_b_8>", None),  # truncated
    ("</think>\n<|sid_begin|><s_a_7><s_c_8><s_b_9>", None),  # levels out of order
    ("</think>\n<|sid_begin|><s_a_7><s_b_8><s_c_9000>", None),  # outside the codebook
    ("</think>\nsure: <|sid_begin|><s_a_7><s_b_8><s_c_9>", None),  # OpenOneRec reads "sure:" here: no hit either
    ("</think>\n<|sid_begin|><s_a_07><s_b_8><s_c_9>", None),  # not the token <s_a_7>
    ("</think>\n<|sid_begin|><s_a_7><s_b_8><s_c_9><|sid_end|><|sid_begin|><s_a_1><s_b_1><s_c_1><|sid_end|>", None),
    ("no item at all", None),
])
def test_generation_item_by_hand(generation, item):
    assert generation_item(generation, OPENONEREC) == item


def test_items_in_a_per_domain_scheme():
    onereason = preset("onereason")
    assert generation_item("</think>\n<|ad_begin|><s_a_4><s_b_5><s_c_6><|ad_end|>", onereason) == (4, 5, 6)
    assert generation_item("</think>\n<|ad_begin|><s_a_4><s_b_5><s_c_6><|video_end|>", onereason) is None
    assert generation_item("<s_a_4><s_b_5><s_c_6>", onereason) == (4, 5, 6)
    items = answer_items("<|video_begin|><s_a_1><s_b_2><s_c_3><|video_end|><|ad_begin|><s_a_1><s_b_2><s_c_4><|ad_end|>",
                         onereason)
    assert [(m.domain, m.codes) for m in items] == [("video", (1, 2, 3)), ("ad", (1, 2, 4))]


def test_answer_items_by_hand():
    item = "<|sid_begin|><s_a_{}><s_b_2><s_c_3><|sid_end|>"
    items = answer_items(item.format(1) + " " + item.format(5) + item.format(1), OPENONEREC)
    assert [(m.domain, m.codes) for m in items] == [(None, (1, 2, 3)), (None, (5, 2, 3)), (None, (1, 2, 3))]
    assert answer_items("  ", OPENONEREC) == []
    for bad in (item.format(1) + "<|sid_begin|><s_a_1><s_b_2><|sid_end|>", "x" + item.format(1), item[:-11].format(1),
                item.format("01")):
        with pytest.raises(ValueError, match="malformed"):
            answer_items(bad, OPENONEREC)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_loader_reads_recif_task_files(recif_fixture, tmp_path, fmt):
    samples = [s for _, s in recif_fixture]
    folder = write_recif_task(str(tmp_path), "ad", recif_rows(samples), fmt)
    task = load_recif_task(folder, OPENONEREC)
    assert task.name == "ad" and task.path.endswith(f"ad_test.{fmt}") and not task.skipped
    assert [s.sample_id for s in task.samples] == [str(i) for i in range(len(samples))]
    for loaded, s in zip(task.samples, samples):
        assert list(loaded.messages) == fixture_messages(s["prompt"])
        assert [tuple(map(int, t)) for t in _TRIPLE_RE.findall(s["ground_truth"])] == [m.codes for m in loaded.targets]
        assert loaded.metadata == {"uid": s["metadata"]["uid"], "answer_pid": s["metadata"]["answer_pid"]}
    assert load_recif_task(task.path, OPENONEREC, limit=5).samples == task.samples[:5]


def test_prompt_is_openonerecs_soft_switch_rendering(recif_fixture, tmp_path):
    from megatron_onereason.tokenizer.qwen3_tokenizer import build_tiny_qwen3_tokenizer

    tokenizer = build_tiny_qwen3_tokenizer()
    task = load_recif_task(write_recif_task(str(tmp_path), "ad", recif_rows([s for _, s in recif_fixture])), OPENONEREC)
    for loaded, (_, s) in zip(task.samples, recif_fixture):
        assert prompt_text(tokenizer, loaded.messages, thinking=True) == s["prompt"]
        no_think = s["prompt"].replace("/think<|im_end|>", "/no_think<|im_end|>") + "<think>\n\n</think>\n\n"
        assert prompt_text(tokenizer, loaded.messages, thinking=False) == no_think


def test_bad_task_files_name_the_file_row_and_field(recif_fixture, tmp_path):
    rows = recif_rows([s for _, s in recif_fixture[:4]])
    broken = tmp_path / "broken_test.parquet"
    broken.write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(RecifError, match=r"broken_test\.parquet: not a readable parquet file"):
        load_recif_task(str(broken), OPENONEREC)
    (tmp_path / "missing").mkdir()
    with pytest.raises(RecifError, match=r"a RecIF task folder needs missing_test\.parquet"):
        load_recif_task(str(tmp_path / "missing"), OPENONEREC)
    folder = write_recif_task(str(tmp_path), "nometa", [{"messages": r["messages"]} for r in rows])
    with pytest.raises(RecifError, match=r"nometa_test\.parquet: row 0: missing 'metadata'"):
        load_recif_task(folder, OPENONEREC)
    no_answer = [dict(r) for r in rows]
    no_answer[2]["metadata"] = json.dumps({"uid": 1})
    folder = write_recif_task(str(tmp_path), "noanswer", no_answer, "jsonl")
    with pytest.raises(RecifError, match=r"noanswer_test\.jsonl: row 2: 'metadata' has no non-empty string 'answer'"):
        load_recif_task(folder, OPENONEREC)
    task = load_recif_task(folder, OPENONEREC, skip_invalid=True)
    assert [s.sample_id for s in task.samples] == ["0", "1", "3"] and task.skipped == {"no_answer": 1}
    bad_utf8 = tmp_path / "utf8_test.jsonl"
    bad_utf8.write_bytes(json.dumps(rows[0]).encode() + b'\n{"messages": "\xc3\x28"}\n')
    with pytest.raises(RecifError, match=r"utf8_test\.jsonl: row 1: invalid UTF-8"):
        load_recif_task(str(bad_utf8), OPENONEREC)


def test_bad_dump_is_one_line_and_leaves_no_output(recif_fixture, tmp_path, capsys):
    sample_id, sample = recif_fixture[0]
    dump = {"samples": {sample_id: {**sample, "ground_truth": "<|sid_begin|><s_a_1><s_b_2><|sid_end|>"}}}
    (tmp_path / "dump.json").write_text(json.dumps(dump))
    out = tmp_path / "scores.json"
    assert evaluate.cli(["--score-generations", str(tmp_path / "dump.json"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"evaluate: error: {tmp_path / 'dump.json'}: sample {sample_id}: ground_truth: "
                          "malformed item")
    assert not out.exists() and os.listdir(tmp_path) == ["dump.json"]
    (tmp_path / "dump.json").write_bytes(b"\xff{")
    assert evaluate.cli(["--score-generations", str(tmp_path / "dump.json"), "--out", str(out)]) == 1
    assert "not a readable generation dump" in capsys.readouterr().err and not out.exists()
