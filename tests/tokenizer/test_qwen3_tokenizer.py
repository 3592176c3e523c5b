"""The locally built Qwen3-style tokenizer and tiny HF model directory."""
import json
import os
import runpy
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from megatron_onereason.model.hf_qwen3 import make_hf_qwen3
from megatron_onereason.model.qwen3_config import qwen3_preset
from megatron_onereason.tokenizer.qwen3_tokenizer import build_tiny_qwen3_tokenizer, save_tiny_hf_qwen3

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Qwen3's added tokens in id order (Qwen/Qwen3-8B tokenizer_config.json, ids 151643..151668), special or not.
QWEN3_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    build_tiny_qwen3_tokenizer(1024).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def test_size_added_tokens_and_roles(tok):
    n = len(tok)
    assert n <= 1024
    assert [tok.convert_ids_to_tokens(i) for i in range(n - 26, n)] == [c for c, _ in QWEN3_ADDED]
    assert max(tok.get_vocab().values()) == n - 1
    specials = set(tok.all_special_tokens)
    assert {c for c, special in QWEN3_ADDED if special} <= specials
    assert not {c for c, special in QWEN3_ADDED if not special} & specials
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)


def test_smaller_budget_and_determinism():
    small = build_tiny_qwen3_tokenizer(400)
    assert len(small) <= 400
    again = build_tiny_qwen3_tokenizer(400)
    assert small.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
    with pytest.raises(ValueError, match="too small"):
        build_tiny_qwen3_tokenizer(281)


def test_qwen2_pretokenization_and_bpe(tok):
    # Qwen2's split regex isolates every digit; trained merges make frequent words single tokens.
    assert tok.tokenize("2025") == ["2", "0", "2", "5"]
    assert len(tok.tokenize(" the")) == 1
    sentence = "The user watched the video because they like music"
    assert len(tok.encode(sentence)) < len(sentence) / 3
    # Added tokens are matched atomically; <think> survives skip_special_tokens, <|im_end|> does not.
    ids = tok.encode("<think>\nwhy\n</think>\n\nok<|im_end|>")
    assert ids[0] == tok.convert_tokens_to_ids("<think>") and ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nwhy\n</think>\n\nok"


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=80))
def test_ascii_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_fixed(tok):
    for text in ["", " ", "  leading and trailing  ", "a\r\nb\n\n\tc", "it's 12:30 -- don't! (x+y)^2 {json: [1,2]}"]:
        assert tok.decode(tok.encode(text)) == text


SYS = {"role": "system", "content": "You recommend videos."}
USER = {"role": "user", "content": "What next?"}


def render(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=False, **kw)


def test_chat_template_thinking_answer(tok):
    expected = (
        "<|im_start|>system\nYou recommend videos.<|im_end|>\n"
        "<|im_start|>user\nWhat next?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nThe user likes cats.\n</think>\n\nA cat video.<|im_end|>\n"
    )
    with_field = {"role": "assistant", "content": "A cat video.", "reasoning_content": "The user likes cats."}
    inline = {"role": "assistant", "content": "<think>\nThe user likes cats.\n</think>\n\nA cat video."}
    assert render(tok, [SYS, USER, with_field]) == expected
    assert render(tok, [SYS, USER, inline]) == expected


def test_chat_template_non_thinking_answer_has_empty_think_block(tok):
    expected = (
        "<|im_start|>user\nWhat next?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nA cat video.<|im_end|>\n"
    )
    assert render(tok, [USER, {"role": "assistant", "content": "A cat video."}]) == expected


def test_chat_template_generation_prompt(tok):
    prompt = "<|im_start|>system\nYou recommend videos.<|im_end|>\n<|im_start|>user\nWhat next?<|im_end|>\n"
    assert render(tok, [SYS, USER], add_generation_prompt=True) == prompt + "<|im_start|>assistant\n"
    assert render(tok, [SYS, USER], add_generation_prompt=True, enable_thinking=True) == (
        prompt + "<|im_start|>assistant\n"
    )
    assert render(tok, [SYS, USER], add_generation_prompt=True, enable_thinking=False) == (
        prompt + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_chat_template_drops_reasoning_of_earlier_turns(tok):
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
    ]
    assert render(tok, messages) == (
        "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n<think>\nr2\n</think>\n\na2<|im_end|>\n"
    )


@pytest.mark.parametrize("untied", [False, True])
def test_tiny_hf_dir_via_cli(tmp_path, monkeypatch, untied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "model")
    argv = ["make_tiny_qwen3.py", "--out", out, "--seed", "3"] + (["--untied"] if untied else [])
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(REPO, "tools", "make_tiny_qwen3.py"), run_name="__main__")
    assert done.value.code == 0

    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["vocab_size"] == 1024 and config["tie_word_embeddings"] is (not untied)
    # The weights are exactly make_hf_qwen3's for the same seed.
    cfg = qwen3_preset("tiny")
    if untied:
        import dataclasses

        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    reference = make_hf_qwen3(cfg, seed=3).state_dict()
    saved = load_file(os.path.join(out, "model.safetensors"))
    assert ("lm_head.weight" in saved) is untied
    for name, tensor in saved.items():
        assert torch.equal(tensor, reference[name]), name

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok.apply_chat_template([USER], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == 1024 and torch.isfinite(logits).all()
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert model.generation_config.eos_token_id == [im_end, eot] and not model.generation_config.do_sample


def test_save_refuses_existing_dir_and_leaves_no_temp(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        save_tiny_hf_qwen3(str(out))
    assert os.listdir(tmp_path) == ["m"] and os.listdir(out) == []
