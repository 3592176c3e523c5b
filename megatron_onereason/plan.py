"""Memory and throughput planner: per-device memory of every pipeline stage and the FLOPs of a step, for any layout.

    python -m megatron_onereason.plan --config examples/configs/stage1.yaml --world-size 128 \\
        --model 8b --vocab-size 176250 [section.field=value ...]

The config and overrides are the trainer's (``parallel.*``, ``data.seq_length``, ``train.global_batch_size``,
``model.recompute_granularity``, ``precision.bf16``, ``train.trainable`` matter). The model is ``--model`` (a Qwen3
preset, a HF directory or ``config.json``, or a megatron checkpoint directory), else the config's starting checkpoint
(``checkpoint.load``, ``model.load``) or ``model.init_from``. Kernels: ``te`` (the NGC container of the Dockerfile:
Transformer Engine and apex), ``plain`` (CUDA PyTorch with Triton only), ``cpu``. Prints a markdown table (GiB per
device) and the step's FLOPs with the time they take at ``--mfu``; exits 1 when a stage does not fit
``--device-memory-gib``; ``--print-config`` prints the resolved config first. The trainer runs the same plan at start (``train.memory_check``). The accounting is
documented in :mod:`megatron_onereason.training.memory_plan`.
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml

from megatron_onereason.cli import run_cli
from megatron_onereason.config import ConfigError, load_config, to_dict
from megatron_onereason.help_text import DocHelpFormatter
from megatron_onereason.model.builder import ModelBuildConfig, check_parallel_layout
from megatron_onereason.training.config import TrainConfig
from megatron_onereason.training.flops import H100_BF16_DENSE_TFLOPS
from megatron_onereason.training.memory_plan import GIB, PlannedKernels, plan_training


def _model(spec, cfg: TrainConfig, vocab_size, tp: int):
    from megatron_onereason.checkpoint.mcore_io import MODEL_JSON, CheckpointModelInfo
    from megatron_onereason.model.qwen3_config import load_qwen3_config, padded_vocab_size

    spec = spec or cfg.checkpoint.load or cfg.model.load or cfg.model.init_from
    if spec is None:
        raise ConfigError("no model: give --model (a Qwen3 preset such as 8b, a HF directory or a megatron "
                          "checkpoint), or set checkpoint.load / model.load / model.init_from")
    if os.path.isdir(spec) and os.path.exists(os.path.join(spec, MODEL_JSON)):
        info = CheckpointModelInfo.load(spec)
        model, rows = info.config, info.padded_vocab_size
    else:
        model = load_qwen3_config(spec)
        rows = None
    if vocab_size:
        model, rows = model.with_vocab_size(vocab_size), None
    return model, rows or padded_vocab_size(model.vocab_size, tp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DocHelpFormatter)
    p.add_argument("--config", help="the trainer's YAML config")
    p.add_argument("--world-size", type=int, help="ranks (GPUs); default TP×PP×CP (DP=1)")
    p.add_argument("--model", help="Qwen3 preset, HF dir / config.json, or megatron checkpoint dir")
    p.add_argument("--vocab-size", type=int, help="true vocabulary size (e.g. 176250: Qwen3 + 5 domains + 3×8192)")
    p.add_argument("--device-memory-gib", type=float, default=80.0, help="per device (default 80: H100)")
    p.add_argument("--kernels", default="te", choices=("te", "plain", "cpu"),
                   help="the fused kernels planned for: te (NGC container: TE + apex), plain (CUDA PyTorch, no TE), "
                        "cpu (nothing fused)")
    p.add_argument("--runtime-gib", type=float, default=3.0, help="CUDA context, NCCL, cuBLAS workspaces")
    p.add_argument("--doc-length", type=int, help="document length for attention FLOPs (default: the sample cap)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation for the time estimate")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="per device, bf16 dense")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) first")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args(argv)
    return run_cli("plan", lambda: _plan(args))


def _plan(args: argparse.Namespace) -> int:
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False, width=120))
    par = cfg.parallel
    world = args.world_size or (par.tensor_model_parallel_size * par.pipeline_model_parallel_size
                                * par.context_parallel_size)
    model, rows = _model(args.model, cfg, args.vocab_size, par.tensor_model_parallel_size)
    try:  # a layout the model cannot take is a config error (exit 2)
        # the trainer's own checks at model build: heads, query groups, FFN and padded vocabulary by TP, layers by PP
        check_parallel_layout(model, ModelBuildConfig(
            tensor_model_parallel_size=par.tensor_model_parallel_size,
            pipeline_model_parallel_size=par.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size, padded_vocab_size=rows))
        plan = plan_training(cfg, model, rows, world, PlannedKernels.named(args.kernels),
                             int(args.device_memory_gib * GIB), args.runtime_gib, args.doc_length)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    f = plan.flops
    seconds = f.model / (world * args.peak_tflops * 1e12 * args.mfu)
    print(f"{args.config or 'config'}: {model.num_parameters() / 1e9:.2f}B parameters, padded vocabulary {rows}")
    print("\n".join(plan.notes) + "\n")
    print(plan.table() + "\n")
    print(f"model FLOPs per step {f.model / 1e15:.1f} PFLOP ({f.hardware / 1e15:.1f} with recomputation), "
          f"{f.tokens} tokens; at MFU {args.mfu:.0%} of {args.peak_tflops:.0f} TFLOP/s × {world}: "
          f"{seconds:.1f} s/step, {f.tokens / seconds:,.0f} tokens/s, "
          f"{seconds * cfg.train.iters / 86400:.1f} days for {cfg.train.iters} steps")
    peak = plan.peak
    verdict = "fits" if plan.fits() else "DOES NOT FIT"
    print(f"peak: pipeline rank {peak.pp_rank}, {peak.total / GIB:.1f} GiB of {args.device_memory_gib:.0f} GiB: "
          f"{verdict}")
    return 0 if plan.fits() else 1


if __name__ == "__main__":
    sys.exit(main())
