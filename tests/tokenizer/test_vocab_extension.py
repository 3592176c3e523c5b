"""Itemic vocabulary extension: N(mean, cov) init of new rows, bit-identical old rows, streamed shards."""
import dataclasses
import filecmp
import json
import os
import runpy
import shutil
import sys

import pytest
import torch
from safetensors import safe_open

from megatron_onereason.model.hf_qwen3 import make_hf_qwen3
from megatron_onereason.model.qwen3_config import qwen3_preset
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab, preset
from megatron_onereason.tokenizer.qwen3_tokenizer import build_tiny_qwen3_tokenizer, save_tiny_hf_qwen3
from megatron_onereason.tokenizer.vocab_extension import extend_vocabulary, sample_new_rows

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LEVELS, CODEBOOK = 3, 64
NUM_NEW = 5 + LEVELS * CODEBOOK
SCHEME = preset("onereason_report", LEVELS, CODEBOOK)


# ------------------------------------------------------------------------------------------ sample_new_rows
def _stats(x):
    x = x.double()
    return x.mean(0), torch.cov(x.T)


def _matches_distribution(reference, sample):
    """Sample mean within 5 standard errors per coordinate; covariance within 10% (relative Frobenius)."""
    (m_ref, c_ref), (m, c) = _stats(reference), _stats(sample)
    z = ((m - m_ref) / (c_ref.diagonal() / sample.shape[0]).sqrt()).abs().max()
    rel = torch.linalg.norm(c - c_ref) / torch.linalg.norm(c_ref)
    return bool(z < 5) and bool(rel < 0.1)


@pytest.fixture(scope="module")
def correlated_rows():
    """10000 rows (> one statistics chunk) in 64-d; non-zero mean, rotated and strongly anisotropic covariance."""
    g = torch.Generator().manual_seed(123)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    scales = torch.logspace(-2, 0, 64, dtype=torch.float64)
    mean = torch.randn(64, generator=g, dtype=torch.float64)
    return (mean + (torch.randn(10000, 64, generator=g, dtype=torch.float64) * scales) @ q.T).float()


def test_new_rows_follow_mean_and_covariance(correlated_rows):
    new = sample_new_rows(correlated_rows, 20000, torch.Generator().manual_seed(0))
    assert new.shape == (20000, 64) and new.dtype == torch.float32
    assert _matches_distribution(correlated_rows, new)
    # The check is sharp enough to reject a wrong init: N(0, I), and the right marginals without correlations.
    g = torch.Generator().manual_seed(1)
    assert not _matches_distribution(correlated_rows, torch.randn(20000, 64, generator=g))
    mean, cov = _stats(correlated_rows)
    independent = mean + torch.randn(20000, 64, generator=g, dtype=torch.float64) * cov.diagonal().sqrt()
    assert not _matches_distribution(correlated_rows, independent)


def test_sampling_is_seeded_keeps_dtype_and_handles_rank_deficiency(correlated_rows):
    bf16 = correlated_rows.bfloat16()
    a = sample_new_rows(bf16, 100, torch.Generator().manual_seed(5))
    b = sample_new_rows(bf16, 100, torch.Generator().manual_seed(5))
    c = sample_new_rows(bf16, 100, torch.Generator().manual_seed(6))
    assert a.dtype == torch.bfloat16 and torch.equal(a, b) and not torch.equal(a, c)
    few = sample_new_rows(correlated_rows[:10], 50, torch.Generator().manual_seed(0))  # 10 rows in 64-d: singular
    assert torch.isfinite(few).all()
    with pytest.raises(ValueError, match="at least 2 rows"):
        sample_new_rows(correlated_rows[:1], 3, torch.Generator())


# ------------------------------------------------------------------------------------------ directories
def _tensors(hf_dir):
    out = {}
    for fname in sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors")):
        with safe_open(os.path.join(hf_dir, fname), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tied single-file model whose tokenizer (1000) is smaller than its vocab (1024), and an untied sharded one."""
    root = tmp_path_factory.mktemp("src")
    tied = str(root / "tied")
    save_tiny_hf_qwen3(tied, "tiny", seed=0, tokenizer_vocab_size=1000)
    sharded = str(root / "untied_sharded")
    cfg = dataclasses.replace(qwen3_preset("tiny"), tie_word_embeddings=False)
    make_hf_qwen3(cfg, seed=1).save_pretrained(sharded, max_shard_size="200KB")
    build_tiny_qwen3_tokenizer(1024).save_pretrained(sharded)
    return {"tied": tied, "sharded": sharded}


@pytest.fixture(scope="module")
def extended(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    return {
        key: (str(root / key), extend_vocabulary(src, str(root / key), SCHEME, seed=0))
        for key, src in sources.items()
    }


@pytest.mark.parametrize("key", ["tied", "sharded"])
def test_rows_config_and_layout(sources, extended, key):
    src, (out, vocab) = sources[key], extended[key]
    assert vocab == ItemicVocab.load(out)
    first_id = 1000 if key == "tied" else 1024
    assert (vocab.original_vocab_size, vocab.id_ranges) == (1024, [(first_id, first_id + NUM_NEW)])
    # markers first (today's layout): begin tokens in domain order, then level a, b, c codes
    assert vocab.begin_id("video") == first_id and vocab.code_id(0, 0) == first_id + 5
    assert vocab.code_id(2, CODEBOOK - 1) == first_id + NUM_NEW - 1

    with open(os.path.join(src, "config.json")) as f:
        old_config = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        new_config = json.load(f)
    assert new_config.pop("vocab_size") == first_id + NUM_NEW
    old_config.pop("vocab_size")
    assert new_config == old_config

    old, new = _tensors(src), _tensors(out)
    assert old.keys() == new.keys()
    vocab_names = ["model.embed_tokens.weight"] + (["lm_head.weight"] if key == "sharded" else [])
    generator = torch.Generator().manual_seed(0)  # documented order: embedding first, then lm_head
    for name in vocab_names:
        assert new[name].shape == (first_id + NUM_NEW, 64)
        assert torch.equal(new[name][:first_id], old[name][:first_id])
        assert torch.equal(new[name][first_id:], sample_new_rows(old[name][:first_id], NUM_NEW, generator))
    for name in old.keys() - set(vocab_names):
        assert torch.equal(new[name], old[name]), name


def test_sharded_index_and_untouched_shards(sources, extended):
    src, (out, _) = sources["sharded"], extended["sharded"]
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        old_index = json.load(f)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        new_index = json.load(f)
    assert new_index["weight_map"] == old_index["weight_map"]
    assert new_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors(out).values())
    vocab_shards = {old_index["weight_map"][n] for n in ("model.embed_tokens.weight", "lm_head.weight")}
    shards = set(old_index["weight_map"].values())
    assert len(shards - vocab_shards) >= 2
    for fname in shards - vocab_shards:
        assert filecmp.cmp(os.path.join(src, fname), os.path.join(out, fname), shallow=False), fname


@pytest.mark.parametrize("key", ["tied", "sharded"])
def test_extended_tokenizer_and_model(sources, extended, key):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, (out, vocab) = sources[key], extended[key]
    old_tok, tok = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(out)
    assert len(tok) == vocab.max_id + 1
    first_id = vocab.id_ranges[0][0]
    assert tok.encode("<|prod_begin|><a_12><b_7><c_3>") == vocab.item_ids("prod", (12, 7, 3))
    text = "I liked<|video_begin|><a_0><b_63><c_5>, then <think>\nmore\n</think> it."
    ids = tok.encode(text)
    assert vocab.item_ids("video", (0, 63, 5)) == [i for i in ids if vocab.is_itemic(i)]
    assert tok.decode(ids, skip_special_tokens=True) == text
    plain = "The user watched 3 videos about cats.<|im_end|>"
    assert tok.encode(plain) == old_tok.encode(plain)
    assert tok.chat_template == old_tok.chat_template

    # Old tokens' logits are unchanged: their embedding and output rows are the same bits.
    old_model, model = AutoModelForCausalLM.from_pretrained(src), AutoModelForCausalLM.from_pretrained(out)
    x = torch.tensor([old_tok.encode(plain)])
    with torch.no_grad():
        old_logits, new_logits = old_model(x).logits, model(x).logits
        itemic_logits = model(torch.tensor([ids])).logits
    assert new_logits.shape[-1] == vocab.max_id + 1
    torch.testing.assert_close(new_logits[..., :first_id], old_logits[..., :first_id], rtol=0, atol=1e-5)
    assert torch.isfinite(itemic_logits).all()


def test_refuses_extended_input_and_existing_output(extended, tmp_path):
    out, _ = extended["tied"]
    with pytest.raises(ValueError, match="itemic_tokens.json"):
        extend_vocabulary(out, str(tmp_path / "again"), SCHEME)
    no_json = str(tmp_path / "no_json")
    shutil.copytree(out, no_json)
    os.remove(os.path.join(no_json, "itemic_tokens.json"))
    for other in ("onereason_report", "openonerec"):  # a second, disjoint itemic vocabulary: refused too
        with pytest.raises(ValueError, match=r"already has 192 itemic-looking tokens \(e\.g\. '<a_0>'\)"):
            extend_vocabulary(no_json, str(tmp_path / "again"), preset(other, codebook_size=8))
    with pytest.raises(FileExistsError, match="already exists"):
        extend_vocabulary(no_json, out, SCHEME)
    assert not os.path.exists(tmp_path / "again")


def test_overwrite_is_deterministic(sources, extended):
    out, _ = extended["tied"]
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        before = f.read()
    extend_vocabulary(sources["tied"], out, SCHEME, seed=0, overwrite=True)
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        assert f.read() == before
    assert not [e for e in os.listdir(os.path.dirname(out)) if e.startswith(".")]


def test_bad_input_leaves_no_output(sources, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(sources["tied"], bad)
    with open(os.path.join(bad, "config.json")) as f:
        config = json.load(f)
    config["vocab_size"] = 2048  # disagrees with the embedding's 1024 rows
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"model\.safetensors: model\.embed_tokens\.weight has shape"):
        extend_vocabulary(bad, str(tmp_path / "out"), SCHEME)
    assert sorted(os.listdir(tmp_path)) == ["bad"]


def test_cli(sources, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "cli")
    argv = ["extend_vocab.py", "--hf-dir", sources["tied"], "--out-dir", out]
    argv += ["--levels", "2", "--codebook-size", "16", "--domains", "prod,video", "--seed", "7"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(os.path.join(REPO, "tools", "extend_vocab.py"), run_name="__main__")
    assert exited.value.code == 0
    vocab = ItemicVocab.load(out)
    assert (vocab.levels, vocab.codebook_size, vocab.domains, vocab.id_ranges) == (2, 16, ["prod", "video"],
                                                                                   [(1000, 1034)])
    assert json.loads(capsys.readouterr().out)["num_itemic_tokens"] == 2 + 2 * 16
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vocab_size"] == 1000 + 34


def test_openonerec_scheme_gives_openonerec_ids(sources, tmp_path):
    """``--scheme openonerec`` assigns every itemic token the id OpenOneRec's expand script gives it (the oracle:
    conftest.expand_like_openonerec, plain ``add_tokens``), so both tokenize the same text identically."""
    from transformers import AutoTokenizer

    from conftest import expand_like_openonerec

    theirs = AutoTokenizer.from_pretrained(expand_like_openonerec(sources["tied"], str(tmp_path / "theirs"),
                                                                  codebook_size=CODEBOOK))
    vocab = extend_vocabulary(sources["tied"], str(tmp_path / "ours"), preset("openonerec", LEVELS, CODEBOOK))
    ours = AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    table = theirs.get_vocab()
    assert len(ours) == len(theirs)
    assert {t: table[t] for t in vocab.scheme.token_strings()} == {t: ours.convert_tokens_to_ids(t)
                                                                   for t in vocab.scheme.token_strings()}
    assert vocab.id_ranges == [(1000, 1000 + 3 * CODEBOOK + 2)] and vocab.begin_id(None) == 1000 + 3 * CODEBOOK
    text = "看过<|sid_begin|><s_a_63><s_b_0><s_c_7><|sid_end|>, then <|sid_begin|><s_a_1>"
    assert ours.encode(text) == theirs.encode(text)


def test_cli_refuses_an_openonerec_checkpoint_in_one_line(openonerec_hf_dir, tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "extend_vocab.py"), "--hf-dir",
                           openonerec_hf_dir, "--out-dir", str(tmp_path / "out"), "--scheme", "openonerec"],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "already has 24576 itemic-looking tokens (e.g. '<s_a_0>')" in proc.stderr
    assert "tools/import_itemic_vocab.py" in proc.stderr
    assert not os.path.exists(tmp_path / "out")
