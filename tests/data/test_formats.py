"""Sample formats: loss on exactly the intended tokens, Qwen3 chat-template parity, itemic checks, input errors."""
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from megatron_onereason.data.formats import (
    FormatConfig,
    SampleEncoder,
    SampleError,
    iter_input,
    parse_json_line,
    parse_sample,
)
from megatron_onereason.tokenizer.itemic_tokens import ITEMIC_JSON, ItemicVocab


@pytest.fixture(scope="module")
def encoder(tokenizers_3x32):
    return SampleEncoder(tokenizers_3x32["extended"])


@pytest.fixture(scope="module")
def hf_tok(tokenizers_3x32):
    return AutoTokenizer.from_pretrained(tokenizers_3x32["extended"])


def _encode_one(encoder, record):
    out = encoder.encode([parse_sample(record)])[0]
    if isinstance(out, SampleError):
        raise out
    return out


def _expected(hf_tok, runs):
    """Tokens and mask for hand-written (text, loss) runs, each tokenized alone by the HF tokenizer."""
    ids = [hf_tok.encode(text, add_special_tokens=False) for text, _ in runs]
    mask = [[int(loss)] * len(i) for i, (_, loss) in zip(ids, runs)]
    return sum(ids, []), sum(mask, [])


# ------------------------------------------------------------------------------------------ segments
def test_segments_of_itemic_tokens_token_by_token(encoder, tokenizers_3x32):
    vocab = ItemicVocab.load(tokenizers_3x32["extended"])
    out = _encode_one(encoder, {"segments": [{"text": "<|prod_begin|><a_1><b_2><c_3>", "loss": False},
                                             {"text": "<|video_begin|><a_4><b_5><c_31>", "loss": True}]})
    first_id = vocab.id_ranges[0][0]
    begin_prod, begin_video = first_id + 1, first_id  # domains: video, prod, ...
    a, b, c = (first_id + 5 + level * 32 for level in range(3))
    assert out.tokens.tolist() == [begin_prod, a + 1, b + 2, c + 3, begin_video, a + 4, b + 5, c + 31, encoder.eod_id]
    assert out.lossmask.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert out.tokens.dtype == np.int32 and out.lossmask.dtype == np.uint8 and out.itemic_tokens == 8


def test_segments_text_and_items(encoder, hf_tok, tokenizers_3x32):
    context = "User: Please describe <|prod_begin|><a_1><b_2><c_3>, and <a_7><b_9>.\nAssistant: "
    record = {"segments": [{"text": context, "loss": False}, {"text": "A cozy video about tea.", "loss": True},
                           {"text": "", "loss": False}, {"text": " More context", "loss": False}],
              "source": "captions", "domain": "prod"}
    out = _encode_one(encoder, record)
    # EOD follows the last segment's loss flag (here: context, so no loss).
    tokens, mask = _expected(hf_tok, [(context, False), ("A cozy video about tea.", True), (" More context", False),
                                      ("<|endoftext|>", False)])
    assert out.tokens.tolist() == tokens and out.lossmask.tolist() == mask
    assert hf_tok.decode(out.tokens[out.lossmask == 1]) == "A cozy video about tea."
    assert out.itemic_tokens == 6
    sample = parse_sample(record)
    assert (sample.source, sample.domain, sample.kind) == ("captions", "prod", "segments")
    no_eod = SampleEncoder(tokenizers_3x32["extended"], FormatConfig(append_eod=False)).encode([sample])[0]
    assert no_eod.tokens.tolist() == tokens[:-1]


# ------------------------------------------------------------------------------------------ chat
SYS = {"role": "system", "content": "You know items."}
CONVERSATIONS = {
    "thinking": [{"role": "user", "content": "Describe <|video_begin|><a_1><b_2><c_3>."},
                 {"role": "assistant", "content": "A dance video.", "reasoning": "The a code says dance."}],
    "non_thinking": [SYS, {"role": "user", "content": "Describe it /no_think"},
                     {"role": "assistant", "content": "A dance video."}],
    "multi_turn_drops_earlier_reasoning": [
        SYS, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "reasoning": "r1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "reasoning": "r2"}],
    "two_assistants_after_query": [
        {"role": "user", "content": "q1 /think"}, {"role": "assistant", "content": "a1", "reasoning": "\nr1\n"},
        {"role": "assistant", "content": "\na2"}, {"role": "assistant", "content": "a3", "reasoning": "r3"}],
    "system_later": [{"role": "user", "content": "q1"}, {"role": "system", "content": "be brief"},
                     {"role": "assistant", "content": "a1"}],
}


def _hf_messages(messages):
    """The same conversation as HF's chat template expects it (reasoning is ``reasoning_content`` there)."""
    out = []
    for m in messages:
        m = dict(m)
        if "reasoning" in m:
            m["reasoning_content"] = m.pop("reasoning")
        out.append(m)
    return out


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_matches_qwen3_template(encoder, hf_tok, name):
    messages = CONVERSATIONS[name]
    want_text = hf_tok.apply_chat_template(_hf_messages(messages), tokenize=False)
    sample = parse_sample({"messages": messages, "source": "sft"})
    assert "".join(s.text for s in sample.segments) == want_text
    out = encoder.encode([sample])[0]
    assert out.tokens.tolist() == hf_tok.encode(want_text, add_special_tokens=False)
    # Loss only inside assistant turns: between "<|im_start|>assistant\n" and the end of its "<|im_end|>".
    assert (out.lossmask == 1).sum() > 0
    text_with_loss = hf_tok.decode(out.tokens[out.lossmask == 1])
    assert "<|im_start|>" not in text_with_loss and "user" not in text_with_loss


def test_chat_thinking_token_by_token(encoder, hf_tok):
    out = _encode_one(encoder, {"messages": CONVERSATIONS["thinking"]})
    tokens, mask = _expected(hf_tok, [
        ("<|im_start|>user\nDescribe <|video_begin|><a_1><b_2><c_3>.<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\nThe a code says dance.\n</think>\n\nA dance video.<|im_end|>", True),
        ("\n", False),
    ])
    assert out.tokens.tolist() == tokens and out.lossmask.tolist() == mask


def test_chat_multi_turn_token_by_token(encoder, hf_tok):
    sample = parse_sample({"messages": CONVERSATIONS["multi_turn_drops_earlier_reasoning"]})
    assert sample.dropped_reasoning == 1  # r1 precedes the last user message: Qwen3's template drops it
    out = encoder.encode([sample])[0]
    tokens, mask = _expected(hf_tok, [
        ("<|im_start|>system\nYou know items.<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n",
         False),
        ("a1<|im_end|>", True),
        ("\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\nr2\n</think>\n\na2<|im_end|>", True),
        ("\n", False),
    ])
    assert out.tokens.tolist() == tokens and out.lossmask.tolist() == mask


def test_chat_non_thinking_has_empty_think_block_with_loss(encoder, hf_tok):
    out = _encode_one(encoder, {"messages": CONVERSATIONS["non_thinking"]})
    assert hf_tok.decode(out.tokens[out.lossmask == 1]) == "<think>\n\n</think>\n\nA dance video.<|im_end|>"


@pytest.mark.parametrize("record, reason, match", [
    ({"messages": [{"role": "user", "content": "x /no_think"}, {"role": "assistant", "content": "y",
                                                                 "reasoning": "r"}]}, "mode_switch", "/no_think"),
    ({"messages": [{"role": "system", "content": "/think"}, {"role": "user", "content": "x"},
                   {"role": "assistant", "content": "y"}]}, "mode_switch", "/think"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "<think>r</think>y"}]},
     "schema", "reasoning"),  # the strict format wants it in 'reasoning'; openonerec / auto split it off
    ({"messages": [{"role": "user", "content": "x"}]}, "no_target", "no assistant"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "schema", "role"),
    ({"messages": [{"role": "user", "content": "x", "reasoning": "r"}, {"role": "assistant", "content": "y"}]},
     "schema", "only assistant"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "schema", "content"),
    ({"messages": []}, "schema", "non-empty"),
    ({"segments": [{"text": "x", "loss": False}]}, "no_target", "nothing to train"),
    ({"segments": [{"text": "x", "loss": "yes"}]}, "schema", "boolean"),
    ({"segments": [{"text": "x", "loss": True}], "messages": []}, "schema", "exactly one"),
    ({"text": "x"}, "schema", "exactly one"),
    ({"segments": [{"text": "x"}]}, "schema", "boolean 'loss'$"),
    ({"segments": [{"text": "x", "loss": True}], "source": 3}, "schema", "'source' must be a string"),
])
def test_invalid_samples(record, reason, match):
    with pytest.raises(SampleError, match=match) as e:
        parse_sample(record, FormatConfig(input_format="onereason"))
    assert e.value.reason == reason


def test_invalid_json():
    with pytest.raises(SampleError, match="invalid JSON") as e:
        parse_json_line("{not json")
    assert e.value.reason == "invalid_json"
    with pytest.raises(SampleError, match="JSON object"):
        parse_json_line("[1, 2]")


# ------------------------------------------------------------------------------------------ itemic checks
@pytest.mark.parametrize("text, match", [
    ("see <|prod_begin|><a_1><b_2><c_32>", "codebook size 32"),  # code outside the 32-code vocabulary
    ("see <a_40>", "codebook size 32"),  # a bare code token too
    ("see <d_1>", "level d outside the scheme's 3 levels"),  # a fourth level the vocabulary does not have
    ("see <|prod_begin|><a_1><b_2> then", "malformed itemic pattern"),
    ("see <|music_begin|><a_1><b_2><c_3>", "unknown itemic domain"),
    ("see <a_01>", "tokenizer produced 0"),  # valid code, but not the token's spelling
])
def test_itemic_errors(encoder, text, match):
    good = parse_sample({"segments": [{"text": "<a_3><b_4> ok", "loss": True}]})
    bad = parse_sample({"segments": [{"text": text, "loss": True}]})
    out = encoder.encode([good, bad, good])
    assert isinstance(out[1], SampleError) and out[1].reason == "itemic"
    with pytest.raises(SampleError, match=match):
        raise out[1]
    assert out[0].itemic_tokens == 2 and out[0].tokens.tolist() == out[2].tokens.tolist()


def test_tokenizer_without_itemic_tokens_is_caught(tmp_path, tokenizers_3x32):
    """itemic_tokens.json next to a tokenizer that lacks the tokens: refused before any sample, naming the file."""
    fake = tmp_path / "fake"
    shutil.copytree(tokenizers_3x32["base"], fake)
    shutil.copy(f"{tokenizers_3x32['extended']}/{ITEMIC_JSON}", fake / ITEMIC_JSON)
    with pytest.raises(ValueError, match=r"fake/itemic_tokens.json: lacks 101 of the 101 tokens"):
        SampleEncoder(str(fake))


def test_tokenizer_without_itemic_vocabulary_encodes_text_and_refuses_items_per_record(hf_tok, tokenizers_3x32):
    """A plain Qwen3 tokenizer: text records encode as with HF; a record writing any scheme's item is refused alone."""
    base = AutoTokenizer.from_pretrained(tokenizers_3x32["base"])
    encoder = SampleEncoder(tokenizers_3x32["base"])
    texts = ["Plain text, no items.", "see <|video_begin|><a_1><b_2><c_3>", "see <s_a_5>", "<|sid_begin|> x",
             "a <tool_call> and <|box_end|> are not items"]
    out = encoder.encode([parse_sample({"text": t}) for t in texts])
    for text, got in zip(texts, out):
        if isinstance(got, SampleError):
            assert got.reason == "itemic" and "has no itemic vocabulary" in str(got), text
        else:
            assert got.tokens.tolist() == base.encode(text, add_special_tokens=False) + [encoder.eod_id]
            assert got.lossmask.all() and got.itemic_tokens == 0
    assert [isinstance(o, SampleError) for o in out] == [False, True, True, True, False]


# ------------------------------------------------------------------------------------------ input files
def test_parquet_rows_parse_like_json(tmp_path):
    records = [
        {"segments": [{"text": "ctx ", "loss": False}, {"text": "tgt", "loss": True}], "source": "a",
         "domain": "video"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "r"}],
         "source": "b"},
    ]
    path = str(tmp_path / "x.parquet")
    # One schema for both kinds: each row has nulls in the other kind's column (and absent struct fields).
    pq.write_table(pa.Table.from_pylist([{"segments": None, "messages": None, "domain": None, **r}
                                         for r in records]), path)
    rows = list(iter_input(path))
    assert [n for n, _ in rows] == [1, 2]
    assert [parse_sample(r) for _, r in rows] == [parse_sample(r) for r in records]
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [parse_sample(parse_json_line(line)) for _, line in iter_input(str(jsonl))] == \
        [parse_sample(r) for r in records]
