"""The GPU check: what this project does on one CUDA GPU with plain PyTorch + Triton (no Transformer Engine).

    bash benchmarks/gpu_check.sh --wheels DIR --out RESULTS.md     on the GPU machine (installs the pinned wheels)
    python benchmarks/gpu_check.py [--work DIR] [--out RESULTS.md] [--peak-tflops T] [--budget-s S]
    python benchmarks/gpu_check.py --dry-run      every step at tiny sizes, on CPU when there is no GPU (the test)

Steps, each in its own process with its own time limit (a failing or timed-out step is reported in the table and the
others still run; the whole check stops starting steps when ``--budget-s`` is spent):

* ``env``: torch, CUDA, Triton, megatron-core, transformers versions (and whether they are the pinned ones of
  ``gpu_check_requirements.txt``); the GPU; its measured bf16 matmul TFLOP/s; the fused kernels this machine gets;
  and every module the other steps import (a missing wheel fails here, in seconds, not minutes later).
* ``logits``: a random Qwen3 (0.6B width, 4 layers) converted to megatron (``hf_to_mcore.py``), built with the local
  spec in bf16, forwards a pack of three documents (packed attention: FlexAttention on CUDA);
  transformers forwards the same documents one by one. Oracle: transformers in fp32 — megatron's bf16 error must
  stay within three times transformers' own bf16 error (and its argmax agree with fp32's as often as
  transformers' bf16 does, within 2 points: near-ties of a random model flip in bf16).
* ``freeze``: stage 1 (``train.trainable=[itemic_rows]``, bf16) of a tiny untied Qwen3 with an extended vocabulary
  for 2 iterations, exported to HF: every weight but the new vocabulary rows must be bit-identical to the input.
* ``train``: the trainer (``python -m megatron_onereason.train``, local spec, bf16, full recompute) on an 8B-width
  slice (Qwen3-8B hidden / FFN / heads, 4 layers, a 32K vocabulary so one GPU holds it) over 48K-token packs of
  1–4K-token documents, 4 iterations (2 warm-up): tokens/s, TFLOP/s, MFU against ``--peak-tflops`` (790: the bf16
  dense matmul rate measured on the lent H200), peak memory next to the planner's.
* ``rl``: the RL actor (:class:`megatron_onereason.rl.actor.MegatronActor`, the same 8B-width slice, bf16) on tree
  packs (OneReason §6.1: prompt + trace once, K item children) of 4K, 8K and 16K positions: the ``logprobs``
  forward and the ``train_grpo`` step (forward + backward + update), time and peak memory each, through
  FlexAttention on CUDA; the first call of each pack length minus a steady one is FlexAttention's compile time for
  that bucket.

The results table (``--out``) gets its header at the start and each step's row the moment the step ends, so a
killed run still leaves the rows of the steps it finished. Exits 1 when a step fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# Every step's processes (trainer, converters) import this checkout, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (REPO, os.environ.get("PYTHONPATH"))))
# transformers >= 5.2x fetches "hub kernels" at load time unless told not to: nothing may be fetched here.
os.environ.setdefault("USE_HUB_KERNELS", "0")
STEPS = ("env", "logits", "freeze", "train", "rl")
RESULT = "GPU_CHECK_RESULT "
REQUIREMENTS = os.path.join(REPO, "benchmarks", "gpu_check_requirements.txt")
# What the steps import (checked by ``env``, so that a missing package fails at once with its name).
STEP_MODULES = (
    "megatron.core", "transformers", "safetensors.torch", "numpy", "megatron_onereason.train",
    "megatron_onereason.plan", "megatron_onereason.checkpoint.convert", "megatron_onereason.checkpoint.mcore_io",
    "megatron_onereason.model.forward", "megatron_onereason.model.hf_qwen3",
    "megatron_onereason.tokenizer.qwen3_tokenizer", "megatron_onereason.tokenizer.vocab_extension",
    "megatron_onereason.data.indexed", "megatron_onereason.rl.actor", "megatron_onereason.rl.tree_pack",
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    logits_preset: str
    logits_layers: int
    logits_seq: int
    train_preset: str  # also the RL actor's width, layers and vocabulary
    train_layers: int
    train_vocab: int
    train_seq: int
    train_docs: tuple  # (shortest, longest) document, tokens
    train_iters: int
    rl_lengths: tuple  # tree-pack lengths (one FlexAttention bucket each)
    rl_tree: tuple  # (prompt, trace, children K, child length) tokens of one tree
    step_limit_s: Dict  # each step's own time limit
    budget_s: int  # the whole check: no step starts (or runs) past it


# On one H200 the steps take about 0.5 + 1 + 1 + 2 + 2.5 minutes; the limits leave room, the budget keeps the whole
# check under 8 minutes (the lent machine gives 15 minutes in all: a rerun must fit).
FULL = Sizes("0.6b", 4, 4096, "8b", 4, 32768, 49152, (1024, 4096), 4, (4096, 8192, 16384), (512, 1536, 8, 8),
             {"env": 90, "logits": 150, "freeze": 120, "train": 240, "rl": 240}, 450)
TINY = Sizes("tiny", 2, 96, "tiny", 2, 512, 1024, (64, 256), 3, (256, 512, 1024), (16, 48, 4, 4),
             {"env": 180, "logits": 300, "freeze": 300, "train": 300, "rl": 300}, 1500)


def _cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args[:1])} failed:\n{proc.stderr[-3000:]}")


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------------------ steps
def pinned_versions(path: str = REQUIREMENTS) -> Dict[str, str]:
    """``name -> version`` of the ``name==version`` lines of the requirements file."""
    pins = {}
    with open(path) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, _, version = line.partition("==")
                pins[name.strip()] = version.strip()
    return pins


def _matmul_tflops() -> float:
    """bf16 dense rate of an 8192³ matrix product (mean of 10 after 3 warm-ups): the MFU denominator's reading."""
    import torch

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - start) / 1e12


def step_env(sizes: Sizes, work: str) -> Dict:
    import importlib
    import importlib.metadata

    import torch

    for module in STEP_MODULES:
        importlib.import_module(module)
    from megatron_onereason.model.builder import detect_kernel_support, fused_kernel_flags, transformer_engine_available
    from megatron_onereason.model.packed_attention import flex_available

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    cuda = torch.cuda.is_available()
    flags = fused_kernel_flags(detect_kernel_support())
    installed = {name: importlib.metadata.version(name) for name in pinned_versions()}
    off_pin = [f"{n} {v} (pinned {pinned_versions()[n]})" for n, v in installed.items() if v != pinned_versions()[n]]
    result = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda or "none",
              "triton": triton_version, **installed, "pins": "as pinned" if not off_pin else "; ".join(off_pin),
              "transformer_engine": "present" if transformer_engine_available() else "absent",
              "device": torch.cuda.get_device_name() if cuda else "cpu",
              "packed attention": "flex" if cuda and flex_available() else "sdpa",
              "fusions on": ", ".join(k for k, v in flags.items() if v is True) or "none",
              "step imports": f"{len(STEP_MODULES)} modules"}
    if cuda:
        result["bf16 matmul 8192³"] = f"{_matmul_tflops():.0f} TFLOP/s"
    return {**result, "ok": True}


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


def _train(work: str, name: str, overrides: List[str]) -> List[Dict]:
    metrics = os.path.join(work, f"{name}.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "megatron_onereason.train", f"logging.metrics_jsonl={metrics}", "model.layer_spec=local",
           "precision.bf16=true", "train.global_batch_size=1", "optim.warmup_iters=1", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)  # the step's limit bounds it
    if proc.returncode:
        raise RuntimeError(f"trainer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(metrics) as f:
        return [json.loads(line) for line in f]


def _slice_model(sizes: Sizes, model_dir: str):
    """The trained slice (the preset's width, ``train_layers`` layers, ``train_vocab`` tokens) as a HF config.json in
    ``model_dir`` (``model.init_from``: random weights); its Qwen3Config."""
    from megatron_onereason.model.qwen3_config import qwen3_preset

    cfg = dataclasses.replace(qwen3_preset(sizes.train_preset), num_layers=sizes.train_layers,
                              vocab_size=sizes.train_vocab)
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f)
    return cfg


def step_train(sizes: Sizes, work: str, peak_tflops: float = 0.0) -> Dict:
    import statistics

    model_dir = os.path.join(work, "train_model")
    cfg = _slice_model(sizes, model_dir)
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
    rows = _train(work, "train", overrides)
    timed = rows[2:] or rows[-1:]  # the first two iterations compile kernels
    mean = lambda k: statistics.mean(r[k] for r in timed) if k in timed[0] else float("nan")  # noqa: E731
    return {"model": f"Qwen3-{sizes.train_preset} width ({cfg.hidden_size}/{cfg.ffn_hidden_size}, "
                     f"{cfg.num_attention_heads}q/{cfg.num_query_groups}kv heads), {cfg.num_layers} layers, "
                     f"vocab {cfg.vocab_size}, {cfg.num_parameters() / 1e9:.2f}B parameters",
            "pack": f"{sizes.train_seq} tokens of {sizes.train_docs[0]}–{sizes.train_docs[1]}-token documents, "
                    "full recompute, bf16",
            "loss (first → last)": f"{rows[0]['loss']:.4f} → {rows[-1]['loss']:.4f}",
            "tokens/s": f"{mean('tokens_per_sec'):,.0f}", "TFLOP/s per device": f"{mean('tflops_per_device'):.1f}",
            f"MFU (of {peak_tflops:g} TFLOP/s)": f"{mean('mfu'):.1%}" if "mfu" in timed[0] else "n/a",
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
                            "optim.lr=3e-3", f"checkpoint.save={save}"])
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


def _random_trees(count: int, shape: tuple, vocab: int, rng):
    from megatron_onereason.rl.tree_pack import TreeSequence

    prompt, trace, k, child = shape
    ids = lambda n: rng.integers(1, vocab, n).tolist()  # noqa: E731
    return [TreeSequence(ids(prompt), ids(trace), [ids(child) for _ in range(k)]) for _ in range(count)]


def step_rl(sizes: Sizes, work: str) -> Dict:
    import numpy as np
    import torch

    from megatron_onereason.model.packed_attention import resolve_backend
    from megatron_onereason.platform import device
    from megatron_onereason.rl.actor import ActorSpec, GRPOMicroBatch, MegatronActor
    from megatron_onereason.rl.tree_pack import pack_trees, tree_logprobs_layout
    from megatron_onereason.training.config import ModelSection, OptimSection, ParallelSection, PrecisionSection

    model_dir = os.path.join(work, "rl_model")
    cfg = _slice_model(sizes, model_dir)
    spec = ActorSpec(ModelSection(init_from=model_dir, layer_spec="local"), ParallelSection(),
                     PrecisionSection(bf16=True), OptimSection(lr=1e-6, min_lr=1e-6, decay_style="constant"),
                     pack_length=sizes.rl_lengths[0], total_steps=100)
    actor = MegatronActor(spec)
    dev = device()
    cuda = dev.type == "cuda"
    rng = np.random.default_rng(0)
    prompt, trace, k, child = sizes.rl_tree
    tree_length = prompt + trace + k * (child + 1)

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None

    backend = resolve_backend("auto", dev)
    row = {"model": f"Qwen3-{sizes.train_preset} width, {cfg.num_layers} layers, vocab {cfg.vocab_size}, bf16",
           "tree": f"prompt {prompt} + trace {trace}, K={k} children of {child}",
           "attention": backend + ("" if cuda else " (CPU: no FlexAttention backward)"),
           "per pack length": "time per call; peak memory (CUDA) of logprobs / train step; FlexAttention compile "
                              "(first call minus a steady one) of logprobs + train step"}
    finite = True
    for length in sizes.rl_lengths:
        trees = max(length // tree_length, 1)
        pack = pack_trees(_random_trees(trees, sizes.rl_tree, cfg.vocab_size, rng), length)
        actor.spec = dataclasses.replace(spec, pack_length=length)
        (logp,), first_fwd, _ = timed(lambda: actor.logprobs([pack]))
        (logp,), fwd, fwd_mem = timed(lambda: actor.logprobs([pack]))
        trace_old, child_old = tree_logprobs_layout(logp, pack)
        advantages = torch.from_numpy(rng.standard_normal(pack.child_index.shape[:2])).float()
        mb = GRPOMicroBatch(pack, pack.trace_mask, pack.child_mask, trace_old, child_old, advantages,
                            torch.ones_like(advantages))
        train = lambda: actor.train_grpo([mb], (0.2, 0.28), (0.1, 0.1))  # noqa: E731
        _, first_train, _ = timed(train)
        metrics, step, train_mem = timed(train)
        finite &= bool(torch.isfinite(logp).all()) and metrics["loss"] == metrics["loss"]
        memory = f", peak {fwd_mem:.1f} / {train_mem:.1f} GiB" if cuda else ""
        row[f"{length} positions"] = (
            f"{trees} trees; logprobs {fwd:.3f} s, train step {step:.3f} s ({length / step:,.0f} tokens/s){memory}; "
            f"compile {max(first_fwd - fwd, 0):.1f} + {max(first_train - step, 0):.1f} s")
        print(RESULT + json.dumps({**row, "ok": False}), flush=True)  # what a time-out leaves in the table
    return {**row, "ok": finite and (backend == "flex" or not cuda)}


# ------------------------------------------------------------------------------------------------------- driver
STEP_FUNCTIONS = {"env": step_env, "logits": step_logits, "freeze": step_freeze, "train": step_train, "rl": step_rl}


def run_step(name: str, sizes: Sizes, work: str, peak_tflops: float, limit_s: float) -> Dict:
    """One step in a fresh process (its own process group and CUDA context), killed with everything it started
    (trainer, converters) after ``limit_s``; its result, or its error (with what it reported before a time-out)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--step", name, "--work", work, "--peak-tflops",
           str(peak_tflops)] + (["--dry-run"] if sizes is TINY else [])
    out_path, log_path = os.path.join(work, "step.out"), os.path.join(work, "step.log")
    start = time.time()
    with open(out_path, "w") as out, open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=log, start_new_session=True)
        try:
            proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = f"{time.time() - start:.0f}"
    with open(out_path) as f:
        lines = [line for line in f.read().splitlines() if line.startswith(RESULT)]
    reported = json.loads(lines[-1][len(RESULT):]) if lines else {}
    if proc.returncode == -signal.SIGKILL:
        return {**reported, "ok": False, "error": f"stopped at its time limit of {limit_s:.0f} s (log: {log_path})",
                "seconds": seconds}
    with open(log_path) as f:
        stderr = f.read()
    if proc.returncode or not lines:
        tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return {"ok": False, "error": f"exit {proc.returncode}: {tail[0][:300]}", "seconds": seconds,
                "log": stderr[-6000:]}
    return {**reported, "seconds": seconds}


def table_header(sizes: Sizes) -> str:
    return (f"# GPU check ({'dry run, tiny sizes' if sizes is TINY else 'full sizes'})\n\n"
            "| step | ok | result |\n|---|---|---|\n")


def table_row(name: str, result: Dict) -> str:
    details = "; ".join(f"{k}: {v}" for k, v in result.items() if k not in ("ok", "log"))
    return f"| {name} | {'PASS' if result['ok'] else 'FAIL'} | {details.replace('|', chr(92) + '|')} |\n"


def append(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every step at tiny sizes (CPU when there is no GPU)")
    p.add_argument("--work", help="scratch directory (default: a temporary one)")
    p.add_argument("--out", default="gpu_check_results.md", help="the results table (markdown), one row per step "
                                                                  "as it ends")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--peak-tflops", type=float, default=790.0,
                   help="bf16 dense peak per GPU for MFU (default 790: an 8192³ bf16 matmul on the lent H200)")
    p.add_argument("--budget-s", type=float, help="time for the whole check; a step is cut at what is left "
                                                  "(default 450 s, dry run 1500 s)")
    p.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # internal: run one step in this process
    args = p.parse_args(argv)
    sizes = TINY if args.dry_run else FULL
    if args.step:
        fn = STEP_FUNCTIONS[args.step]
        result = fn(sizes, args.work, args.peak_tflops) if args.step == "train" else fn(sizes, args.work)
        print(RESULT + json.dumps(result), flush=True)
        return 0
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        print(f"gpu_check: unknown step(s) {unknown}; known: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    budget = args.budget_s or sizes.budget_s
    deadline = time.time() + budget
    with open(args.out, "w") as f:
        f.write(table_header(sizes))
    print(table_header(sizes), end="", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = args.work or tmp
        for name in steps:
            left = deadline - time.time()
            if left < 5:
                results[name] = {"ok": False, "error": f"not run: the check's budget of {budget:.0f} s is spent"}
            else:
                os.makedirs(os.path.join(work, name), exist_ok=True)
                print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
                results[name] = run_step(name, sizes, os.path.join(work, name), args.peak_tflops,
                                         min(sizes.step_limit_s[name], left))
                if "log" in results[name]:
                    print(results[name]["log"], file=sys.stderr)
            row = table_row(name, results[name])
            append(args.out, row)
            print(row, end="", flush=True)
    passed = sum(r["ok"] for r in results.values())
    footer = f"\n{passed}/{len(results)} steps passed in {budget - (deadline - time.time()):.0f} s.\n"
    append(args.out, footer)
    print(footer + f"(written to {args.out})")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
