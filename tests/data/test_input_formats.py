"""Input adapters: OpenOneRec's parquet / JSONL files and Megatron-LM's {"text"} JSONL, preprocessed end to end.

Oracles: Hugging Face ``apply_chat_template`` + ``encode`` on the flattened messages (the way OpenOneRec's loader
flattens them), the assistant spans found in the expected ids, and the real RecIF-Bench prompts of the fixture.
"""
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import AutoTokenizer

from megatron_onereason.data.formats import FormatConfig, SampleError, iter_input, parse_sample
from megatron_onereason.data.indexed import lossmask_prefix, tokens_prefix
from megatron_onereason.tokenizer.itemic_import import import_itemic_vocab
from megatron_onereason.tools.preprocess_data import main, preprocess

PROMPT = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n(.*?)/think<\|im_end\|>\n"
                    r"<\|im_start\|>assistant\n\Z", re.S)


@pytest.fixture(scope="module")
def oor_model(openonerec_hf_dir, tmp_path_factory):
    """The OpenOneRec-style checkpoint with its itemic_tokens.json (tools/import_itemic_vocab.py)."""
    out = str(tmp_path_factory.mktemp("oor") / "model")
    import_itemic_vocab(openonerec_hf_dir, out)
    return out


@pytest.fixture(scope="module")
def hf(oor_model):
    return AutoTokenizer.from_pretrained(oor_model)


@pytest.fixture(scope="module")
def recif_turns(recif_fixture):
    """(system, user) of 40 real RecIF-Bench prompts, and their ground-truth items, soft switch removed."""
    samples = [s for _, s in recif_fixture[:40]]
    out = []
    for s in samples:
        system, user = PROMPT.match(s["prompt"]).groups()
        out.append((system, user, s["ground_truth"]))
    return out


def _parts(text):
    return [{"type": "text", "text": text}]


def _sft_rows(turns):
    """OpenOneRec SFT rows: JSON-string messages with text parts; half answer with inline reasoning."""
    rows = []
    for i, (system, user, answer) in enumerate(turns):
        reply = f"<think>\n用户最近看了很多广告视频 {i}。\n</think>\n{answer}" if i % 2 else answer
        messages = [{"role": "system", "content": _parts(system)},
                    {"role": "user", "content": _parts(user[:len(user) // 2]) + _parts(user[len(user) // 2:])},
                    {"role": "assistant", "content": _parts(reply)}]
        rows.append({"source": "RecIF_AdRec", "uuid": f"u{i}", "messages": json.dumps(messages, ensure_ascii=False),
                     "metadata": json.dumps({"uid": i})})
    return rows


def _flat(messages_json, soft_switch):
    """The messages as OpenOneRec's loader flattens them (text parts joined) and switches them (suffix on the user
    turn before the assistant: /think when it reasons)."""
    flat = [{"role": m["role"], "content": "".join(p["text"] for p in m["content"])} for m in json.loads(messages_json)]
    if soft_switch:
        reasons = bool(re.search(r"<think>(.*?)</think>", flat[-1]["content"], re.S).group(1).strip()) \
            if "<think>" in flat[-1]["content"] else False
        flat[-2]["content"] += "/think" if reasons else "/no_think"
    return flat


def _read(prefix):
    t, m = IndexedDataset(tokens_prefix(prefix)), IndexedDataset(lossmask_prefix(prefix))
    return [np.array(t[i]) for i in range(len(t))], [np.array(m[i]) for i in range(len(m))]


def _assistant_mask(ids, hf):
    """1 from after each ``<|im_start|>assistant\\n`` through its ``<|im_end|>``, found in the ids themselves."""
    head = hf.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end = hf.convert_tokens_to_ids("<|im_end|>")
    mask, i = [0] * len(ids), 0
    while i < len(ids):
        if ids[i:i + len(head)] == head:
            j = i + len(head)
            while ids[j] != end:
                mask[j] = 1
                j += 1
            mask[j] = 1
            i = j
        i += 1
    return mask


@pytest.mark.parametrize("input_format, soft_switch", [("openonerec", True), ("auto", False)])
def test_openonerec_sft_parquet_matches_apply_chat_template(recif_turns, oor_model, hf, tmp_path, input_format,
                                                            soft_switch):
    rows = _sft_rows(recif_turns)
    path = str(tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)  # several row groups
    prefix = str(tmp_path / "sft")
    stats = preprocess([path], oor_model, prefix, progress=False,
                       config=FormatConfig(input_format=input_format, soft_switch=soft_switch))
    docs, masks = _read(prefix)
    assert len(docs) == len(rows) == stats["samples"] and stats["by_format"] == {"chat": len(rows)}
    for row, doc, mask in zip(rows, docs, masks):
        text = hf.apply_chat_template(_flat(row["messages"], soft_switch), tokenize=False)
        want = hf.encode(text, add_special_tokens=False)
        assert doc.tolist() == want
        assert mask.tolist() == _assistant_mask(want, hf)
        assert text.count("/think<|im_end|>") + text.count("/no_think<|im_end|>") == int(soft_switch)
    # every item token of the answers is itemic, and the real histories are there too
    assert stats["itemic_tokens"] == sum(5 * "".join(m["content"] for m in _flat(r["messages"], False)).count(
        "<|sid_begin|>") for r in rows)


def test_openonerec_pretrain_segments_have_loss_on_all(recif_turns, oor_model, hf, tmp_path):
    """Their pre-training rows: one JSON-string text segment, no loss flag: every token (and the EOD) a target."""
    texts = [user for _, user, _ in recif_turns[:6]]
    rows = [{"source": "RecIF_VideoRec_Pretrain", "segments": json.dumps([{"type": "text", "text": t}],
                                                                         ensure_ascii=False)} for t in texts]
    jsonl = tmp_path / "pretrain.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    prefix = str(tmp_path / "pt")
    assert main(["--input", str(jsonl), "--tokenizer", oor_model, "--output-prefix", prefix,
                 "--input-format", "openonerec"]) == 0
    docs, masks = _read(prefix)
    eod = hf.convert_tokens_to_ids("<|endoftext|>")
    assert [d.tolist() for d in docs] == [hf.encode(t, add_special_tokens=False) + [eod] for t in texts]
    assert all(m.all() for m in masks)


def test_megatron_text_jsonl_with_json_keys(tokenizers_3x32, tmp_path):
    """Megatron-LM's {"text"} JSONL; --json-keys picks (and concatenates) the keys; the default key is "text"."""
    hf_base = AutoTokenizer.from_pretrained(tokenizers_3x32["base"])
    records = [{"content": f"Document {i} about tea and cooking.", "title": f"T{i}. ", "id": i} for i in range(5)]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    prefix = str(tmp_path / "m")
    assert main(["--input", str(jsonl), "--tokenizer", tokenizers_3x32["base"], "--output-prefix", prefix,
                 "--input-format", "megatron", "--json-keys", "title", "content"]) == 0
    docs, masks = _read(prefix)
    eod = hf_base.convert_tokens_to_ids("<|endoftext|>")
    for r, doc, mask in zip(records, docs, masks):
        assert doc.tolist() == (hf_base.encode(r["title"], add_special_tokens=False)
                                + hf_base.encode(r["content"], add_special_tokens=False) + [eod])
        assert mask.all()
    with pytest.raises(SampleError, match=r"exactly one of a text key \['text'\]"):
        parse_sample(records[0], FormatConfig(input_format="megatron"))


@pytest.mark.parametrize("record, match", [
    ({"messages": json.dumps([{"role": "user", "content": [{"type": "image", "image": "x.jpg"}]},
                              {"role": "assistant", "content": "y"}])}, "content part 0 is 'image'"),
    ({"messages": "[{not json"}, "'messages' is a string but not valid JSON"),
    ({"segments": [{"type": "image", "text": ""}]}, "segment 0 has type 'image'"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": "<think>a</think>b</think>c"}]}, "exactly one </think>"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": "sure <think>a</think>b"}]}, "text before <think>"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": "<think>a</think>b", "reasoning": "r"}]}, "<think>/</think> inside"),
    ({"segments": "[]", "text": "x"}, "exactly one of"),
])
def test_openonerec_records_refused_with_their_reason(record, match):
    with pytest.raises(SampleError, match=re.escape(match)) as e:
        parse_sample(record, FormatConfig(input_format="openonerec" if "text" not in record else "auto"))
    assert e.value.reason == "schema"


def test_soft_switch_follows_the_reasoning_and_is_not_doubled():
    def user_turn(messages):
        sample = parse_sample({"messages": messages}, FormatConfig(soft_switch=True))
        return "".join(s.text for s in sample.segments).split("<|im_start|>user\n")[1].split("<|im_end|>")[0]

    assert user_turn([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>a"}]) == \
        "q/think"
    assert user_turn([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "q/no_think"
    assert user_turn([{"role": "user", "content": "q /no_think"}, {"role": "assistant", "content": "a"}]) == \
        "q /no_think"


def test_parquet_is_streamed_and_broken_parquet_is_named(tmp_path, tokenizers_3x32, monkeypatch):
    rows = [{"segments": json.dumps([{"type": "text", "text": f"row {i}"}]), "blob": "x" * 1000} for i in range(50)]
    path = str(tmp_path / "s.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=8)
    for name in ("read_table", "read_pandas"):  # never a whole-file read
        monkeypatch.setattr(pq, name, lambda *a, **k: pytest.fail("whole-file parquet read"))
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("whole-file parquet read"))
    got = list(iter_input(path, ("segments", "messages")))
    assert [n for n, _ in got] == list(range(1, 51)) and all(set(r) == {"segments"} for _, r in got)


def test_broken_parquet_error_is_one_line_naming_the_file(tmp_path, tokenizers_3x32, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "fine"}) + "\n")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not a parquet file")
    prefix = tmp_path / "out" / "p"
    assert main(["--input", str(good), str(broken), "--tokenizer", tokenizers_3x32["extended"], "--output-prefix",
                 str(prefix)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"preprocess_data: error: {broken}: not a readable parquet file")
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")  # nothing half-written
