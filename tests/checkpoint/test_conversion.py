"""HF ⇄ megatron conversion: bit-exact round trips, logits against transformers at every TP/PP, clear errors."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, hf_logits, run_torchrun

HF_TO_MCORE = os.path.join(REPO, "checkpoints_convert", "hf_to_mcore.py")
MCORE_TO_HF = os.path.join(REPO, "checkpoints_convert", "mcore_to_hf.py")


def run_cli(script, *args, check=True):
    proc = subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"{script} {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def hf_tensors(hf_dir):
    out = {}
    for f in glob.glob(os.path.join(hf_dir, "*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def converted(tiny_hf_dirs, tmp_path_factory):
    """Both tiny models converted with TP=2 vocab padding (``--verify``: TP1 logits within 1e-4 of HF)."""
    root = tmp_path_factory.mktemp("mcore")
    out = {}
    for name, hf_dir in tiny_hf_dirs.items():
        out[name] = str(root / name)
        run_cli(HF_TO_MCORE, "--hf-dir", hf_dir, "--out-dir", out[name], "--tp", "2", "--verify", "--no-tokenizer")
    return out


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_round_trip_is_bit_exact_and_loads_in_transformers(name, tiny_hf_dirs, converted, tmp_path):
    import transformers

    back = str(tmp_path / "hf2")
    run_cli(MCORE_TO_HF, "--mcore-dir", converted[name], "--out-dir", back, "--max-shard-bytes", "200000")
    original, exported = hf_tensors(tiny_hf_dirs[name]), hf_tensors(back)
    assert set(original) == set(exported)
    for key, tensor in original.items():
        assert torch.equal(tensor, exported[key]), key
    with open(os.path.join(back, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(tiny_hf_dirs[name], "config.json")) as f:
        source = json.load(f)
    assert config["vocab_size"] == source["vocab_size"]  # padding removed on export
    assert config["tie_word_embeddings"] == source["tie_word_embeddings"]
    assert os.path.exists(os.path.join(back, "model.safetensors.index.json"))  # sharded at 200 kB
    tokens = torch.randint(0, source["vocab_size"], (2, 16))
    torch.testing.assert_close(hf_logits(back, tokens), hf_logits(tiny_hf_dirs[name], tokens), rtol=0, atol=0)
    transformers.AutoModelForCausalLM.from_pretrained(back)  # unmodified transformers loads it


def _packed_documents(vocab, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, n), generator=g) for n in lengths]


@pytest.mark.multiprocess
def test_logits_match_transformers_at_every_layout_and_packing(tiny_hf_dirs, converted, tmp_path):
    """TP1 (as DP2), TP2, PP2 on 2 processes and TP2×PP2 on 4, tied and untied, converted at TP=2.

    Packed: three documents in one sequence with cu_seqlens give each document's own HF logits; the same pack
    under a plain causal mask does not (the check can fail).
    """
    lengths = [7, 12, 5]
    cases = {2: [], 4: []}
    expected = {}
    for name, hf_dir in tiny_hf_dirs.items():
        vocab = json.load(open(os.path.join(hf_dir, "config.json")))["vocab_size"]
        tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))
        tokens_path = str(tmp_path / f"{name}_tokens.pt")
        torch.save(tokens, tokens_path)
        expected[(name, "batch")] = hf_logits(hf_dir, tokens)
        docs = _packed_documents(vocab, lengths, seed=4)
        pack_path, cu_path = str(tmp_path / f"{name}_pack.pt"), str(tmp_path / "cu.pt")
        torch.save(torch.cat(docs, dim=1), pack_path)
        torch.save(torch.tensor([0, 7, 19, 24], dtype=torch.int32), cu_path)
        expected[(name, "docs")] = torch.cat([hf_logits(hf_dir, d) for d in docs], dim=1)
        for world, layouts in ((2, [(1, 1), (2, 1), (1, 2)]), (4, [(2, 2)])):
            for tp, pp in layouts:
                tag = f"{name}_tp{tp}_pp{pp}"
                cases[world].append(dict(ckpt=converted[name], tp=tp, pp=pp, tokens=tokens_path,
                                         out=str(tmp_path / f"{tag}_batch.pt")))
                cases[world].append(dict(ckpt=converted[name], tp=tp, pp=pp, tokens=pack_path, cu_seqlens=cu_path,
                                         out=str(tmp_path / f"{tag}_packed.pt")))
                if world == 2:
                    cases[world].append(dict(ckpt=converted[name], tp=tp, pp=pp, tokens=pack_path,
                                             out=str(tmp_path / f"{tag}_causal.pt")))
    for world, world_cases in cases.items():
        cases_path = str(tmp_path / f"cases{world}.json")
        json.dump(world_cases, open(cases_path, "w"))
        run_torchrun(os.path.join(REPO, "tests", "dist_workers", "logits_worker.py"), world, [cases_path])

    for name in tiny_hf_dirs:
        for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2)]:
            tag = f"{name}_tp{tp}_pp{pp}"
            batch = torch.load(str(tmp_path / f"{tag}_batch.pt"))
            assert (batch - expected[(name, "batch")]).abs().max() < 1e-4, tag
            packed = torch.load(str(tmp_path / f"{tag}_packed.pt"))
            assert (packed - expected[(name, "docs")]).abs().max() < 1e-4, tag
            if (tp, pp) != (2, 2):
                causal = torch.load(str(tmp_path / f"{tag}_causal.pt"))
                # The first document is unaffected by later ones; the others must see leakage.
                assert (causal[:, :7] - expected[(name, "docs")][:, :7]).abs().max() < 1e-4, tag
                assert (causal[:, 7:] - expected[(name, "docs")][:, 7:]).abs().max() > 1e-2, tag


def test_export_refuses_checkpoint_that_does_not_match_its_config(converted, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(converted["tied"], broken)
    info_path = os.path.join(broken, "onereason_model.json")
    info = json.load(open(info_path))
    info["qwen3"]["ffn_hidden_size"] *= 2
    json.dump(info, open(info_path, "w"))
    out = str(tmp_path / "out")
    proc = run_cli(MCORE_TO_HF, "--mcore-dir", broken, "--out-dir", out, check=False)
    assert proc.returncode == 1
    assert "mlp.linear_fc" in proc.stderr and "global shape" in proc.stderr
    assert not os.path.exists(out) and not glob.glob(str(tmp_path / ".out.tmp-*"))
