"""RL rollout engine benchmark: vLLM vs the transformers backend on the same prompts, in one run.

    PYTHONPATH=. python benchmarks/rollout.py [--preset tiny] [--prompts 8] [--num-traces 4] [--num-items 8] \
        [--max-think-tokens 64] [--repeats 3] [--sections rollout,score,sync] [--device cpu] [--dtype fp32] \
        [--sync-widths 512 1024] [--sync-layers 6] [--sync-bucket-mb 512]

Builds the tiny random recommender (synthetic catalog → RQ-KMeans codes → random Qwen3 with the itemic tokens) in a
temporary directory, renders synthetic-benchmark prompts, builds both backends with ``make_backend`` and prints one
table per section:

* ``rollout``: two-stage rollouts (N traces × K items, seeded, identical parameters for both backends), timed after
  one warm-up call: generated tokens/s (each trace once plus every item completion, ``PromptOutput.generated_tokens``),
  items/s, seconds per call and the stage-2 prefix-cache hit share;
* ``score``: log-probs of given tokens (a teacher or the reference scoring the rollouts) — vLLM's ``score``, the
  transformers backend's ``score`` (one forward per tree) and the RL engine's tree-pack forward
  (``rl.workers.hf_tree_logprobs``): seconds, tokens/s and max |Δ log p| against the transformers ``score``;
* ``sync``: full weight syncs over the RL engine's transport (``generation.weight_sync``: a private gloo group on CPU, NCCL
  on GPU, ``--sync-bucket-mb`` buckets): a spawned sender process plays the actor's stage leader (HF-named tensors,
  what ``hf_named_tensors`` yields) and the receiver is a backend as the inference workers drive it — the vLLM
  engine's workers (``open_weight_channels`` / ``receive_weights``) and the transformers backend
  (``receive_weights(channels, backend.update_weights)``), for the tiny model and for wider random Qwen3 models
  (``--sync-widths``, transformers receiver only: a vLLM engine per size costs a start-up each). Seconds per sync
  (wall, as the engine's ``sync/seconds``), GB/s, the sender's own seconds, the receiver's load alone (its
  ``update_weights`` on in-process tensors, no transport) and whether the receiver's weights equal the sent ones
  bit for bit (the transformers receiver is zeroed before the first sync; the vLLM one is sent its own weights).

More sections (the RL step's rollout/train/sync split) plug into ``SECTIONS``: a function
``(bench: Bench, args) -> None`` that prints its own table. On CPU vLLM needs ``VLLM_CPU_KVCACHE_SPACE`` (set to 1
GiB here unless already set). Timings on a shared machine are noisy: compare the rows of one run.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List

import torch


@dataclass
class Bench:
    backends: Dict[str, object]  # name -> GenerationBackend, in table order
    prompts: List  # rendered thinking prompts (Prompt), the same for every backend
    params: object  # GenerationParams of the rollout section


def _timed(fn, repeats: int):
    fn()  # warm-up
    start = time.perf_counter()
    results = [fn() for _ in range(repeats)]
    return (time.perf_counter() - start) / repeats, results


def rollout_section(bench: Bench, args) -> None:
    print(f"\n[rollout] {len(bench.prompts)} prompts, N={bench.params.num_traces} traces x K={bench.params.num_items} "
          f"items, max {bench.params.max_think_tokens} think tokens, {args.repeats} timed calls after a warm-up")
    print(f"{'backend':<14} {'tokens/s':>10} {'items/s':>9} {'s/call':>8} {'tokens/call':>12} "
          f"{'stage-2 cache hit':>18}")
    base = None
    for name, backend in bench.backends.items():
        seconds, results = _timed(lambda: backend.generate(bench.prompts, bench.params), args.repeats)
        outputs = [o for r in results for o in r]
        tokens = sum(o.generated_tokens for o in outputs) / args.repeats
        items = sum(len(t.completions) for o in outputs for t in o.traces) / args.repeats
        hit = sum(o.stage2_cached_tokens for o in outputs) / max(1, sum(o.stage2_prompt_tokens for o in outputs))
        base = base or tokens / seconds
        print(f"{name:<14} {tokens / seconds:10.1f} {items / seconds:9.1f} {seconds:8.3f} {tokens:12.0f} {hit:18.3f}"
              f"   ({tokens / seconds / base:.2f}x the first row)")


def score_section(bench: Bench, args) -> None:
    from megatron_onereason.rl.tree_pack import TreeSequence, pack_trees, tree_logprobs_layout
    from megatron_onereason.rl.workers import hf_tree_logprobs

    first = next(iter(bench.backends.values()))
    outputs = first.generate(bench.prompts, replace(bench.params, seed=1))
    trees = [TreeSequence(o.prompt.token_ids, t.token_ids, [c.token_ids for c in t.completions])
             for o in outputs for t in o.traces]
    scored = sum(len(t.trace) + sum(len(c) for c in t.children) for t in trees)
    hf = bench.backends["transformers"]

    def tree_pack():
        out = []
        for tree in trees:  # one pack per tree, as the engine's reference/teacher workers do
            pack = pack_trees([tree])
            trace, child = tree_logprobs_layout(hf_tree_logprobs(hf.model, pack), pack)
            out.append((trace[0, :len(tree.trace)].tolist(), [child[0, j, :len(c)].tolist()
                                                               for j, c in enumerate(tree.children)]))
        return out

    candidates: Dict[str, Callable] = {name: (lambda b=b: [(s.trace, s.children) for s in b.score(trees)])
                                       for name, b in bench.backends.items()}
    candidates["transformers tree-pack"] = tree_pack
    print(f"\n[score] given tokens of {len(trees)} rollout trees ({scored} scored tokens, K={bench.params.num_items}); "
          "max |Δ| against the transformers per-tree forward")
    print(f"{'method':<24} {'s/call':>8} {'tokens/s':>10} {'max |Δ log p|':>14}")
    reference = candidates["transformers"]()
    for name, fn in candidates.items():
        seconds, results = _timed(fn, args.repeats)
        delta = max(abs(a - b) for (tr, ch), (rtr, rch) in zip(results[0], reference)
                    for x, y in [(tr, rtr)] + list(zip(ch, rch)) for a, b in zip(x, y))
        print(f"{name:<24} {seconds:8.3f} {scored / seconds:10.1f} {delta:14.2e}")


def _sync_sender(named, world_size: int, bucket_bytes: int, syncs: int, specs, go, sent) -> None:
    """The actor stage leader's side, in its own process: serve the channel, then one ``send_weights`` per ``go``."""
    from megatron_onereason.generation.weight_sync import join_channel, send_weights, serve_channel

    spec, store = serve_channel("bench/pp0", world_size, "gloo", timeout_s=300)
    specs.put(spec)
    channel = join_channel(spec, 0, store)
    for _ in range(syncs):
        go.get()
        sent.put(send_weights(channel, named, bucket_bytes))


def _sync_row(label: str, backend, named, args) -> None:
    """Time ``args.repeats`` full syncs of ``named`` into ``backend`` (after one warm-up sync) and print a row."""
    from megatron_onereason.generation.weight_sync import join_channel, receive_weights

    in_process = hasattr(backend, "model")  # the transformers backend; vLLM's model lives in its workers
    ctx = torch.multiprocessing.get_context("spawn")
    specs, go, sent = ctx.Queue(), ctx.Queue(), ctx.Queue()
    syncs = args.repeats + 1
    sender = ctx.Process(target=_sync_sender, args=(named, 1 + (1 if in_process else backend.weight_receivers),
                                                    args.sync_bucket_mb * 2**20, syncs, specs, go, sent),
                         daemon=True)
    sender.start()
    try:
        spec = specs.get(timeout=300)
        if in_process:
            channels = [join_channel(spec, 1)]

            def receive():  # as rl.workers.InferenceWorker.receive_weights does for an in-process model
                return receive_weights(channels, backend.update_weights)

            with torch.no_grad():
                for p in backend.model.parameters():
                    p.zero_()
        else:
            backend.open_weight_channels([spec], 1)
            receive = backend.receive_weights
        walls, sender_seconds = [], []
        for _ in range(syncs):
            start = time.perf_counter()
            go.put(None)
            received = receive()
            walls.append(time.perf_counter() - start)
            sender_seconds.append(sent.get(timeout=300).seconds)
        sender.join(timeout=60)
    finally:
        if sender.is_alive():
            sender.terminate()
    if in_process:
        params = dict(backend.model.named_parameters())
        identical = "yes" if all(torch.equal(params[n], t) for n, t in named) else "NO"
        load_seconds, _ = _timed(lambda: backend.update_weights(named), args.repeats)
        load = f"{load_seconds:8.3f}"
    else:
        identical, load = "-", f"{'-':>8}"
    wall = sum(walls[1:]) / args.repeats
    numel = sum(t.numel() for _, t in named)
    print(f"{label:<26} {numel / 1e6:8.2f} {received.bytes / 2**20:9.1f} {received.buckets:8d} {wall:8.3f} "
          f"{received.bytes / 1e9 / wall:7.3f} {sum(sender_seconds[1:]) / args.repeats:9.3f} {load} {identical:>10}")


def sync_section(bench: Bench, args) -> None:
    from megatron_onereason.generation.hf_backend import TransformersBackend
    from megatron_onereason.model.hf_qwen3 import make_hf_qwen3

    hf = bench.backends["transformers"]
    if next(hf.model.parameters()).device.type != "cpu":
        print("\n[sync] skipped: it measures the gloo (CPU) transport; run it with --device cpu (NCCL needs one GPU "
              "per channel member)")
        return
    tiny = [(n, p.detach().clone()) for n, p in hf.model.named_parameters()]  # its own weights: the model is kept
    print(f"\n[sync] full weight syncs over gloo, {args.sync_bucket_mb} MiB buckets, a spawned sender process, "
          f"{args.repeats} timed syncs after a warm-up")
    print(f"{'model -> receiver':<26} {'M params':>8} {'MiB':>9} {'buckets':>8} {'s/sync':>8} {'GB/s':>7} "
          f"{'sender s':>9} {'load s':>8} {'bit-equal':>10}")
    for name, backend in bench.backends.items():
        _sync_row(f"{args.preset} -> {name}", backend, tiny, args)
    for width in args.sync_widths:
        cfg = replace(hf.config, hidden_size=width, ffn_hidden_size=3 * width, num_layers=args.sync_layers,
                      num_attention_heads=width // 64, num_query_groups=width // 128, head_dim=64)
        wide = TransformersBackend(make_hf_qwen3(cfg, seed=0), hf.tokenizer, hf.vocab)
        generator = torch.Generator().manual_seed(1)
        named = [(n, torch.randn(p.shape, generator=generator)) for n, p in wide.model.named_parameters()]
        _sync_row(f"h{width} x{args.sync_layers}L -> transformers", wide, named, args)
        del wide, named


SECTIONS: Dict[str, Callable[[Bench, argparse.Namespace], None]] = {"rollout": rollout_section,
                                                                     "score": score_section,
                                                                     "sync": sync_section}


def main(argv=None) -> None:
    from megatron_onereason.eval.tiny_recommender import add_benchmark_arguments, build_benchmark_inputs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(p, num_items=8)
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when visible)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads of the transformers backend (0: default)")
    p.add_argument("--sync-widths", type=int, nargs="*", default=[512, 1024],
                   help="sync: hidden sizes of the wider random Qwen3 models (multiples of 128; ffn 3x, head_dim 64)")
    p.add_argument("--sync-layers", type=int, default=6, help="sync: layers of the wider models")
    p.add_argument("--sync-bucket-mb", type=int, default=512, help="sync: bucket MiB (the engine's ray.sync_bucket_mb)")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    if any(w <= 0 or w % 128 for w in args.sync_widths):
        p.error(f"--sync-widths: {args.sync_widths}: each must be a positive multiple of 128 (64-wide heads, GQA 2)")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from megatron_onereason.eval.benchmark import rec_messages
    from megatron_onereason.generation.backend import make_backend
    from megatron_onereason.generation.params import GenerationParams, Prompt
    from megatron_onereason.generation.prompts import chat_prompt_ids

    with tempfile.TemporaryDirectory(prefix="onereason_rolloutbench_") as tmp:
        tiny, catalog, instances = build_benchmark_inputs(f"{tmp}/tiny", args)
        start = time.perf_counter()
        vllm_backend = make_backend("vllm", tiny.model_dir, tiny.catalog_dir, args.device, args.dtype, seed=0,
                                    enforce_eager=True, max_model_len=4096)
        vllm_start = time.perf_counter() - start
        hf_backend = make_backend("hf", tiny.model_dir, tiny.catalog_dir, args.device, args.dtype)
        prompts = [Prompt(chat_prompt_ids(hf_backend.tokenizer, rec_messages(i, catalog, hf_backend.vocab.scheme), True), i.domain)
                   for i in instances]
        params = GenerationParams(num_traces=args.num_traces, num_items=args.num_items,
                                  max_think_tokens=args.max_think_tokens, seed=0)
        print(f"preset {args.preset}, {len(catalog)} items, codebook {args.codebook_size}, {len(prompts)} prompts "
              f"(mean {sum(len(q.token_ids) for q in prompts) / len(prompts):.0f} tokens), "
              f"{torch.get_num_threads()} torch threads; vLLM engine start {vllm_start:.1f} s")
        bench = Bench({"vllm": vllm_backend, "transformers": hf_backend}, prompts, params)
        try:
            for section in sections:
                SECTIONS[section](bench, args)
        finally:
            vllm_backend.close()


if __name__ == "__main__":
    main()
