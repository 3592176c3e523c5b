"""``rl.run --dry-run``: the resolved config, the placement and the actor's memory plan, every input validated —
without starting Ray, a model or an engine.

Checks what a real start checks first: the model directories, the engines' devices (a large model on CPU is
refused naming the field), the placement bundles, the catalog and the prompt files (bad rows, over-long prompts).
The placement is printed per role (processes, GPUs) with the nodes it takes at ``--gpus-per-node``; the memory plan
is :mod:`megatron_onereason.training.memory_plan`'s for the actor's layout (TP × PP × DP ranks, tree packs of
``actor.pack_length`` tokens), the model read from the actor's checkpoint or else ``rollout.model_dir``.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Tuple

import yaml

from megatron_onereason.config import to_dict
from megatron_onereason.model.qwen3_config import Qwen3Config, padded_vocab_size
from megatron_onereason.rl.config import RLConfig
from megatron_onereason.rl.data import load_run_prompts, prompt_renderer
from megatron_onereason.rl.lineage import check_tokenizers
from megatron_onereason.rl.rollout_batch import tree_length
from megatron_onereason.rl.runtime import check_engine_devices, engine_plan
from megatron_onereason.rl.tree_pack import TreeSequence
from megatron_onereason.rl.workers import describe_needs, plan_placement, role_needs
from megatron_onereason.training.memory_plan import (
    GIB,
    Layout,
    Plan,
    PlannedKernels,
    StepShape,
    plan_memory,
    step_flops,
)


def actor_model(cfg: RLConfig) -> Tuple[Qwen3Config, int, str]:
    """``(architecture, padded vocabulary rows, where it was read)``: the actor's checkpoint when it records its
    model, else ``rollout.model_dir`` (the same model exported to HF)."""
    from megatron_onereason.checkpoint.mcore_io import MODEL_JSON, CheckpointModelInfo

    load = cfg.actor.model.load
    if load and os.path.isfile(os.path.join(load, MODEL_JSON)):
        info = CheckpointModelInfo.load(load)
        return info.config, info.padded_vocab_size, load
    model = Qwen3Config.from_hf_dir(cfg.rollout.model_dir)
    return model, padded_vocab_size(model.vocab_size, cfg.actor.parallel.tensor_model_parallel_size), \
        cfg.rollout.model_dir


def actor_memory_plan(cfg: RLConfig, model: Qwen3Config, rows: int, levels: int, prompt_tokens: int,
                      device_gib: float) -> Plan:
    """The actor's per-rank memory: packs of ``actor.pack_length`` tokens, as many per DP rank and optimizer step
    as a step's rollout trees fill (``prompt_tokens``, ``max_think_tokens``, K items each) over
    ``actor.mini_batches``."""
    a, r, p = cfg.actor, cfg.rollout, cfg.actor.parallel
    layout = Layout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size,
                    a.data_parallel_size, p.context_parallel_size,
                    p.sequence_parallel and p.tensor_model_parallel_size > 1, p.use_distributed_optimizer)
    items = 1 if cfg.algorithm == "mopd" else r.num_items
    tree = tree_length(TreeSequence([0] * prompt_tokens, [0] * (r.max_think_tokens if r.thinking else 0),
                                    [[0] * (levels + 2)] * items))
    trees = cfg.data.prompts_per_step * r.num_traces
    packs = math.ceil(trees / max(a.pack_length // max(tree, 1), 1))
    micro = max(math.ceil(packs / a.mini_batches / a.data_parallel_size), 1)
    step = StepShape(a.pack_length, micro, a.precision.bf16, a.model.recompute_granularity)
    gpus = a.gpus_per_rank > 0
    stages = plan_memory(model, rows, layout, step, PlannedKernels.named("te" if gpus else "cpu"),
                         3.0 if gpus else 0.0)
    notes = [f"actor TP={layout.tp} PP={layout.pp} DP={layout.dp}; {micro} tree pack(s) of {a.pack_length} tokens "
             f"per rank and optimizer step ({trees} rollout trees of ~{tree} tokens a step, {a.mini_batches} "
             f"mini-batches); {'bf16' if step.bf16 else 'fp32'}, recompute {step.recompute or 'none'}"]
    capacity = int(device_gib * GIB) if gpus else None
    return Plan(stages, step_flops(model, rows, step, micro * layout.dp, tree), capacity, notes)


def dry_run(cfg: RLConfig, gpus_per_node: int = 8, device_gib: float = 80.0, out: Callable[[str], None] = print) -> int:
    """Print and validate (see the module docstring); raises ``ValueError`` with one line on a bad input.
    Returns 0, or 1 when an actor rank does not fit ``device_gib``."""
    from transformers import AutoTokenizer

    from megatron_onereason.tokenizer.item_catalog import ItemCatalog
    from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab

    out("# resolved config\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False, width=120))
    cfg.check_model_dirs()
    check_tokenizers(cfg)
    plan = engine_plan(cfg)
    check_engine_devices(cfg, plan)
    placement = plan_placement(cfg.ray.layout, plan.actor_ranks, cfg.actor.gpus_per_rank, plan.engines)
    needs = role_needs(plan.actor_ranks, cfg.actor.gpus_per_rank, plan.engines)
    gpus = sum(g for _, g in needs.values())
    out(f"# placement (ray.layout={cfg.ray.layout}): {describe_needs(needs)}; {len(placement.bundles)} bundles, "
        f"{math.ceil(gpus / gpus_per_node) if gpus else 1} node(s) of {gpus_per_node} GPUs")
    for role, (n, g) in needs.items():
        out(f"  {role:<10} {n:>4} process(es) {g:>6g} GPUs")
    out(f"  evaluation: {'none (no data.eval_prompts or eval_interval)' if plan.evaluator is None else plan.evaluator}")

    vocab = ItemicVocab.load(cfg.rollout.model_dir)
    catalog = ItemCatalog.load(cfg.data.catalog)
    renderer = prompt_renderer(cfg, AutoTokenizer.from_pretrained(cfg.rollout.model_dir), vocab.scheme)
    train, held_out = load_run_prompts(cfg, catalog, renderer)
    for name, prompts in (("data.prompts", train), ("data.eval_prompts", held_out)):
        if prompts is not None:
            out(f"# {name}: {prompts.path} ({prompts.format}): {len(prompts.prompts)} prompts, skipped "
                f"{prompts.skipped or 'none'}, longer than the rollout context {prompts.too_long}")
    if not plan.actor_ranks:
        return 0
    model, rows, source = actor_model(cfg)
    longest = max(len(p.prompt.token_ids) for p in train.prompts)
    memory = actor_memory_plan(cfg, model, rows, vocab.scheme.levels, longest, device_gib)
    out(f"# actor memory plan: {model.num_parameters() / 1e9:.2f}B parameters ({source}), padded vocabulary {rows}")
    out("\n".join(memory.notes) + "\n" + memory.table())
    peak = memory.peak
    out(f"peak: pipeline rank {peak.pp_rank}, {peak.total / GIB:.1f} GiB"
        + (f" of {device_gib:g} GiB: {'fits' if memory.fits() else 'DOES NOT FIT'}" if memory.capacity else ""))
    return 0 if memory.fits() else 1
