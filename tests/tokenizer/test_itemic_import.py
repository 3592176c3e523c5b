"""tools/import_itemic_vocab.py: the itemic tokens a checkpoint already has, detected and recorded, or refused with
the reason. Oracle: the HF tokenizer's own ids for every token; checkpoints built the way their authors build them."""
import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from megatron_onereason.tokenizer.itemic_import import detect_scheme, import_itemic_vocab
from megatron_onereason.tokenizer.itemic_tokens import ITEMIC_JSON, ItemicVocab, preset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def base_tokenizer(tmp_path_factory):
    from megatron_onereason.tokenizer.qwen3_tokenizer import build_tiny_qwen3_tokenizer

    path = str(tmp_path_factory.mktemp("base_tok"))
    build_tiny_qwen3_tokenizer(1024).save_pretrained(path)
    return path


def _tokenizer_dir(base, path, tokens):
    """A tokenizer-only directory: ``base`` plus ``tokens`` added with plain ``add_tokens``."""
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(list(tokens))
    tok.save_pretrained(str(path))
    return str(path)


def test_openonerec_checkpoint_is_detected_and_linked(openonerec_hf_dir, tmp_path):
    out = str(tmp_path / "out")
    vocab = import_itemic_vocab(openonerec_hf_dir, out)
    assert vocab.scheme == preset("openonerec") and vocab.scheme.token_order == "codes_first"
    hf = AutoTokenizer.from_pretrained(openonerec_hf_dir)
    tokens = vocab.scheme.token_strings()
    assert [vocab.item_ids(None, (c, c, c))[1:4] for c in (0, 8191)] == [
        hf.convert_tokens_to_ids([f"<s_{x}_{c}>" for x in "abc"]) for c in (0, 8191)]
    first = hf.convert_tokens_to_ids("<s_a_0>")
    assert hf.convert_tokens_to_ids(tokens) == list(range(first, first + len(tokens)))  # their layout: one block
    assert vocab.id_ranges == [(first, first + 3 * 8192 + 2)]
    for name in os.listdir(openonerec_hf_dir):  # hard links, not copies
        assert os.path.samefile(os.path.join(openonerec_hf_dir, name), os.path.join(out, name))
    assert ItemicVocab.load(out) == vocab
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vocab_size"] % 256 == 0  # their padding, kept
    with pytest.raises(ValueError, match="already has itemic_tokens.json"):
        import_itemic_vocab(out, str(tmp_path / "again"))
    with pytest.raises(FileExistsError):
        import_itemic_vocab(openonerec_hf_dir, out)


def test_per_domain_tokens_are_detected_in_id_order(base_tokenizer, tmp_path):
    scheme = preset("onereason", codebook_size=8, domains=["prod", "video"])
    path = _tokenizer_dir(base_tokenizer, tmp_path / "t", scheme.token_strings())
    vocab = import_itemic_vocab(path, str(tmp_path / "out"))
    assert vocab.scheme == scheme
    hf = AutoTokenizer.from_pretrained(path)
    assert vocab.item_ids("video", (7, 0, 3)) == hf.encode("<|video_begin|><s_a_7><s_b_0><s_c_3><|video_end|>")
    # the report's notation (no end token), codes added before the begin tokens
    report = preset("onereason_report", codebook_size=8, domains=["video", "ad"])
    path = _tokenizer_dir(base_tokenizer, tmp_path / "r", report.token_strings()[2:] + report.token_strings()[:2])
    got = import_itemic_vocab(path, str(tmp_path / "out_r")).scheme
    assert (got.name, got.domains, got.end_token, got.token_order) == ("onereason_report", ("video", "ad"), None,
                                                                       "codes_first")


@pytest.mark.parametrize("case, message", [
    ("two_families", r"ambiguous itemic tokens: <a_N> \(24 tokens\), <s_a_N> \(24 tokens\); choose one with --scheme"),
    ("gap", r"incomplete itemic vocabulary: level b has 7 of 8 codes \(first missing: <s_b_5>\)"),
    ("no_level_a", r"levels \['b', 'c'\], not a, b, c"),
    ("no_begin", "no <|…_begin|> token"),
    ("some_ends", r"end tokens for \['video'\] but not for \['prod'\]"),
    ("nothing", "has no itemic code tokens"),
])
def test_ambiguous_or_incomplete_tokens_are_refused(base_tokenizer, tmp_path, case, message):
    oor = preset("openonerec", codebook_size=8).token_strings()
    tokens = {
        "two_families": oor + preset("onereason_report", codebook_size=8).token_strings(),
        "gap": [t for t in oor if t != "<s_b_5>"],
        "no_level_a": [t for t in oor if not t.startswith("<s_a_")],
        "no_begin": [t for t in oor if not t.startswith("<|")],
        "some_ends": [t for t in preset("onereason", codebook_size=8, domains=["video", "prod"]).token_strings()
                      if t != "<|prod_end|>"],
        "nothing": [],
    }[case]
    path = _tokenizer_dir(base_tokenizer, tmp_path / "t", tokens)
    with pytest.raises(ValueError, match=message.replace("|", r"\|") if case == "no_begin" else message):
        import_itemic_vocab(path, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_a_preset_name_resolves_ambiguity(base_tokenizer, tmp_path):
    tokens = preset("openonerec", codebook_size=8).token_strings() + \
        preset("onereason_report", codebook_size=4, domains=["video"]).token_strings()
    path = _tokenizer_dir(base_tokenizer, tmp_path / "t", tokens)
    table = AutoTokenizer.from_pretrained(path).get_vocab()
    assert detect_scheme(table, "openonerec") == preset("openonerec", codebook_size=8)
    # a per-domain preset takes every begin token of the tokenizer as a domain, in id order
    assert detect_scheme(table, "onereason_report") == preset("onereason_report", codebook_size=4,
                                                              domains=["sid", "video"])
    with pytest.raises(ValueError, match=r"no code tokens of scheme 'onereason' \(like '<s_a_0>'\)|no <\|domain"):
        detect_scheme({t: i for i, t in enumerate(preset("onereason_report").token_strings())}, "onereason")


def test_cli(openonerec_hf_dir, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, os.path.join(REPO, "tools", "import_itemic_vocab.py"), *args],
                              capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))

    out = str(tmp_path / "out")
    proc = run("--hf-dir", openonerec_hf_dir, "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["scheme"]["name"] == "openonerec" and summary["num_itemic_tokens"] == 3 * 8192 + 2
    assert os.path.exists(os.path.join(out, ITEMIC_JSON))
    proc = run("--hf-dir", openonerec_hf_dir, "--out-dir", str(tmp_path / "x"), "--scheme", "onereason_report")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "no code tokens of scheme 'onereason_report'" in proc.stderr and not os.path.exists(tmp_path / "x")
