"""``evaluate --recif --backend vllm`` against ``--backend hf`` (the reference) on the tiny recommender."""
import json

import numpy as np
import pytest
from recif_inputs import write_recif_task

from megatron_onereason import evaluate
from megatron_onereason.tokenizer.item_catalog import ItemCatalog

pytest.importorskip("vllm")

ATOL = 1e-4  # fp32 engine vs fp32 transformers


def test_evaluate_recif_on_vllm_writes_the_generations_of_the_hf_backend(vllm_backend, tiny_recommender, tmp_path,
                                                                         monkeypatch):
    """``evaluate --recif --backend vllm`` (non-thinking, beam over the codes, OpenOneRec's decoding) writes the
    generations ``--backend hf`` writes, on a RecIF task built in the tiny recommender's scheme (Chinese system
    prompt). The vLLM engine is the session's: ``evaluate`` asks for one over the same model and catalog."""
    backend = vllm_backend
    scheme, items = backend.vocab.scheme, ItemCatalog.load(tiny_recommender.catalog_dir)
    rows = []
    for n, row in enumerate([0, 30, 7]):
        messages = [{"role": "system", "content": "你是一个推荐助手。"},
                    {"role": "user", "content": f"用户 {n} 最近看过的内容如下，请推荐下一个。"}]
        answer = scheme.format_item(items.domains[row], items.codes[row])
        rows.append({"messages": json.dumps(messages, ensure_ascii=False),
                     "metadata": json.dumps({"answer": answer, "uid": n}, ensure_ascii=False)})
    task = write_recif_task(str(tmp_path), "video", rows, fmt="jsonl")

    def shared_engine(args, model_dir):
        assert (model_dir, args.catalog) == (backend.model_dir, backend.catalog_dir)
        return backend

    dumps = {}
    for name in ("hf", "vllm"):
        if name == "vllm":
            monkeypatch.setattr(evaluate, "_backend", shared_engine)
        out = tmp_path / name
        evaluate.main(["--model", tiny_recommender.model_dir, "--catalog", tiny_recommender.catalog_dir,
                       "--recif", task, "--out", str(out), "--k", "1,8", "--num-beams", "8", "--mode", "non-thinking",
                       "--backend", name])
        with open(out / "generations_non-thinking.json") as f:
            dumps[name] = json.load(f)["samples"]
    assert list(dumps["vllm"]) == list(dumps["hf"])
    for sample_id, want in dumps["hf"].items():
        got = dumps["vllm"][sample_id]
        assert len(want["generations"]) == 8 and got["generations"] == want["generations"]
        np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=ATOL)
        assert {k: v for k, v in got.items() if k != "logprobs"} == {k: v for k, v in want.items() if k != "logprobs"}
