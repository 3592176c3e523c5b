"""Evaluate a model on a recommendation benchmark: Pass@K / Recall@K per domain, optionally CoT indicators.

    python -m megatron_onereason.evaluate --model HF_OR_MCORE_DIR --catalog ITEMIC_TOKENIZER_DIR \\
        --data BENCH.jsonl --tasks rec[,cot] --k 1,8,16,32,64 --mode thinking|non-thinking|both --out REPORT_DIR

``--model`` is a HF directory with an extended tokenizer (``itemic_tokens.json``) or a megatron checkpoint
(``onereason_model.json``), which is exported to a temporary HF directory first. ``--catalog`` is the itemic
tokenizer directory (``catalog.parquet``): it constrains decoding and maps patterns back to item ids. The benchmark
format is documented in :mod:`megatron_onereason.eval.benchmark` (``tools/make_synthetic_benchmark.py`` writes a
synthetic one). Items per instance: ``max(K)`` per trace, by ``--strategy`` (beam, hierarchical or sample).
Task ``cot`` adds, in thinking mode, ΔLL (eq. 21), γ_legal (eq. 24), γ_hist|legal (eq. 25) and, with
``--cot-progression``, ℓ_t (eq. 23). Writes ``REPORT_DIR/report.json`` and ``REPORT_DIR/report.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from megatron_onereason.checkpoint.mcore_io import MODEL_JSON
from megatron_onereason.eval.benchmark import TASKS, RecInstance, load_benchmark, rec_instances, rec_messages
from megatron_onereason.eval.rec_eval import (
    cot_measurement,
    markdown_tables,
    mean_by_domain,
    mean_curve,
    ranked_item_ids,
    rec_metrics,
)
from megatron_onereason.generation.backend import GenerationBackend
from megatron_onereason.generation.params import ITEM_STRATEGIES, GenerationParams, Prompt
from megatron_onereason.generation.prompts import chat_prompt_ids

MODES = {"thinking": (True,), "non-thinking": (False,), "both": (True, False)}
ALL_TASKS = TASKS + ("cot",)


def _mode_name(thinking: bool) -> str:
    return "thinking" if thinking else "non-thinking"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF directory or megatron checkpoint directory")
    p.add_argument("--catalog", required=True, help="itemic tokenizer directory (catalog.parquet, manifest.json)")
    p.add_argument("--data", required=True, help="benchmark JSONL")
    p.add_argument("--out", required=True, help="report directory (report.json, report.md)")
    p.add_argument("--tasks", default="rec", help=f"comma-separated, from {ALL_TASKS}")
    p.add_argument("--k", default="1,8,16,32,64", help="comma-separated K values")
    p.add_argument("--mode", choices=sorted(MODES), default="both")
    p.add_argument("--strategy", choices=ITEM_STRATEGIES, default="beam")
    p.add_argument("--num-traces", type=int, default=1, help="reasoning traces per instance (thinking mode)")
    p.add_argument("--max-think-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="reasoning temperature (0: greedy)")
    p.add_argument("--item-temperature", type=float, default=1.0, help="item sampling temperature (--strategy sample)")
    p.add_argument("--batch-size", type=int, default=8, help="instances per generation call")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N instances only (0: all)")
    p.add_argument("--cot-progression", action="store_true", help="also compute ℓ_t along CoT segments (eq. 23)")
    p.add_argument("--constrain-reasoning", action="store_true",
                   help="also constrain itemic patterns inside the CoT to catalog items (γ_legal is then 1 by "
                        "construction; by default the CoT is free and γ_legal measures the model)")
    p.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    p.add_argument("--device", default="cpu", help="transformers backend device")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in ALL_TASKS]
    if unknown or "rec" not in args.tasks:
        p.error(f"--tasks must include rec and come from {ALL_TASKS}, got {args.tasks}")
    try:
        args.k = sorted({int(k) for k in args.k.split(",")})
    except ValueError:
        p.error(f"--k must be comma-separated integers, got {args.k!r}")
    if args.k[0] < 1:
        p.error("--k values must be >= 1")
    if "cot" in args.tasks and args.backend != "transformers":
        p.error("--tasks cot scores targets with the model's forward pass: it needs --backend transformers")
    return args


def _backend(args: argparse.Namespace, model_dir: str) -> GenerationBackend:
    if args.backend == "vllm":
        from megatron_onereason.generation.vllm_backend import VLLMBackend

        return VLLMBackend(model_dir, args.catalog, seed=args.seed)
    from megatron_onereason.generation.hf_backend import TransformersBackend

    return TransformersBackend.from_pretrained(model_dir, args.catalog, device=args.device)


def _params(args: argparse.Namespace, thinking: bool, batch: int) -> GenerationParams:
    return GenerationParams(
        thinking=thinking, num_traces=args.num_traces if thinking else 1, num_items=args.k[-1],
        item_strategy=args.strategy, temperature=args.temperature, item_temperature=args.item_temperature,
        max_think_tokens=args.max_think_tokens, constrain_reasoning=args.constrain_reasoning,
        seed=args.seed + batch)  # a seed per batch: batches differ


def run_evaluation(args: argparse.Namespace, model_dir: str) -> Dict:
    from tqdm import tqdm

    from megatron_onereason.tokenizer.item_catalog import ItemCatalog

    catalog = ItemCatalog.load(args.catalog)
    instances: List[RecInstance] = rec_instances(load_benchmark(args.data, catalog))
    if args.limit:
        instances = instances[:args.limit]
    backend = _backend(args, model_dir)
    tokenizer = backend.tokenizer
    messages = [rec_messages(i, catalog, backend.vocab.scheme) for i in instances]
    prompts = {thinking: [Prompt(chat_prompt_ids(tokenizer, m, thinking), i.domain) for m, i in zip(messages, instances)]
               for thinking in (True, False)}
    results, curves, throughput = {}, {}, {}
    for thinking in MODES[args.mode]:
        mode = _mode_name(thinking)
        measurements, mode_curves, seconds, items = [], [], 0.0, 0
        bar = tqdm(total=len(instances), desc=f"{mode} generation", unit="instance")
        for batch, start in enumerate(range(0, len(instances), args.batch_size)):
            chunk = instances[start:start + args.batch_size]
            t0 = time.perf_counter()
            outputs = backend.generate(prompts[thinking][start:start + len(chunk)], _params(args, thinking, batch))
            seconds += time.perf_counter() - t0
            for offset, (instance, output) in enumerate(zip(chunk, outputs)):
                items += sum(len(t.completions) for t in output.traces)
                m = rec_metrics(ranked_item_ids(output, catalog), instance.targets, args.k)
                if "cot" in args.tasks and thinking:
                    cot, curve = cot_measurement(
                        backend.model, tokenizer, backend.chat_tokens, backend.vocab, catalog,
                        instance, prompts[True][start + offset].token_ids, prompts[False][start + offset].token_ids,
                        output.traces[0], args.cot_progression)
                    m.update(cot)
                    mode_curves.append(curve)
                measurements.append(m)
            bar.update(len(chunk))
        bar.close()
        results[mode] = mean_by_domain([i.domain for i in instances], measurements)
        if mode_curves and args.cot_progression:
            curves[mode] = mean_curve(mode_curves)
        throughput[mode] = {"generation_seconds": seconds, "items": items,
                            "items_per_second": items / seconds if seconds else None}
    return {
        "model": args.model, "data": args.data, "catalog": args.catalog, "tasks": args.tasks, "k": args.k,
        "strategy": args.strategy, "num_traces": args.num_traces, "max_think_tokens": args.max_think_tokens,
        "backend": args.backend, "results": results, "ll_progression": curves, "throughput": throughput,
    }


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onereason_eval_") as tmp:
        model_dir = args.model
        if os.path.exists(os.path.join(args.model, MODEL_JSON)):  # a megatron checkpoint: export it to HF first
            from megatron_onereason.checkpoint.convert import convert_mcore_to_hf

            model_dir = os.path.join(tmp, "hf")
            convert_mcore_to_hf(args.model, model_dir)
        report = run_evaluation(args, model_dir)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(f"# Evaluation of {args.model} on {args.data}\n\n")
        f.write(markdown_tables(report["results"], args.k))
    print(markdown_tables(report["results"], args.k))
    return report


if __name__ == "__main__":
    main()
