"""``evaluate --recif`` on an OpenOneRec-style checkpoint (tiny Qwen3 expanded as their script does, imported) and
RecIF task files made of the real fixture's samples.

Oracles: OpenOneRec's decoding re-implemented here on plain ``transformers`` forwards — its prompt string (the
fixture's rendering with the ``/no_think`` switch) plus ``<|sid_begin|>``, then a beam search over the code tokens
of each level, whole-sequence recomputation, no cache — and hand-computable catalog / sid2pid cases.
"""
import json
import os

import numpy as np
import pytest
import torch
from recif_inputs import recif_rows, write_recif_task
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_onereason import evaluate
from megatron_onereason.tokenizer.item_catalog import MANIFEST_FILE, ItemCatalog
from megatron_onereason.tokenizer.itemic_import import import_itemic_vocab
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab

SAMPLES = 2
BEAMS = 4


@pytest.fixture(scope="module")
def setup(openonerec_hf_dir, recif_fixture, tmp_path_factory):
    root = tmp_path_factory.mktemp("recif_eval")
    # resize_token_embeddings gives the new rows nearly equal embeddings: spread them so that beams do not tie
    tokenizer = AutoTokenizer.from_pretrained(openonerec_hf_dir)
    model = AutoModelForCausalLM.from_pretrained(openonerec_hf_dir, dtype=torch.float32)
    first_new = len(tokenizer) - (3 * 8192 + 2)  # their script appends 3 x 8192 codes, begin and end
    rows = model.get_input_embeddings().weight  # tied: the output layer too
    with torch.no_grad():
        rows[first_new:] += torch.randn(rows[first_new:].shape, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(str(root / "spread"))  # new files: the session fixture's are hard-linked elsewhere
    tokenizer.save_pretrained(str(root / "spread"))
    model_dir = str(root / "model")
    import_itemic_vocab(str(root / "spread"), model_dir)
    samples = [s for _, s in recif_fixture[:SAMPLES]]
    task = write_recif_task(str(root), "ad", recif_rows(samples))
    return {"root": root, "model": model_dir, "task": task, "samples": samples}


def _run(setup, name, *extra):
    out = setup["root"] / name
    report = evaluate.main(["--model", setup["model"], "--recif", setup["task"], "--out", str(out),
                            "--k", f"1,{BEAMS}", "--num-beams", str(BEAMS), *extra])
    with open(out / "report.json") as f:
        assert json.load(f) == json.loads(json.dumps(report))
    return report, out


def _oracle_beams(model, context, code_ids, beams):
    """OpenOneRec's stage 2: beam search of width ``beams`` over one code token per level (cumulative log-probs)."""
    frontier = [([], 0.0)]
    for level_ids in code_ids:
        candidates = []
        for tokens, score in frontier:
            with torch.no_grad():
                logp = model(torch.tensor([context + tokens])).logits[0, -1].float().log_softmax(-1)
            top = logp[level_ids].topk(beams)
            candidates += [(tokens + [int(level_ids[i])], score + float(v)) for v, i in zip(top.values, top.indices)]
        frontier = sorted(candidates, key=lambda c: -c[1])[:beams]
    return frontier


def test_non_thinking_matches_openonerecs_decoding(setup):
    report, out = _run(setup, "plain", "--mode", "non-thinking")
    vocab = ItemicVocab.load(setup["model"])
    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).eval()
    with open(out / "generations_non-thinking.json") as f:
        dump = json.load(f)
    assert list(dump["samples"]) == [str(i) for i in range(SAMPLES)] and dump["scheme"]["name"] == "openonerec"
    per_sample = []
    for sample_id, fixture in zip(dump["samples"], setup["samples"]):
        got = dump["samples"][sample_id]
        want_prompt = fixture["prompt"].replace("/think<|im_end|>", "/no_think<|im_end|>") + "<think>\n\n</think>\n\n"
        assert got["prompt"] == want_prompt and got["ground_truth"] == fixture["ground_truth"]
        context = tokenizer.encode(want_prompt + "<|sid_begin|>", add_special_tokens=False)
        beams = _oracle_beams(model, context, [vocab.code_ids[level] for level in range(3)], BEAMS)
        want = ["<|sid_begin|>" + tokenizer.decode(tokens) for tokens, _ in beams]
        assert got["generations"] == want  # no end token: the beam covers exactly the code tokens
        np.testing.assert_allclose(got["logprobs"], [score for _, score in beams], atol=1e-4)
        per_sample.append({k: v for k, v in got.items() if "@" in k})
    scores = evaluate.main(["--score-generations", str(out / "generations_non-thinking.json"),
                            "--out", str(setup["root"] / "rescored.json"), "--k", f"1,{BEAMS}"])
    assert [{k: v for k, v in r.items() if k != "id"} for r in scores["per_sample"]] == per_sample
    assert scores["mean"] == report["results"]["non-thinking"]["mean"]


def test_thinking_traces_then_newline_and_begin_token(setup):
    report, out = _run(setup, "thinking", "--mode", "thinking", "--num-traces", "2", "--max-think-tokens", "3",
                       "--temperature", "1.0")
    assert report["results"]["thinking"]["num_beams"] == BEAMS and report["results"]["thinking"]["num_traces"] == 2
    with open(out / "generations_thinking.json") as f:
        dump = json.load(f)
    for got, fixture in zip(dump["samples"].values(), setup["samples"]):
        assert got["prompt"] == fixture["prompt"]  # OpenOneRec's thinking prompt, /think switch and all
        assert len(got["generations"]) == 2 * BEAMS
        for trace in range(2):  # trace-major: one reasoning trace, then its beams best first
            group = got["generations"][trace * BEAMS:(trace + 1) * BEAMS]
            reasoning = {g.rsplit("</think>", 1)[0] for g in group}
            assert len(reasoning) == 1
            assert all(g.rsplit("</think>", 1)[1].startswith("\n<|sid_begin|><s_a_") for g in group)
            logprobs = got["logprobs"][trace * BEAMS:(trace + 1) * BEAMS]
            assert logprobs == sorted(logprobs, reverse=True)


def test_catalog_and_sid2pid(setup):
    """Catalog = the targets and two other items, beams >= its size: every target is found (recall@K = 1)."""
    from megatron_onereason.eval.recif import answer_items
    from megatron_onereason.tokenizer.itemic_tokens import preset

    codes = {m.codes for s in setup["samples"] for m in answer_items(s["ground_truth"], preset("openonerec"))}
    codes |= {(1, 2, 3), (8191, 0, 5)}
    catalog_dir = setup["root"] / "catalog"
    catalog_dir.mkdir()
    ordered = sorted(codes)
    ItemCatalog([f"ad_{i}" for i in range(len(ordered))], ["ad"] * len(ordered), np.array(ordered), 8192).save(
        str(catalog_dir))
    (catalog_dir / MANIFEST_FILE).write_text(json.dumps({"levels": 3, "codebook_size": 8192}))
    first = setup["samples"][0]
    key = str(ordered[0][0] * 8192 ** 2 + ordered[0][1] * 8192 + ordered[0][2])
    (setup["root"] / "sid2pid.json").write_text(json.dumps({key: [{"pid": 77, "count": 1,
                                                                   "count_after_downsample": 1}]}))
    beams = str(len(ordered))
    report, out = _run(setup, "with_catalog", "--mode", "non-thinking", "--catalog", str(catalog_dir),
                       "--num-beams", beams, "--k", f"1,{beams}", "--sid2pid", str(setup["root"] / "sid2pid.json"))
    with open(out / "generations_non-thinking.json") as f:
        dump = json.load(f)
    for got in dump["samples"].values():
        items = [g.split("<|sid_begin|>")[1] for g in got["generations"]]
        assert sorted(items) == sorted("".join(f"<s_{x}_{c}>" for x, c in zip("abc", t)) for t in ordered)
        assert got[f"recall@{beams}"] == 1.0 and got[f"pass@{beams}"] == 1.0
        # only ordered[0] maps to a product (77), which is no sample's answer
        assert got[f"pid_pass@{beams}"] == 0.0
    assert report["results"]["non-thinking"]["pid_source"] == "sid2pid"
    assert first["metadata"]["answer_pid"] and 77 not in first["metadata"]["answer_pid"]


def test_bad_inputs_are_one_line_and_leave_nothing(setup, tmp_path, capsys):
    out = tmp_path / "report"
    cases = [
        # the released checkpoint before import_itemic_vocab: weights and itemic tokens, no itemic_tokens.json
        (["--model", str(setup["root"] / "spread"), "--recif", setup["task"]], "itemic_tokens.json"),
        (["--model", setup["model"], "--recif", str(tmp_path / "nope")], "no such file or directory"),
    ]
    broken = tmp_path / "broken_test.parquet"
    broken.write_bytes(b"PAR1 garbage")
    cases.append((["--model", setup["model"], "--recif", str(broken)], "not a readable parquet"))
    for args, message in cases:
        assert evaluate.cli([*args, "--out", str(out), "--mode", "non-thinking"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("evaluate: error: ") and message in err[0], err
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".report")]
