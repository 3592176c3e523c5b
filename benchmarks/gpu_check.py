"""The GPU check: what this project does on one CUDA GPU with plain PyTorch + Triton (no Transformer Engine).

    python benchmarks/gpu_check.py [--work DIR] [--out RESULTS.md] [--peak-tflops T]   (benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py --dry-run      every step at tiny sizes, on CPU when there is no GPU (the test)

Steps, each in its own process (a failing step is reported in the table and the others still run):

* ``env``: torch, CUDA, Triton, megatron-core, transformers versions; the GPU; the fused kernels this machine gets.
* ``logits``: a random Qwen3 (0.6B width, 4 layers) converted to megatron (``hf_to_mcore.py``), built with the local
  spec in bf16, forwards a pack of three documents (packed attention: FlexAttention on CUDA);
  transformers forwards the same documents one by one. Oracle: transformers in fp32 — megatron's bf16 error must
  stay within three times transformers' own bf16 error (and its argmax agree with fp32's as often as
  transformers' bf16 does, within 2 points: near-ties of a random model flip in bf16).
* ``train``: the trainer (``python -m megatron_onereason.train``, local spec, bf16, full recompute) on an 8B-width
  slice (Qwen3-8B hidden / FFN / heads, 4 layers, a 32K vocabulary so one GPU holds it) over 48K-token packs of
  1–4K-token documents, 4 iterations (2 warm-up): tokens/s, TFLOP/s, MFU, peak memory next to the planner's.
* ``freeze``: stage 1 (``train.trainable=[itemic_rows]``, bf16) of a tiny untied Qwen3 with an extended vocabulary
  for 2 iterations, exported to HF: every weight but the new vocabulary rows must be bit-identical to the input.

Writes one markdown table (``--out``; also printed). Exits 1 when a step fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# Every step's processes (trainer, converters) import this checkout, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (REPO, os.environ.get("PYTHONPATH"))))
STEPS = ("env", "logits", "train", "freeze")
RESULT = "GPU_CHECK_RESULT "


@dataclasses.dataclass(frozen=True)
class Sizes:
    logits_preset: str
    logits_layers: int
    logits_seq: int
    train_preset: str
    train_layers: int
    train_vocab: int
    train_seq: int
    train_docs: tuple  # (shortest, longest) document, tokens
    train_iters: int
    timeout_s: int


FULL = Sizes("0.6b", 4, 4096, "8b", 4, 32768, 49152, (1024, 4096), 4, 420)
TINY = Sizes("tiny", 2, 96, "tiny", 2, 512, 1024, (64, 256), 3, 300)


def _cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args[:1])} failed:\n{proc.stderr[-3000:]}")


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------------------ steps
def step_env(sizes: Sizes, work: str) -> Dict:
    import megatron.core
    import torch
    import transformers

    from megatron_onereason.model.builder import detect_kernel_support, fused_kernel_flags, transformer_engine_available
    from megatron_onereason.model.packed_attention import flex_available

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    cuda = torch.cuda.is_available()
    flags = fused_kernel_flags(detect_kernel_support())
    return {"torch": torch.__version__, "cuda": torch.version.cuda or "none", "triton": triton_version,
            "megatron-core": megatron.core.__version__, "transformers": transformers.__version__,
            "transformer_engine": "present" if transformer_engine_available() else "absent",
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "packed attention": "flex" if cuda and flex_available() else "sdpa",
            "fusions on": ", ".join(k for k, v in flags.items() if v is True) or "none", "ok": True}


def step_logits(sizes: Sizes, work: str) -> Dict:
    import torch
    import transformers

    from megatron_onereason.checkpoint.mcore_io import build_model_from_checkpoint
    from megatron_onereason.model.forward import forward_logits
    from megatron_onereason.model.hf_qwen3 import make_hf_qwen3
    from megatron_onereason.model.qwen3_config import qwen3_preset
    from megatron_onereason.platform import initialize_distributed

    cfg = dataclasses.replace(qwen3_preset(sizes.logits_preset), num_layers=sizes.logits_layers)
    hf_dir, mc_dir = os.path.join(work, "logits_hf"), os.path.join(work, "logits_mcore")
    make_hf_qwen3(cfg, seed=0).save_pretrained(hf_dir)
    _cli("checkpoints_convert/hf_to_mcore.py", "--hf-dir", hf_dir, "--out-dir", mc_dir, "--tp", "1", "--no-tokenizer")
    initialize_distributed(1, 1)
    dev = _device()
    model, info = build_model_from_checkpoint(mc_dir, layer_spec="local", bf16=True, params_dtype=torch.bfloat16)
    n = sizes.logits_seq
    lengths = [n // 4, n // 2, n - n // 4 - n // 2]
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, cfg.vocab_size, (1, k), generator=g).to(dev) for k in lengths]
    cu = torch.tensor([0, lengths[0], lengths[0] + lengths[1], n], dtype=torch.int32)
    mc = forward_logits([model], torch.cat(docs, dim=1), cu_seqlens=cu, vocab_size=cfg.vocab_size).float()
    del model
    refs = {}
    for dtype in (torch.float32, torch.bfloat16):
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(dev).eval()
        with torch.no_grad():
            refs[dtype] = torch.cat([hf(d).logits.float() for d in docs], dim=1)
        del hf
    exact = refs[torch.float32]
    err_mc = (mc - exact).abs().max().item()
    err_hf = (refs[torch.bfloat16] - exact).abs().max().item()
    top = exact.argmax(-1)
    agree = (mc.argmax(-1) == top).float().mean().item()
    agree_hf = (refs[torch.bfloat16].argmax(-1) == top).float().mean().item()
    ok = err_mc <= 3 * err_hf + 1e-6 and agree >= agree_hf - 0.02  # a wrong mask or RoPE is off by far more
    return {"model": f"{sizes.logits_preset} width, {cfg.num_layers} layers, vocab {cfg.vocab_size}",
            "pack": f"{n} tokens, documents {lengths}", "max |Δ| megatron bf16 vs HF fp32": f"{err_mc:.3e}",
            "max |Δ| HF bf16 vs HF fp32": f"{err_hf:.3e}",
            "max |Δ| megatron bf16 vs HF bf16": f"{(mc - refs[torch.bfloat16]).abs().max().item():.3e}",
            "argmax agreement with fp32": f"{agree:.4f} megatron bf16, {agree_hf:.4f} HF bf16", "ok": ok}


def _corpus(path: str, count: int, lengths: tuple, token_ids) -> None:
    """``count`` random documents of ``lengths`` (inclusive bounds) drawn from ``token_ids`` (ids, or a vocabulary
    size), loss on every token."""
    import numpy as np

    from megatron_onereason.data.indexed import IndexedPairWriter

    rng = np.random.default_rng(0)
    with IndexedPairWriter(path) as writer:
        for _ in range(count):
            n = int(rng.integers(lengths[0], lengths[1] + 1))
            writer.add(rng.choice(token_ids, n), np.ones(n, dtype=np.uint8))


def _train(work: str, name: str, overrides: List[str], timeout: int) -> List[Dict]:
    metrics = os.path.join(work, f"{name}.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "megatron_onereason.train", f"logging.metrics_jsonl={metrics}", "model.layer_spec=local",
           "precision.bf16=true", "train.global_batch_size=1", "optim.warmup_iters=1", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"trainer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(metrics) as f:
        return [json.loads(line) for line in f]


def step_train(sizes: Sizes, work: str, peak_tflops: float = 0.0) -> Dict:
    import statistics

    from megatron_onereason.model.qwen3_config import qwen3_preset

    cfg = dataclasses.replace(qwen3_preset(sizes.train_preset), num_layers=sizes.train_layers,
                              vocab_size=sizes.train_vocab)
    model_dir = os.path.join(work, "train_model")
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f)
    corpus = os.path.join(work, "train_corpus")
    docs_needed = sizes.train_iters * sizes.train_seq // sizes.train_docs[0] + 16
    _corpus(corpus, docs_needed, sizes.train_docs, cfg.vocab_size)
    overrides = [f"model.init_from={model_dir}", f"data.blend=[1.0, {corpus}]", f"data.seq_length={sizes.train_seq}",
                 f"data.max_sample_length={sizes.train_docs[1]}", "model.recompute_granularity=full",
                 f"train.iters={sizes.train_iters}", "train.memory_check=warn"]
    if peak_tflops:
        overrides.append(f"logging.peak_tflops_per_device={peak_tflops}")
    plan = subprocess.run([sys.executable, "-m", "megatron_onereason.plan", "--model", model_dir, "--world-size", "1",
                           "--kernels", "plain" if _device().type == "cuda" else "cpu", "--runtime-gib", "0",
                           *overrides], cwd=REPO, capture_output=True, text=True)
    planned = [line for line in plan.stdout.splitlines() if line.startswith("peak:")]
    start = time.time()
    rows = _train(work, "train", overrides, sizes.timeout_s)
    timed = rows[2:] or rows[-1:]  # the first two iterations compile kernels
    mean = lambda k: statistics.mean(r[k] for r in timed) if k in timed[0] else float("nan")  # noqa: E731
    return {"model": f"Qwen3-{sizes.train_preset} width ({cfg.hidden_size}/{cfg.ffn_hidden_size}, "
                     f"{cfg.num_attention_heads}q/{cfg.num_query_groups}kv heads), {cfg.num_layers} layers, "
                     f"vocab {cfg.vocab_size}, {cfg.num_parameters() / 1e9:.2f}B parameters",
            "pack": f"{sizes.train_seq} tokens of {sizes.train_docs[0]}–{sizes.train_docs[1]}-token documents, "
                    "full recompute, bf16",
            "loss (first → last)": f"{rows[0]['loss']:.4f} → {rows[-1]['loss']:.4f}",
            "tokens/s": f"{mean('tokens_per_sec'):,.0f}", "TFLOP/s per device": f"{mean('tflops_per_device'):.1f}",
            "MFU": f"{mean('mfu'):.1%}" if "mfu" in timed[0] else "n/a (give --peak-tflops)",
            "step time (s)": f"{mean('iteration_time'):.2f}",
            "peak memory (GiB)": f"{max(r['memory_gib'] for r in rows):.1f} measured, "
                                 + (planned[0].split(",")[1].split(" of ")[0].strip() if planned else "n/a")
                                 + " planned (without the CUDA context)",
            "wall (s)": f"{time.time() - start:.0f}", "ok": all(r["loss"] == r["loss"] for r in rows)}


def step_freeze(sizes: Sizes, work: str) -> Dict:
    import torch
    from safetensors.torch import load_file, save_file

    from megatron_onereason.model.qwen3_config import qwen3_preset
    from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab, preset
    from megatron_onereason.tokenizer.qwen3_tokenizer import save_tiny_hf_qwen3
    from megatron_onereason.tokenizer.vocab_extension import extend_vocabulary

    base, extended = os.path.join(work, "freeze_base"), os.path.join(work, "freeze_hf")
    save_tiny_hf_qwen3(base, dataclasses.replace(qwen3_preset("tiny"), tie_word_embeddings=False), seed=3)
    extend_vocabulary(base, extended, preset("onereason_report", codebook_size=32))
    # bf16-valued weights: the bf16 model and its fp32 master copy then hold the very same values, so an untouched
    # weight must come back bit-identical.
    for path in glob.glob(os.path.join(extended, "*.safetensors")):
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(path).items()}, path,
                  metadata={"format": "pt"})
    mcore, save, exported = (os.path.join(work, d) for d in ("freeze_mcore", "freeze_stage1", "freeze_export"))
    _cli("checkpoints_convert/hf_to_mcore.py", "--hf-dir", extended, "--out-dir", mcore, "--tp", "1")
    vocab = ItemicVocab.load(extended)
    corpus = os.path.join(work, "freeze_corpus")
    _corpus(corpus, 64, (16, 48), vocab.itemic_ids)
    _train(work, "freeze", [f"model.load={mcore}", f"data.blend=[1.0, {corpus}]", "data.seq_length=128",
                            "data.max_sample_length=48", "train.iters=2", "train.trainable=[itemic_rows]",
                            "optim.lr=3e-3", f"checkpoint.save={save}"], sizes.timeout_s)
    _cli("checkpoints_convert/mcore_to_hf.py", "--mcore-dir", save, "--out-dir", exported)
    before, after = {}, {}
    for d, out in ((extended, before), (exported, after)):
        for path in glob.glob(os.path.join(d, "*.safetensors")):
            out.update({k: v.float() for k, v in load_file(path).items()})
    vocab_matrices = {"model.embed_tokens.weight", "lm_head.weight"}
    changed = [k for k, v in before.items() if k not in vocab_matrices and not torch.equal(v, after[k])]
    new = torch.from_numpy(vocab.itemic_ids)
    old = torch.ones(before["lm_head.weight"].size(0), dtype=torch.bool)
    old[new] = False
    old_rows = [k for k in vocab_matrices if not torch.equal(before[k][old], after[k][old])]
    moved = (after["lm_head.weight"][new] - before["lm_head.weight"][new]).abs().amax(1) > 0
    ok = set(before) == set(after) and not changed and not old_rows and bool(moved.all())
    return {"frozen tensors bit-identical": f"{len(before) - len(vocab_matrices) - len(changed)}"
                                            f"/{len(before) - len(vocab_matrices)}",
            "old vocabulary rows bit-identical": "yes" if not old_rows else f"no: {old_rows}",
            "new output rows moved": f"{int(moved.sum())}/{moved.numel()}", "ok": ok}


# ------------------------------------------------------------------------------------------------------- driver
def run_step(name: str, sizes: Sizes, work: str, peak_tflops: float) -> Dict:
    """One step in a fresh process (its own process group and CUDA context); its result, or its error."""
    cmd = [sys.executable, os.path.abspath(__file__), "--step", name, "--work", work, "--peak-tflops",
           str(peak_tflops)] + (["--dry-run"] if sizes is TINY else [])
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=sizes.timeout_s + 120)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {sizes.timeout_s + 120} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return {"ok": False, "error": f"exit {proc.returncode}: {tail[0][:300]}", "log": proc.stderr[-6000:]}
    result = json.loads(lines[-1][len(RESULT):])
    result["seconds"] = f"{time.time() - start:.0f}"
    return result


def table(results: Dict[str, Dict], sizes: Sizes) -> str:
    rows = [f"# GPU check ({'dry run, tiny sizes' if sizes is TINY else 'full sizes'})", "",
            "| step | ok | result |", "|---|---|---|"]
    for name, r in results.items():
        details = "; ".join(f"{k}: {v}" for k, v in r.items() if k not in ("ok", "log"))
        rows.append(f"| {name} | {'PASS' if r['ok'] else 'FAIL'} | {details} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every step at tiny sizes (CPU when there is no GPU)")
    p.add_argument("--work", help="scratch directory (default: a temporary one)")
    p.add_argument("--out", default="gpu_check_results.md", help="the results table (markdown)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="bf16 dense peak per GPU for MFU (default: known for H100/H200 only)")
    p.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # internal: run one step in this process
    args = p.parse_args(argv)
    sizes = TINY if args.dry_run else FULL
    if args.step:
        fn = {"env": step_env, "logits": step_logits, "train": step_train, "freeze": step_freeze}[args.step]
        result = fn(sizes, args.work, args.peak_tflops) if args.step == "train" else fn(sizes, args.work)
        print(RESULT + json.dumps(result), flush=True)
        return 0
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        print(f"gpu_check: unknown step(s) {unknown}; known: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = args.work or tmp
        results = {}
        for name in steps:
            os.makedirs(os.path.join(work, name), exist_ok=True)
            print(f"gpu_check: {name} ...", flush=True)
            results[name] = run_step(name, sizes, os.path.join(work, name), args.peak_tflops)
            if not results[name]["ok"] and "log" in results[name]:
                print(results[name]["log"], file=sys.stderr)
    text = table(results, sizes)
    with open(args.out, "w") as f:
        f.write(text)
    print(text + f"(written to {args.out})")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
