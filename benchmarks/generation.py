"""Items per second of the transformers generation backend (two-stage think-then-items rollouts).

    PYTHONPATH=. python benchmarks/generation.py [--preset tiny] [--prompts 8] [--num-traces 4] [--num-items 16] \
        [--max-think-tokens 64] [--strategies sample,beam,hierarchical] [--device cpu] [--threads 2]

Builds a tiny random recommender (synthetic catalog → RQ-KMeans codes → random Qwen3 with the itemic tokens) in a
temporary directory, renders synthetic-benchmark prompts, and times ``generate`` after one warm-up call. Items/s
counts item completions (N×K per prompt); tokens/s counts decoded tokens (each trace once, plus every item).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from tqdm import tqdm

from megatron_onereason.eval.benchmark import rec_messages
from megatron_onereason.eval.tiny_recommender import add_benchmark_arguments, build_benchmark_inputs
from megatron_onereason.generation.hf_backend import TransformersBackend
from megatron_onereason.generation.params import ITEM_STRATEGIES, GenerationParams, Prompt
from megatron_onereason.generation.prompts import chat_prompt_ids


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(p, num_items=16)
    p.add_argument("--strategies", default=",".join(ITEM_STRATEGIES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="onereason_genbench_") as tmp:
        tiny, catalog, instances = build_benchmark_inputs(f"{tmp}/tiny", args)
        backend = TransformersBackend.from_pretrained(tiny.model_dir, tiny.catalog_dir, device=args.device)
        print(f"preset {args.preset}, {len(catalog)} items, codebook {args.codebook_size}, {len(instances)} prompts, "
              f"N={args.num_traces} traces x K={args.num_items} items, max {args.max_think_tokens} think tokens, "
              f"device {args.device}, {torch.get_num_threads()} threads")
        print(f"{'mode':<13} {'strategy':<13} {'items/s':>9} {'tokens/s':>9} {'s/call':>8} {'2-stage/N×K tokens':>19}")
        for thinking in (True, False):
            messages = [rec_messages(i, catalog, backend.vocab.scheme) for i in instances]
            prompts = [Prompt(chat_prompt_ids(backend.tokenizer, m, thinking), i.domain)
                       for m, i in zip(messages, instances)]
            for strategy in args.strategies.split(","):
                params = GenerationParams(thinking=thinking, num_traces=args.num_traces if thinking else 1,
                                          num_items=args.num_items, item_strategy=strategy,
                                          max_think_tokens=args.max_think_tokens, seed=0)
                backend.generate(prompts[:1], params)  # warm-up
                items = tokens = independent = 0
                start = time.perf_counter()
                for _ in tqdm(range(args.repeats), desc=f"{strategy}", leave=False):
                    for out in backend.generate(prompts, params):
                        items += sum(len(t.completions) for t in out.traces)
                        tokens += out.generated_tokens
                        independent += out.independent_rollout_tokens
                seconds = time.perf_counter() - start
                mode = "thinking" if thinking else "non-thinking"
                print(f"{mode:<13} {strategy:<13} {items / seconds:9.1f} {tokens / seconds:9.1f} "
                      f"{seconds / args.repeats:8.2f} {tokens / independent:19.3f}")


if __name__ == "__main__":
    main()
