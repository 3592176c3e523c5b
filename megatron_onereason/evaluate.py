"""Evaluate a model on a recommendation benchmark: RecIF-Bench, or the project's synthetic benchmark.

    python -m megatron_onereason.evaluate --model HF_OR_MCORE_DIR --recif TASK_DIR_OR_FILE [--catalog DIR] \\
        [--sid2pid sid2pid.json] [--k 1,32,128] [--mode thinking|non-thinking|both] --out REPORT_DIR
    python -m megatron_onereason.evaluate --score-generations GENERATED.json [--sid2pid FILE] --out SCORES.json
    python -m megatron_onereason.evaluate --model HF_OR_MCORE_DIR --catalog ITEMIC_TOKENIZER_DIR \\
        --data BENCH.jsonl --tasks rec[,cot] --k 1,8,16,32,64 --mode thinking|non-thinking|both --out REPORT_DIR

``--model`` is a HF directory with an extended tokenizer (``itemic_tokens.json``; ``tools/import_itemic_vocab.py``
writes it for a released OpenOneRec checkpoint) or a megatron checkpoint (``onereason_model.json``), which is
exported to a temporary HF directory first.

**RecIF-Bench** (``--recif``; formats in :mod:`megatron_onereason.eval.recif`): the benchmark's messages verbatim,
rendered as OpenOneRec's ``qwen3_soft_switch`` template renders them (``/think`` or ``/no_think`` on the last user
turn), and OpenOneRec's decoding: in thinking mode ``--num-traces`` reasoning traces sampled at ``--temperature``
up to ``</think>``, then ``\\n`` and the begin token; without thinking the begin token follows the prompt; then a
beam search over exactly the code tokens (no end token), ``--num-beams`` per trace (default ``max(K)`` over all
traces: OpenOneRec's 128 = 16 beams x 8 traces). Items are constrained to the catalog with ``--catalog``, else to
the scheme's token pattern only. Generations are ranked trace-major, as OpenOneRec stores them (its ``first_k``).
Reports ``pass@K``, ``position1_pass@K``, ``recall@K`` and, with ``--sid2pid``, their ``pid_*`` versions; writes
``REPORT_DIR/report.json``, ``report.md`` and ``generations_{mode}.json`` (OpenOneRec's dump layout, which
``--score-generations`` re-scores).

**Synthetic benchmark** (``--data``, :mod:`megatron_onereason.eval.benchmark`; ``tools/make_synthetic_benchmark.py``
writes one): ``--catalog`` (``catalog.parquet``) constrains decoding and maps patterns back to item ids; Pass@K /
Recall@K per domain; items per instance: ``max(K)`` per trace, by ``--strategy``. Task ``cot`` adds, in thinking
mode, ΔLL (eq. 21), γ_legal (eq. 24), γ_hist|legal (eq. 25) and, with ``--cot-progression``, ℓ_t (eq. 23).

The report directory is written to a temporary sibling and renamed when complete (``--overwrite`` replaces one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from megatron_onereason.checkpoint.hf_io import read_weight_map
from megatron_onereason.checkpoint.mcore_io import MODEL_JSON
from megatron_onereason.cli import run_cli
from megatron_onereason.eval.benchmark import TASKS, RecInstance, load_benchmark, rec_instances, rec_messages
from megatron_onereason.eval.rec_eval import (
    cot_measurement,
    markdown_tables,
    mean_by_domain,
    mean_curve,
    ranked_item_ids,
    rec_metrics,
)
from megatron_onereason.eval.recif import (
    DEFAULT_KS,
    PID_STRATEGIES,
    RECIF_ANSWER_SEPARATOR,
    Sid2Pid,
    generated_sample,
    load_recif_task,
    markdown_table,
    prompt_text,
    score_generations,
    score_samples,
    write_generations,
)
from megatron_onereason.fileio import atomic_directory, atomic_file
from megatron_onereason.generation.backend import BACKENDS, GenerationBackend
from megatron_onereason.generation.params import ITEM_STRATEGIES, GenerationParams, Prompt
from megatron_onereason.generation.prompts import chat_prompt_ids
from megatron_onereason.help_text import DocHelpFormatter
from megatron_onereason.tokenizer.itemic_tokens import PRESETS, ItemicScheme, TokenizerFiles, preset

SYNTHETIC_KS = (1, 8, 16, 32, 64)
MODES = {"thinking": (True,), "non-thinking": (False,), "both": (True, False)}
ALL_TASKS = TASKS + ("cot",)


def _mode_name(thinking: bool) -> str:
    return "thinking" if thinking else "non-thinking"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DocHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--recif", metavar="PATH", help="RecIF-Bench task: a task folder, a .parquet or a .jsonl file")
    source.add_argument("--score-generations", metavar="FILE",
                        help="score a stored RecIF generation dump (OpenOneRec's or evaluate's) without a model")
    source.add_argument("--data", help="synthetic benchmark JSONL (the project's format, eval/benchmark.py)")
    p.add_argument("--model", help="HF directory or megatron checkpoint directory")
    p.add_argument("--catalog", help="itemic tokenizer directory (catalog.parquet, manifest.json); optional for RecIF")
    p.add_argument("--out", required=True, help="report directory; a JSON file for --score-generations")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report directory")
    p.add_argument("--k", help="comma-separated K values (default: RecIF 1,32,128; synthetic 1,8,16,32,64)")
    p.add_argument("--mode", choices=sorted(MODES), default="both", help="thinking, non-thinking or both")
    p.add_argument("--num-traces", type=int, default=1, help="reasoning traces per instance (thinking mode)")
    p.add_argument("--max-think-tokens", type=int, help="reasoning tokens before </think> is forced "
                                                         "(default: RecIF 1000, synthetic 256)")
    p.add_argument("--temperature", type=float, help="reasoning temperature, 0: greedy (default: RecIF 0.6, "
                                                     "synthetic 0)")
    p.add_argument("--batch-size", type=int, default=8, help="instances per generation call")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N instances only (0: all)")
    p.add_argument("--constrain-reasoning", action="store_true",
                   help="also constrain itemic patterns inside the CoT to catalog items (γ_legal is then 1 by "
                        "construction; by default the CoT is free, as in OpenOneRec, and γ_legal measures the model)")
    p.add_argument("--backend", choices=BACKENDS, default="hf",
                   help="generation engine: hf (transformers, the reference) or vllm (beam rounds served from the "
                        "prefix cache)")
    p.add_argument("--device", default="cpu", help="hf backend device")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    recif = p.add_argument_group("RecIF-Bench (--recif, --score-generations)")
    recif.add_argument("--split", default="test", help="task folder split: {task}/{task}_{split}.parquet")
    recif.add_argument("--num-beams", type=int, help="items per trace (default: max(K) / traces, rounded up)")
    recif.add_argument("--skip-invalid", action="store_true", help="skip and count malformed rows")
    recif.add_argument("--sid2pid", metavar="FILE", help="sid2pid.json: adds the pid_* metrics")
    recif.add_argument("--sid2pid-strategy", choices=PID_STRATEGIES, default=PID_STRATEGIES[0],
                       help="which of the products sharing a code tuple a generated item counts as (OpenOneRec's)")
    recif.add_argument("--scheme", choices=sorted(PRESETS),
                       help="itemic scheme of a --score-generations dump (default: the one it records, else "
                            "openonerec)")
    synthetic = p.add_argument_group("synthetic benchmark (--data)")
    synthetic.add_argument("--tasks", default="rec", help=f"comma-separated, from {ALL_TASKS}")
    synthetic.add_argument("--strategy", choices=ITEM_STRATEGIES, default="beam", help="how the K items are decoded")
    synthetic.add_argument("--item-temperature", type=float, default=1.0,
                           help="item sampling temperature (--strategy sample)")
    synthetic.add_argument("--cot-progression", action="store_true",
                           help="also compute ℓ_t along CoT segments (eq. 23)")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in ALL_TASKS]
    if unknown or "rec" not in args.tasks:
        p.error(f"--tasks must include rec and come from {ALL_TASKS}, got {args.tasks}")
    is_recif = args.data is None
    try:
        args.k = sorted({int(k) for k in (args.k or ",".join(map(str, DEFAULT_KS if is_recif else SYNTHETIC_KS)))
                        .split(",")})
    except ValueError:
        p.error(f"--k must be comma-separated integers, got {args.k!r}")
    if args.k[0] < 1:
        p.error("--k values must be >= 1")
    if args.score_generations is None and args.model is None:
        p.error("--recif and --data need --model")
    if args.data is not None and args.catalog is None:
        p.error("--data needs --catalog")
    if not is_recif and (args.sid2pid or args.scheme):
        p.error("--sid2pid and --scheme apply to RecIF (--recif, --score-generations)")
    if args.num_traces < 1 or (args.num_beams is not None and args.num_beams < 1) or args.batch_size < 1:
        p.error("--num-traces, --num-beams and --batch-size must be >= 1")
    if args.temperature is None:
        args.temperature = 0.6 if is_recif else 0.0  # OpenOneRec's stage-1 temperature
    if args.max_think_tokens is None:
        args.max_think_tokens = 1000 if is_recif else 256  # OpenOneRec's max_new_thinking_tokens
    if "cot" in args.tasks and args.backend != "hf":
        p.error("--tasks cot scores targets with the model's forward pass: it needs --backend hf")
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


def run_evaluation(args: argparse.Namespace, model_dir: str, out_dir: str) -> Dict:
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
    report = {
        "model": args.model, "data": args.data, "catalog": args.catalog, "tasks": args.tasks, "k": args.k,
        "strategy": args.strategy, "num_traces": args.num_traces, "max_think_tokens": args.max_think_tokens,
        "backend": args.backend, "results": results, "ll_progression": curves, "throughput": throughput,
    }
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(f"# Evaluation of {args.model} on {args.data}\n\n")
        f.write(markdown_tables(results, args.k))
    print(markdown_tables(results, args.k))
    return report


def run_recif(args: argparse.Namespace, model_dir: str, out_dir: str) -> Dict:
    """RecIF-Bench with OpenOneRec's prompt and decoding (see the module docstring)."""
    from tqdm import tqdm

    sid2pid = Sid2Pid.load(args.sid2pid, args.sid2pid_strategy, args.seed) if args.sid2pid else None
    scheme = ItemicScheme.load(model_dir)  # the inputs are checked before the model is loaded
    task = load_recif_task(args.recif, scheme, args.split, args.skip_invalid, args.limit)
    backend = _backend(args, model_dir)
    tokenizer = backend.tokenizer
    separator = tokenizer.encode(RECIF_ANSWER_SEPARATOR, add_special_tokens=False)
    header = {"model_name": os.path.basename(os.path.normpath(args.model)), "task_name": task.name,
              "split": args.split, "scheme": scheme.to_dict()}
    results = {}
    for thinking in MODES[args.mode]:
        mode = _mode_name(thinking)
        traces = args.num_traces if thinking else 1
        beams = args.num_beams or -(-args.k[-1] // traces)
        texts = [prompt_text(tokenizer, s.messages, thinking) for s in task.samples]
        # the begin token is the item's first token: forced, so the prompt ends with it as in OpenOneRec
        prompts = [Prompt(tokenizer.encode(text, add_special_tokens=False), s.targets[0].domain, separator)
                   for text, s in zip(texts, task.samples)]
        stored, seconds = [], 0.0
        bar = tqdm(total=len(prompts), desc=f"{task.name} {mode}", unit="sample")
        for batch, start in enumerate(range(0, len(prompts), args.batch_size)):
            params = GenerationParams(thinking=thinking, num_traces=traces, num_items=beams, item_strategy="beam",
                                      temperature=args.temperature, max_think_tokens=args.max_think_tokens,
                                      constrain_reasoning=args.constrain_reasoning, item_end=False,
                                      seed=args.seed + batch)
            t0 = time.perf_counter()
            outputs = backend.generate(prompts[start:start + args.batch_size], params)
            seconds += time.perf_counter() - t0
            for i, output in enumerate(outputs, start):
                stored.append(generated_sample(task.samples[i], texts[i], output, tokenizer))
            bar.update(len(outputs))
        bar.close()
        scores = score_samples(stored, scheme, args.k, sid2pid, task.path)
        write_generations(os.path.join(out_dir, f"generations_{mode}.json"), header, stored, scores["per_sample"])
        results[mode] = {k: v for k, v in scores.items() if k != "per_sample"}
        results[mode].update(num_traces=traces, num_beams=beams, generation_seconds=seconds)
    report = {"model": args.model, "recif": task.path, "task": task.name, "catalog": args.catalog,
              "sid2pid": args.sid2pid, "scheme": scheme.name, "k": args.k, "skipped": task.skipped,
              "temperature": args.temperature, "max_think_tokens": args.max_think_tokens, "backend": args.backend,
              "results": results}
    table = markdown_table(results)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(f"# RecIF-Bench {task.name}: {args.model}\n\n{table}")
    print(table)
    return report


SCORES_JSON = "scores.json"  # what --score-generations writes when --out is a directory


def scores_path(out: str, source: str) -> str:
    """Where ``--score-generations SOURCE --out OUT`` writes: inside OUT when it is a directory (or ends in /);
    never over the dump it scores."""
    path = os.path.join(out, SCORES_JSON) if os.path.isdir(out) or out.endswith(os.sep) else out
    if os.path.exists(path) and os.path.samefile(path, source):
        raise ValueError(f"--out {out} is the generation dump being scored ({source}): it would be replaced by its "
                         "scores; give another file or a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"--out {out}: {parent} is not a directory (create it, or name a file in an existing "
                                 "one)")
    return path


def _score_generations(args: argparse.Namespace) -> Dict:
    out = scores_path(args.out, args.score_generations)
    sid2pid = Sid2Pid.load(args.sid2pid, args.sid2pid_strategy, args.seed) if args.sid2pid else None
    scheme = preset(args.scheme) if args.scheme else None
    report = score_generations(args.score_generations, args.k, sid2pid, scheme)
    with atomic_file(out) as f:
        json.dump(report, f, indent=1)
    means = ", ".join(f"{name} {value:.4f}" for name, value in report["mean"].items())
    counts = report["counts"]
    print(f"{counts['samples']} samples from {args.score_generations}: {means} -> {out}")
    if counts["unparsed_generations"] or counts["no_generations"]:
        print(f"{counts['unparsed_generations']} of {counts['generations']} generations hold no item of scheme "
              f"{report['scheme']} (scored as misses); {counts['no_generations']} samples have no generation")
    return report


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    if args.score_generations is not None:
        return _score_generations(args)
    run = run_recif if args.recif is not None else run_evaluation
    if not os.path.exists(os.path.join(args.model, MODEL_JSON)):  # a HF directory: weights, tokenizer, before any work
        try:
            read_weight_map(args.model)
            TokenizerFiles(args.model)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--model {e}") from None
    with tempfile.TemporaryDirectory(prefix="onereason_eval_") as tmp, \
            atomic_directory(args.out, overwrite=args.overwrite) as out_dir:
        model_dir = args.model
        if os.path.exists(os.path.join(args.model, MODEL_JSON)):  # a megatron checkpoint: export it to HF first
            from megatron_onereason.checkpoint.convert import convert_mcore_to_hf

            model_dir = os.path.join(tmp, "hf")
            convert_mcore_to_hf(args.model, model_dir)
        report = run(args, model_dir, out_dir)
        with open(os.path.join(out_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``main`` with bad input reported as one line on stderr (exit status 1) instead of a traceback."""
    def evaluate() -> None:
        main(argv)

    return run_cli("evaluate", evaluate)


if __name__ == "__main__":
    sys.exit(cli())
