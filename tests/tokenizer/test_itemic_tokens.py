"""Itemic schemes as data: writing and parsing items in each preset, ids looked up (never assumed contiguous), the
itemic_tokens.json formats. Oracles: hand-written strings, OpenOneRec's own regex on the real RecIF-Bench prompts,
set membership for id masks, and the HF tokenizer for ids."""
import json
import random
import re
import shutil

import numpy as np
import pytest
import torch

from megatron_onereason.tokenizer.itemic_tokens import (
    DEFAULT_SCHEME,
    ITEMIC_JSON,
    PRESETS,
    ItemicPatternError,
    ItemicScheme,
    ItemicVocab,
    preset,
)

SID = re.compile(r"<\|sid_begin\|><s_a_(\d+)><s_b_(\d+)><s_c_(\d+)><\|sid_end\|>")  # OpenOneRec's item notation
CODES_ONLY = re.compile(r"<s_a_(\d+)><s_b_(\d+)><s_c_(\d+)>")  # what OpenOneRec's scorer extracts


@pytest.fixture(scope="module")
def recif_samples(recif_fixture):
    return [s for _, s in recif_fixture]


# ------------------------------------------------------------------------------------------ strings
def test_presets_write_items_as_documented():
    codes = (12, 7, 3)
    assert DEFAULT_SCHEME.name == "onereason_report"
    assert preset("onereason_report").format_item("video", codes) == "<|video_begin|><a_12><b_7><c_3>"
    assert preset("openonerec").format_item("video", codes) == "<|sid_begin|><s_a_12><s_b_7><s_c_3><|sid_end|>"
    assert preset("openonerec").format_item(None, codes) == "<|sid_begin|><s_a_12><s_b_7><s_c_3><|sid_end|>"
    assert preset("onereason").format_item("prod", codes) == "<|prod_begin|><s_a_12><s_b_7><s_c_3><|prod_end|>"
    assert [preset(n).item_length for n in ("onereason_report", "openonerec", "onereason")] == [4, 5, 5]
    # the order tools/extend_vocab.py adds tokens in: OpenOneRec's expand script's order for openonerec
    small = preset("openonerec", levels=2, codebook_size=2)
    assert small.token_strings() == ["<s_a_0>", "<s_a_1>", "<s_b_0>", "<s_b_1>", "<|sid_begin|>", "<|sid_end|>"]
    per_domain = preset("onereason", levels=1, codebook_size=2, domains=["video", "ad"])
    assert per_domain.token_strings() == ["<|video_begin|>", "<|ad_begin|>", "<|video_end|>", "<|ad_end|>",
                                          "<s_a_0>", "<s_a_1>"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_find_items_round_trips_every_preset(name):
    scheme = preset(name, codebook_size=8192)
    rng = random.Random(0)
    items = [(rng.choice(["video", "prod", "ad"]), tuple(rng.randrange(8192) for _ in range(3))) for _ in range(20)]
    parts, spans = [], []
    pos = 0
    for domain, codes in items:
        text = f"word {rng.randrange(100)}, "
        pattern = scheme.format_item(domain, codes)
        spans.append((pos + len(text), pos + len(text) + len(pattern)))
        parts.append(text + pattern)
        pos += len(text) + len(pattern)
    text = "".join(parts)
    found = scheme.find_items(text)
    want_domain = [None if scheme.shared_begin else d for d, _ in items]
    assert [(m.start, m.end) for m in found] == spans
    assert [m.domain for m in found] == want_domain and [m.codes for m in found] == [c for _, c in items]
    assert scheme.count_tokens(text) == len(items) * scheme.item_length
    assert scheme.parse_item(scheme.format_item(*items[0])) == (want_domain[0], items[0][1])


def test_real_recif_prompts_parse_as_openonerec(recif_samples):
    """Every item of the 100 real prompts and ground truths, against OpenOneRec's own regex."""
    scheme = preset("openonerec")
    total = 0
    for s in recif_samples:
        for text in (s["prompt"], s["ground_truth"]):
            found = scheme.find_items(text)
            want = [tuple(int(c) for c in m.groups()) for m in SID.finditer(text)]
            assert [m.codes for m in found] == want and all(m.domain is None for m in found)
            assert len(found) == text.count("<|sid_begin|>")
            assert scheme.count_tokens(text) == 5 * len(found)
            total += len(found)
        # the report's notation claims <|sid_begin|> for its `sid` domain: the prompt is refused as malformed, not
        # read with wrong tokens; OneReason's benchmark notation reads the same codes as items of domain `sid`
        with pytest.raises(ItemicPatternError, match="expected <a_N> after '<\\|sid_begin\\|>', got '<s_a_"):
            preset("onereason_report").count_tokens(s["prompt"])
        assert [(m.domain, m.codes) for m in preset("onereason").find_items(s["prompt"])] == [
            ("sid", m.codes) for m in scheme.find_items(s["prompt"])]
    assert total > 1000


def test_real_generations_stop_at_the_last_code(recif_samples):
    """OneRec-1.7B's generations end after ``<s_c_N>`` (decoding stops there): accepted with require_end=False, with
    the codes OpenOneRec's scorer extracts; refused by the strict parser."""
    scheme = preset("openonerec")
    checked = 0
    for s in recif_samples[:20]:
        for g in s["generations"]:
            answer = g.rsplit("</think>", 1)[-1]
            items = scheme.find_items(answer, require_end=False)
            want = [tuple(int(c) for c in m.groups()) for m in CODES_ONLY.finditer(answer)]
            assert [m.codes for m in items] == want
            if items and items[-1].end == len(answer.rstrip()):
                checked += 1
                with pytest.raises(ItemicPatternError, match="expected <\\|sid_end\\|>"):
                    scheme.find_items(answer)
    assert checked > 100


@pytest.mark.parametrize("text, message", [
    ("<|video_begin|><a_1><c_2><c_3>", r"expected <b_N> after '<\|video_begin\|><a_1>', got '<c_2>"),
    ("<|video_begin|><a_1><b_2>", "expected <c_N>"),
    ("<|shop_begin|><a_1><b_2><c_3>", "unknown itemic domain 'shop'"),
    ("see <a_9000>", "code 9000 of level a outside the codebook size 8192"),
    ("see <d_1>", "level d outside the scheme's 3 levels"),
])
def test_malformed_text_is_refused_with_its_reason(text, message):
    with pytest.raises(ItemicPatternError, match=message):
        DEFAULT_SCHEME.count_tokens(text)


def test_end_tokens_must_match_their_begin_token():
    scheme = preset("onereason")
    with pytest.raises(ItemicPatternError, match=r"expected <\|video_end\|>.*got '<\|prod_end\|>"):
        scheme.find_items("<|video_begin|><s_a_1><s_b_2><s_c_3><|prod_end|>", require_end=False)
    with pytest.raises(ItemicPatternError, match="expected <s_b_N>"):  # a code after the last level: not cut short
        preset("openonerec").find_items("<|sid_begin|><s_a_1><s_a_2>", require_end=False)
    with pytest.raises(ItemicPatternError, match="unknown itemic domain 'shop'"):
        scheme.count_tokens("x <|shop_end|>")
    assert scheme.count_tokens("<s_a_1><s_b_2> and a stray <|ad_end|>") == 3


def test_loose_pattern_keeps_malformed_attempts():
    scheme = preset("openonerec")
    text = "a <|sid_begin|><s_a_1><s_c_2> b <|sid_begin|><s_a_1><s_b_2><s_c_3><|sid_end|> c <|sid_begin|>"
    assert [m.group(0) for m in scheme.loose_item_re.finditer(text)] == [
        "<|sid_begin|><s_a_1><s_c_2>", "<|sid_begin|><s_a_1><s_b_2><s_c_3><|sid_end|>", "<|sid_begin|>"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(code_token="<{code}>", begin_token="<|sid_begin|>"), "must hold {letter} and {code}"),
    (dict(code_token="<{letter}_{code}>", begin_token="<|{name}_begin|>"), "may hold only one {domain}"),
    (dict(code_token="<{letter}_{code}>", begin_token="<|b|>", end_token="<|{domain}_end|>"), "per-domain end"),
    (dict(code_token="<{letter}_{code}>", begin_token="<|b|>", domains=("video",)), "shared by all domains"),
    (dict(code_token="<{letter}_{code}>", begin_token="<|{domain}_begin|>", domains=("Video",)), "lower-case"),
    (dict(code_token="<{letter}_{code}>", begin_token="<|{domain}_begin|>"), "lower-case domain names"),
    (dict(code_token="<{letter}_{code}>", begin_token="<a_{letter}>"), "may hold only one {domain}"),
    (dict(code_token="<{letter}_{code}>", begin_token="<a_1>"), "clash"),
    (dict(code_token="<{letter}_{code}>", begin_token="<|b|>", end_token="<|b|>"), "clash"),
    (dict(code_token="<{letter}_{code}>", begin_token="<|b|>", levels=9), "levels must be in"),
])
def test_invalid_schemes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message) if "{" in message else message):
        ItemicScheme("custom", **kwargs)


def test_unknown_preset_and_domains_of_a_shared_scheme():
    with pytest.raises(ValueError, match="unknown itemic scheme 'sid' \\(known: onereason_report, openonerec, "):
        preset("sid")
    with pytest.raises(ValueError, match="domains"):
        preset("openonerec", domains=["video"])
    with pytest.raises(ValueError, match="unknown scheme field"):
        ItemicScheme.from_dict({"code_token": "<{letter}_{code}>", "begin_token": "<|b|>", "end": "<|e|>"})


# ------------------------------------------------------------------------------------------ ids
def _scattered_vocab(scheme, seed=0):
    """Ids in a shuffled, gappy order: nothing about them is contiguous."""
    tokens = scheme.token_strings()
    ids = random.Random(seed).sample(range(100, 100 + 3 * len(tokens)), len(tokens))
    return dict(zip(tokens, ids)), ItemicVocab.from_lookup(scheme, dict(zip(tokens, ids)))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_ids_are_looked_up_not_computed(name):
    scheme = preset(name, codebook_size=16, domains=None if name == "openonerec" else ["video", "prod"])
    table, vocab = _scattered_vocab(scheme)
    domain = "prod"
    codes = (3, 15, 0)
    want = [table[t] for t in re.findall(r"<[^<>]+>", scheme.format_item(domain, codes))]
    assert vocab.item_ids(domain, codes) == want
    key = None if scheme.shared_begin else domain
    assert vocab.decode_item(want) == (key, codes)
    assert vocab.decode_item(want[:-1]) is None and vocab.decode_item(want[::-1]) is None
    codes_only = want[:1 + len(codes)]  # a generation that stops at the last code (OpenOneRec's RecIF decoding)
    assert vocab.decode_item(codes_only, require_end=False) == (key, codes)
    assert vocab.decode_item(want, require_end=False) == (key, codes)
    assert vocab.decode_item(codes_only[:-1], require_end=False) is None
    ids = np.arange(0, 100 + 3 * len(table) + 10)
    oracle = np.isin(ids, list(table.values()))
    assert (vocab.itemic_mask(ids) == oracle).all()
    assert torch.equal(vocab.itemic_mask(torch.from_numpy(ids)), torch.from_numpy(oracle))
    covered = sorted(i for lo, hi in vocab.id_ranges for i in range(lo, hi))
    assert covered == sorted(table.values()) and len(vocab.id_ranges) > 1
    assert vocab.max_id == max(table.values())
    assert vocab.token(table[scheme.code_for(2, 5)]) == ("code", None, 2, 5)
    assert vocab.token(table[scheme.begin_for(domain)]).kind == "begin" and vocab.token(99) is None


def test_missing_tokens_and_shared_ids_are_refused():
    scheme = preset("openonerec", codebook_size=4)
    table = {t: i for i, t in enumerate(scheme.token_strings())}
    del table["<s_b_2>"]
    with pytest.raises(ValueError, match="lacks 1 of the 14 tokens of itemic scheme 'openonerec' "
                                         r"\(first missing: '<s_b_2>'\)"):
        ItemicVocab.from_lookup(scheme, table)
    table["<s_b_2>"] = table["<s_b_1>"]
    with pytest.raises(ValueError, match="share an id"):
        ItemicVocab.from_lookup(scheme, table)


def test_check_encoding_refuses_tokens_that_are_not_matched_whole():
    table, vocab = _scattered_vocab(preset("openonerec", codebook_size=4))
    vocab.check_encoding(lambda text: [table[t] for t in re.findall(r"<[^<>]+>", text)])
    with pytest.raises(ValueError, match="not as the itemic tokens"):
        vocab.check_encoding(lambda text: [ord(c) for c in text])


# ------------------------------------------------------------------------------------------ files
def test_json_round_trip_and_format_1(tokenizers_3x32, tmp_path):
    from transformers import AutoTokenizer

    src = tokenizers_3x32["extended"]
    vocab = ItemicVocab.load(src)
    hf = AutoTokenizer.from_pretrained(src)
    assert vocab.item_ids("prod", (1, 2, 31)) == hf.convert_tokens_to_ids(["<|prod_begin|>", "<a_1>", "<b_2>", "<c_31>"])
    first = vocab.id_ranges[0][0]
    old = tmp_path / "format1"
    shutil.copytree(src, old)
    with open(old / ITEMIC_JSON, "w") as f:  # what the project wrote before schemes existed
        json.dump({"original_vocab_size": 1024, "first_id": first, "levels": 3, "codebook_size": 32,
                   "domains": ["video", "prod", "ad", "living", "sid"], "num_new_tokens": 101}, f)
    assert ItemicVocab.load(str(old)) == vocab
    with open(old / ITEMIC_JSON, "w") as f:  # a hand-written file with a wrong first id: refused, not wrong ids
        json.dump({"first_id": first + 1, "levels": 3, "codebook_size": 32,
                   "domains": ["video", "prod", "ad", "living", "sid"]}, f)
    with pytest.raises(ValueError, match="does not describe this tokenizer"):
        ItemicVocab.load(str(old))
    recorded = vocab.to_dict()
    recorded["level_first_last_ids"][1][0] += 1
    with open(old / ITEMIC_JSON, "w") as f:
        json.dump(recorded, f)
    with pytest.raises(ValueError, match="records level_first_last_ids"):
        ItemicVocab.load(str(old))


def test_hand_written_scheme_name_next_to_an_openonerec_tokenizer(openonerec_hf_dir, tmp_path):
    from transformers import AutoTokenizer

    d = tmp_path / "oor"
    shutil.copytree(openonerec_hf_dir, d)
    with open(d / ITEMIC_JSON, "w") as f:
        json.dump({"scheme": "openonerec"}, f)
    vocab = ItemicVocab.load(str(d))
    hf = AutoTokenizer.from_pretrained(openonerec_hf_dir)
    assert vocab.item_ids(None, (1365, 6550, 1375)) == hf.convert_tokens_to_ids(
        ["<|sid_begin|>", "<s_a_1365>", "<s_b_6550>", "<s_c_1375>", "<|sid_end|>"])
    assert ItemicScheme.load(str(d)) == preset("openonerec")
    with open(d / ITEMIC_JSON, "w") as f:  # the wrong scheme for this tokenizer: its tokens are missing
        json.dump({"scheme": "onereason_report"}, f)
    with pytest.raises(ValueError, match=r"itemic_tokens.json: lacks .* \(first missing: '<\|video_begin\|>'\)"):
        ItemicVocab.load(str(d))
    with open(d / ITEMIC_JSON, "w") as f:
        json.dump({"scheme": "sid_v2"}, f)
    with pytest.raises(ValueError, match=r"oor/itemic_tokens.json: field 'scheme': unknown itemic scheme 'sid_v2'"):
        ItemicVocab.load(str(d))
    with open(d / ITEMIC_JSON, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="itemic_tokens.json: not valid JSON"):
        ItemicScheme.load(str(d))
    with pytest.raises(FileNotFoundError, match="import_itemic_vocab"):
        ItemicVocab.load(str(tmp_path))
