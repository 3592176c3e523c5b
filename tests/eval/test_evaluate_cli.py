"""The evaluate CLI end to end on a tiny random recommender and a synthetic benchmark.

Non-thinking beam search is deterministic, so the report's numbers are recomputed here from a direct generation
with a plain set-based oracle; a megatron checkpoint of the same model must give the same report.
"""
import json
import os

import pytest

from megatron_onereason import evaluate
from megatron_onereason.data.synthetic_catalog import SyntheticCatalog
from megatron_onereason.eval.benchmark import SyntheticBenchmarkConfig, make_synthetic_benchmark, write_benchmark
from megatron_onereason.eval.tiny_recommender import build_tiny_recommender
from megatron_onereason.generation.hf_backend import TransformersBackend
from megatron_onereason.generation.params import GenerationParams, Prompt
from megatron_onereason.generation.prompts import chat_prompt_ids
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.itemic_tokens import DEFAULT_SCHEME

KS = [1, 2, 4]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    tiny = build_tiny_recommender(str(root / "tiny"))
    catalog = ItemCatalog.load(tiny.catalog_dir)
    users = make_synthetic_benchmark(SyntheticCatalog.load(tiny.synthetic_dir), catalog,
                                     SyntheticBenchmarkConfig(num_users=4, history_length=(3, 6), seed=1))
    data = str(root / "bench.jsonl")
    write_benchmark(data, users)
    return tiny, catalog, users, data, root


def run_cli(tiny, data, out, model=None, *extra):
    return evaluate.main(["--model", model or tiny.model_dir, "--catalog", tiny.catalog_dir, "--data", data,
                          "--out", str(out), "--k", ",".join(map(str, KS)), "--batch-size", "3", *extra])


def test_report_matches_an_independent_recomputation(bench):
    tiny, catalog, users, data, root = bench
    report = run_cli(tiny, data, root / "report", None, "--mode", "both", "--tasks", "rec,cot",
                     "--max-think-tokens", "5", "--cot-progression")
    with open(root / "report" / "report.json") as f:
        assert json.load(f)["results"] == report["results"]
    markdown = (root / "report" / "report.md").read_text()
    domains = sorted({d for u in users for d in u.targets})
    for domain in domains + ["all"]:
        assert f"### {domain}" in markdown
    thinking, plain = report["results"]["thinking"], report["results"]["non-thinking"]
    assert thinking["all"]["instances"] == plain["all"]["instances"] == sum(len(u.targets) for u in users)
    assert thinking["all"]["delta_ll"] is not None and "delta_ll" not in plain["all"]
    assert len(report["ll_progression"]["thinking"]["mean"]) >= 2  # ℓ_0 and at least one CoT segment
    assert report["throughput"]["non-thinking"]["items"] == plain["all"]["instances"] * KS[-1]

    backend = TransformersBackend.from_pretrained(tiny.model_dir, tiny.catalog_dir)
    per_domain = {}
    for user in users:
        for domain, targets in user.targets.items():
            content = (f"{user.portrait} History: {', '.join(catalog.item_text(i, DEFAULT_SCHEME) for i in user.history)}. "
                       f"Recommend the next {'video' if domain == 'video' else 'product'}.")
            prompt = Prompt(chat_prompt_ids(backend.tokenizer, [{"role": "user", "content": content}], False), domain)
            params = GenerationParams(thinking=False, num_items=KS[-1], item_strategy="beam")
            completions = backend.generate([prompt], params)[0].traces[0].completions
            ranked = [catalog.item_id_for(c.domain, c.codes) for c in completions]  # beam: best first, all legal
            for k in KS:
                hits = set(ranked[:k]) & set(targets)
                per_domain.setdefault(domain, []).append((k, float(bool(hits)), len(hits) / len(set(targets))))
    for domain, rows in per_domain.items():
        for k in KS:
            passes = [p for kk, p, _ in rows if kk == k]
            recalls = [r for kk, _, r in rows if kk == k]
            assert plain[domain][f"pass@{k}"] == pytest.approx(sum(passes) / len(passes))
            assert plain[domain][f"recall@{k}"] == pytest.approx(sum(recalls) / len(recalls))


def test_megatron_checkpoint_gives_the_same_report(bench):
    from megatron_onereason.checkpoint.convert import convert_hf_to_mcore

    tiny, _, _, data, root = bench
    mcore_dir = str(root / "mcore")
    convert_hf_to_mcore(tiny.model_dir, mcore_dir)
    from_hf = run_cli(tiny, data, root / "hf_report", None, "--mode", "non-thinking")
    from_mcore = run_cli(tiny, data, root / "mcore_report", mcore_dir, "--mode", "non-thinking")
    assert from_mcore["results"] == from_hf["results"]
    assert os.path.exists(root / "mcore_report" / "report.md")


def test_bad_benchmark_line_is_reported_with_its_location(bench):
    tiny, _, _, _, root = bench
    bad = root / "bad.jsonl"
    bad.write_text('{"user_id": "u", "portrait": "p", "history": ["nope"], "targets": {"video": ["x"]}}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: item id 'nope'"):
        run_cli(tiny, str(bad), root / "bad_report", None, "--mode", "non-thinking")
    with pytest.raises(SystemExit):
        run_cli(tiny, str(bad), root / "bad_report", None, "--tasks", "cot")  # rec is required
