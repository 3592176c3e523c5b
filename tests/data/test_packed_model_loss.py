"""A pack from the data pipeline, through megatron at TP=2, has exactly the per-document losses of transformers."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import REPO, run_torchrun
from megatron_onereason.data.blending import BlendComponent, BlendConfig
from megatron_onereason.data.indexed import IndexedPairWriter
from megatron_onereason.data.packed_dataset import build_packed_dataset
from megatron_onereason.data.packing import PackingConfig

pytestmark = pytest.mark.multiprocess


def test_packed_loss_equals_per_document_losses(tiny_hf_dirs, tmp_path):
    import subprocess
    import sys

    import transformers

    hf_dir = tiny_hf_dirs["untied"]  # vocab 1000: padded vocab rows must not leak into the loss
    ckpt = str(tmp_path / "mcore")
    subprocess.run([sys.executable, "checkpoints_convert/hf_to_mcore.py", "--hf-dir", hf_dir, "--out-dir", ckpt,
                    "--tp", "2", "--no-tokenizer"], cwd=REPO, check=True, capture_output=True)
    rng = np.random.default_rng(0)
    with IndexedPairWriter(str(tmp_path / "docs")) as writer:
        for _ in range(12):
            n = int(rng.integers(5, 30))
            writer.add(rng.integers(0, 1000, n), (rng.random(n) < 0.6).astype(np.uint8))
    dataset = build_packed_dataset(BlendConfig((BlendComponent("docs", str(tmp_path / "docs"), 1.0),)),
                                   PackingConfig(seq_length=80, max_sample_length=40, seed=1), pad_id=0)
    pack = dataset[0]
    assert pack["num_documents"] >= 2
    for name in ("tokens", "labels", "cu_seqlens"):
        torch.save(pack[name][None] if name != "cu_seqlens" else pack[name], str(tmp_path / f"{name}.pt"))
    case = dict(ckpt=ckpt, tp=2, pp=1, tokens=str(tmp_path / "tokens.pt"), labels=str(tmp_path / "labels.pt"),
                cu_seqlens=str(tmp_path / "cu_seqlens.pt"), out=str(tmp_path / "loss.pt"))
    json.dump([case], open(tmp_path / "cases.json", "w"))
    run_torchrun(os.path.join(REPO, "tests", "dist_workers", "logits_worker.py"), 2, [str(tmp_path / "cases.json")])
    per_token = torch.load(case["out"])[0].double()
    mask = pack["loss_mask"].double()

    # Oracle: each document alone through transformers, cross-entropy of its own next tokens where they are
    # targets (the loss mask says which), summed per document.
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    cu = pack["cu_seqlens"].tolist()
    for d in range(pack["num_documents"]):
        start, end = cu[d], cu[d + 1]
        doc = pack["tokens"][start:end]
        with torch.no_grad():
            logp = torch.log_softmax(model(doc[None]).logits[0].double(), dim=-1)
        expected = -sum(logp[t, doc[t + 1]] * mask[start + t] for t in range(end - start - 1))
        got = (per_token[start:end] * mask[start:end]).sum()
        assert abs(got - expected) < 1e-4 * max(1.0, abs(float(expected))), (d, float(got), float(expected))
        assert mask[end - 1] == 0  # a document's last position never predicts the next document
    assert mask[cu[pack["num_documents"]]:].sum() == 0  # padding carries no loss
