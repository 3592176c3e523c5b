"""tools/preprocess_data.py: outputs read back with Megatron's reader, workers agree, errors, skips and stats."""
import glob
import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_onereason.data.formats import SampleEncoder, parse_sample
from megatron_onereason.data.indexed import lossmask_prefix, tokens_prefix

from megatron_onereason.tools.preprocess_data import InputError, main, preprocess


def _records(n):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        item = f"<|video_begin|><a_{rng.integers(32)}><b_{rng.integers(32)}><c_{rng.integers(32)}>"
        if i % 3 == 2:
            out.append({"messages": [{"role": "user", "content": f"Describe {item}"},
                                     {"role": "assistant", "content": f"Video number {i}.",
                                      **({"reasoning": "because"} if i % 2 else {})}], "source": "sft"})
        else:
            out.append({"segments": [{"text": f"User: caption {item}\nAssistant: ", "loss": False},
                                     {"text": "words " * int(rng.integers(1, 40)), "loss": True}],
                        "source": f"src{i % 2}", "domain": "video"})
    return out


def _write_jsonl(path, lines):
    """Lines given as bytes are written verbatim, strings as text, anything else as JSON."""
    def raw(line):
        return line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()
    path.write_bytes(b"".join(raw(line) + b"\n" for line in lines))
    return str(path)


def _read(prefix):
    """Documents and masks via Megatron's reader, copied out: its arrays view a memory map closed with the reader."""
    t, m = IndexedDataset(tokens_prefix(prefix)), IndexedDataset(lossmask_prefix(prefix))
    return [np.array(t[i]) for i in range(len(t))], [np.array(m[i]) for i in range(len(m))]


def test_preprocess_round_trip_and_workers_agree(tmp_path, tokenizers_3x32):
    records = _records(600)  # > 2 batches of 256, so the multi-worker path reorders nothing
    data = _write_jsonl(tmp_path / "in.jsonl", records[:400] + [""])  # a blank line is counted, not a sample
    data2 = _write_jsonl(tmp_path / "in2.jsonl", records[400:])
    tok = tokenizers_3x32["extended"]
    stats1 = preprocess([data, data2], tok, str(tmp_path / "w1"), workers=1, progress=False)
    stats2 = preprocess([data, data2], tok, str(tmp_path / "w2"), workers=2, progress=False)
    docs1, masks1 = _read(str(tmp_path / "w1"))
    docs2, masks2 = _read(str(tmp_path / "w2"))
    # Oracle: the encoder applied to each record alone, in input order.
    expected = SampleEncoder(tok).encode([parse_sample(r) for r in records])
    assert len(docs1) == len(docs2) == len(records)
    for e, d1, m1, d2, m2 in zip(expected, docs1, masks1, docs2, masks2):
        assert np.array_equal(d1, e.tokens) and np.array_equal(m1, e.lossmask)
        assert np.array_equal(d1, d2) and np.array_equal(m1, m2)
    assert stats1["samples"] == 600 and stats1["blank_lines"] == 1 and stats1["skipped"]["total"] == 0
    assert stats1["tokens"] == sum(e.tokens.size for e in expected)
    assert stats1["loss_tokens"] == sum(int(e.lossmask.sum()) for e in expected)
    assert stats1["itemic_tokens"] == 4 * 600
    assert stats1["by_format"] == {"segments": 400, "chat": 200}
    assert set(stats1["per_source"]) == {"src0", "src1", "sft"}
    assert sum(s["tokens"] for s in stats1["per_source"].values()) == stats1["tokens"]
    assert stats1["per_domain"]["unknown"]["samples"] == 200  # chat records name no domain
    on_disk = json.load(open(str(tmp_path / "w1") + "_stats.json"))
    assert on_disk["samples"] == 600 and on_disk["tokens_per_s"] > 0
    for key in ("samples", "tokens", "loss_tokens", "itemic_tokens", "per_source", "per_domain", "skipped"):
        assert stats1[key] == stats2[key]


def test_invalid_line_fails_with_location_and_leaves_nothing(tmp_path, tokenizers_3x32):
    good = _records(3)
    data = _write_jsonl(tmp_path / "in.jsonl", good[:2] + ["{broken", good[2]])
    prefix = str(tmp_path / "out" / "p")
    for workers in (1, 2):
        with pytest.raises(InputError, match=r"in\.jsonl:3: invalid JSON"):
            preprocess([data], tokenizers_3x32["extended"], prefix, workers=workers, progress=False)
        assert glob.glob(prefix + "*") == []


def test_skip_invalid_counts_reasons(tmp_path, tokenizers_3x32):
    good = _records(4)
    bad = [
        "{broken",
        {"segments": [{"text": "<|video_begin|><a_99><b_1><c_1>", "loss": True}]},  # code outside 32
        {"messages": [{"role": "user", "content": "q"}]},  # no assistant
        {"segments": [{"text": "x", "loss": True}], "messages": []},
        b'{"segments": [{"text": "caf\xe9", "loss": true}]}',  # Latin-1 byte, not UTF-8
        '{"segments": [{"text": "a\\ud800b", "loss": true}]}',  # a lone surrogate the tokenizer cannot take
    ]
    data = _write_jsonl(tmp_path / "in.jsonl", [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], good[3],
                                                bad[4], bad[5]])
    stats = preprocess([data], tokenizers_3x32["extended"], str(tmp_path / "p"), skip_invalid=True, progress=False)
    assert stats["samples"] == 4 and len(_read(str(tmp_path / "p"))[0]) == 4
    assert stats["skipped"]["total"] == 6
    assert stats["skipped"]["by_reason"] == {"invalid_json": 1, "itemic": 1, "no_target": 1, "schema": 1,
                                             "invalid_utf8": 2}
    assert [s.split(": ")[0] for s in stats["skipped"]["first"]] == [f"{data}:{n}" for n in (2, 4, 5, 7, 9, 10)]


def test_all_invalid_is_an_error(tmp_path, tokenizers_3x32):
    data = _write_jsonl(tmp_path / "in.jsonl", ["{broken"])
    with pytest.raises(InputError, match="no valid samples"):
        preprocess([data], tokenizers_3x32["extended"], str(tmp_path / "p"), skip_invalid=True, progress=False)
    assert glob.glob(str(tmp_path / "p*")) == []


def test_cli_main(tmp_path, tokenizers_3x32, capsys):
    """The command line (in-process: a subprocess would pay the ~5 s megatron import again)."""
    data = _write_jsonl(tmp_path / "in.jsonl", _records(5) + ['{"segments": 1}'])
    argv = ["--input", data, "--tokenizer", tokenizers_3x32["extended"], "--output-prefix", str(tmp_path / "p"),
            "--workers", "2"]
    assert main(argv) == 1
    assert f"{data}:6: 'segments' must be a non-empty list" in capsys.readouterr().err
    assert main(argv + ["--skip-invalid", "--no-append-eod"]) == 0
    out = capsys.readouterr().out
    assert "5 samples" in out and "1 skipped" in out
    docs = _read(str(tmp_path / "p"))[0]
    assert len(docs) == 5 and json.load(open(str(tmp_path / "p") + "_stats.json"))["append_eod"] is False
