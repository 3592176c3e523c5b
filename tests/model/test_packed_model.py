"""Packs through the whole megatron model at TP=2 and at PP=2 (torchrun, GQA, padding): the packed-attention kernels
give the dense-mask reference's per-token losses and gradients (fp32, ≤ 1e-5), and their losses are transformers' on
each document alone and on each materialised ``prompt + trace + child`` rollout. The 48K-pack recipe trains on CPU."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_torchrun
from megatron_onereason.model.pack_layout import PackLayout
from megatron_onereason.rl.tree_pack import TreeSequence, pack_trees

pytestmark = pytest.mark.multiprocess


def _hf_token_logprobs(model, seq):
    with torch.no_grad():
        logp = torch.log_softmax(model(seq[None]).logits[0].double(), -1)
    return logp[:-1].gather(-1, seq[1:, None])[:, 0]


def test_kernels_equal_dense_reference_and_transformers_at_tp2_and_pp2(tiny_hf_dirs, tmp_path):
    import transformers

    hf_dir = tiny_hf_dirs["tied"]
    ckpt = str(tmp_path / "mcore")
    subprocess.run([sys.executable, "checkpoints_convert/hf_to_mcore.py", "--hf-dir", hf_dir, "--out-dir", ckpt,
                    "--tp", "2", "--no-tokenizer"], cwd=REPO, check=True, capture_output=True)
    g = torch.Generator().manual_seed(0)
    doc_lengths = [23, 7, 1, 30, 3]  # the last one stands for the data pipeline's padding segment
    docs = [torch.randint(0, 1000, (n,), generator=g) for n in doc_lengths]
    doc_labels = torch.cat([torch.cat([d[1:], torch.zeros(1, dtype=torch.long)]) for d in docs])
    rand = lambda n: torch.randint(0, 1000, (n,), generator=g).tolist()  # noqa: E731
    trees = [TreeSequence(rand(6), rand(9), [rand(4), rand(2), rand(5)]),
             TreeSequence(rand(4), [], [rand(3), rand(1), rand(2)])]  # non-thinking: children see only the prompt
    tree = pack_trees(trees, length=56)  # 15 + 14 + 4 + 9 positions, then 14 of padding
    packs = [(torch.cat(docs), doc_labels, PackLayout.documents(doc_lengths)), (tree.tokens, tree.labels, tree.layout)]
    torch.save(packs, str(tmp_path / "packs.pt"))
    cases = [dict(ckpt=ckpt, tp=tp, pp=pp, packs=str(tmp_path / "packs.pt"), out=str(tmp_path / f"tp{tp}pp{pp}.json"))
             for tp, pp in [(2, 1), (1, 2)]]
    json.dump(cases, open(tmp_path / "cases.json", "w"))
    run_torchrun(os.path.join(REPO, "tests", "dist_workers", "packed_attention_worker.py"), 2,
                 [str(tmp_path / "cases.json")])

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    doc_expected = torch.cat([torch.cat([_hf_token_logprobs(model, d), torch.full((1,), float("nan"))])
                              for d in docs]).neg()
    scored = torch.cat([tree.trace_index[tree.trace_mask], tree.child_index[tree.child_mask]])
    tree_expected = torch.full((tree.tokens.numel(),), float("nan"), dtype=torch.float64)
    for i, t in enumerate(trees):
        for j, child in enumerate(t.children):
            lp = _hf_token_logprobs(model, torch.tensor(list(t.prompt) + list(t.trace) + list(child))).neg()
            p = len(t.prompt)
            tree_expected[tree.trace_index[i, : len(t.trace)]] = lp[p - 1: p - 1 + len(t.trace)]
            tree_expected[tree.child_index[i, j, : len(child)]] = lp[p - 1 + len(t.trace):]
    for case in cases:
        (doc, tr) = json.load(open(case["out"]))
        for name, res in (("documents", doc), ("trees", tr)):
            assert res["loss_diff"] <= 1e-5 and res["grad_diff"] <= 1e-5, (case["out"], name, res)
            assert res["grad_max"] > 1e-3  # gradients that could differ
        got = torch.tensor(doc["per_token_loss"], dtype=torch.float64)
        valid = ~doc_expected.isnan()
        torch.testing.assert_close(got[valid], doc_expected[valid], atol=1e-4, rtol=0)
        got = torch.tensor(tr["per_token_loss"], dtype=torch.float64)
        torch.testing.assert_close(got[scored], tree_expected[scored], atol=1e-4, rtol=0)


@pytest.mark.timeout(1500)
def test_48k_pack_recipe_trains_on_cpu():
    """48K packs of 3–4K documents through the real trainer on CPU (benchmarks/attention.py --recipe, 2 layers of
    width 256). The dense path would ask for a 38.6 GB score buffer per layer."""
    proc = subprocess.run([sys.executable, "benchmarks/attention.py", "--recipe", "--layers", "2", "--iters", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["iters"] == 1 and result["pack"] == 49152
    # Random weights (std 0.02) on uniform random tokens: the loss starts at about ln(vocabulary).
    assert abs(result["losses"][0] - math.log(4096)) < 0.5, result
