"""Run the GRPO ablations of OneReason §6.1 (Figs. 13-16) and print one comparison table.

    python tools/run_ablations.py --variants full,n_by_1,no_diversity,uniform_clip,no_downweight,unconstrained \
        --steps 20 --seed 1 actor.model.load=CKPT rollout.model_dir=HF data.catalog=ITEMIC \
        data.benchmark=TRAIN.jsonl data.eval_benchmark=EVAL.jsonl [more section.field=value overrides]

Each variant is ``examples/configs/ablations/<name>.yaml`` (they extend the tiny GRPO config; ``--configs DIR``
for others) with the overrides applied, the same seed and step count. Every variant starts from the same weights
in its own engine (one Ray cluster for all), is evaluated before and after training (Recall@K of
``eval_k``-wide beam search on the held-out users) and reports: the reward and hit rate (eq. 8) over its
last ``--window`` steps, the stage-wise clip fractions, the invalid-item rate, seconds per step. ``--share-engine``
runs all variants on one engine, one after another (start-up paid once; each variant continues from the previous
one's weights: a smoke run, not a comparison). ``--json PATH`` also writes the rows.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_onereason.fileio import atomic_file
from megatron_onereason.help_text import DocHelpFormatter

# the checkout this module lies in (megatron_onereason/tools/ -> repository root): the default ablation configs
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_VARIANTS = ("full", "n_by_1", "no_diversity", "uniform_clip", "no_downweight", "unconstrained")
COLUMNS = (("reward", "reward"), ("hit_rate", "hit"), ("train/clipfrac_cot", "clip_cot"),
           ("train/clipfrac_item", "clip_item"), ("invalid_item_rate", "invalid"))


def variant_configs(names: Sequence[str], configs_dir: str, overrides: Sequence[str], steps: int, seed: int):
    """``{name: RLConfig}`` for the named variants, overrides applied (errors name the file and key)."""
    from megatron_onereason.config import load_config
    from megatron_onereason.rl.config import RLConfig

    out = {}
    for name in names:
        path = os.path.join(configs_dir, f"{name}.yaml")
        if not os.path.isfile(path):
            known = sorted(f[:-5] for f in os.listdir(configs_dir) if f.endswith(".yaml"))
            raise ValueError(f"no ablation config {path} (known: {known})")
        # eval_interval: a vLLM rollout gets its HF evaluator (beam-search Recall@K) only when evaluation is on.
        out[name] = load_config(RLConfig, path, [*overrides, f"steps={steps}", f"seed={seed}",
                                                 f"eval_interval={steps}", "save=null"])
    return out


def summarize(history: List[Dict[str, float]], before: Dict[str, float], after: Dict[str, float], k: int,
              window: int, seconds: float) -> Dict[str, float]:
    """One table row: means over the last ``window`` steps, Recall@K before/after, seconds per step."""
    tail = history[-window:]
    row = {label: float(np.mean([h[key] for h in tail if key in h])) if any(key in h for h in tail) else float("nan")
           for key, label in COLUMNS}
    # no data.eval_prompts: the engine does not evaluate (NaN in the table)
    row[f"recall@{k} before"] = before.get(f"eval/recall@{k}", float("nan"))
    row[f"recall@{k} after"] = after.get(f"eval/recall@{k}", float("nan"))
    row["s/step"] = seconds / max(len(history), 1)
    return row


def run_variants(configs: Dict[str, object], window: int = 5, share_engine: bool = False) -> Dict[str, Dict]:
    """Train every variant and summarise it (see the module docstring); engines are shut down at the end."""
    import ray

    from megatron_onereason.rl.engine import RLEngine
    from megatron_onereason.rl.runtime import init_ray

    first = next(iter(configs.values()))
    p = first.actor.parallel
    world = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * first.actor.data_parallel_size
    owns_ray = init_ray(first.ray, world + first.rollout.replicas + 2)  # one cluster for every variant
    rows, engine = {}, None
    try:
        for name, cfg in configs.items():
            if engine is not None and share_engine:
                engine.reconfigure(cfg)
            else:
                if engine is not None:
                    engine.shutdown()
                engine = RLEngine(cfg)
            before = engine.evaluate()
            start = time.time()
            history = engine.run()
            rows[name] = summarize(history, before, engine.evaluate(), cfg.eval_k, window, time.time() - start)
            logging.getLogger("megatron_onereason.rl").info("ablation %s: %s", name, rows[name])
    finally:
        if engine is not None:
            engine.shutdown()
        if owns_ray:
            ray.shutdown()
    return rows


def format_table(rows: Dict[str, Dict[str, float]]) -> str:
    columns = list(next(iter(rows.values())))
    width = max(len(n) for n in rows) + 2
    lines = ["variant".ljust(width) + "".join(c.rjust(max(len(c), 8) + 2) for c in columns)]
    for name, row in rows.items():
        lines.append(name.ljust(width) + "".join(f"{row[c]:.4f}".rjust(max(len(c), 8) + 2) for c in columns))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DocHelpFormatter)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated ablation config names")
    p.add_argument("--configs", default=os.path.join(REPO, "examples", "configs", "ablations"),
                   help="directory of the variants' RL configs (default: the checkout's examples/configs/ablations)")
    p.add_argument("--steps", type=int, default=20, help="GRPO steps per variant")
    p.add_argument("--seed", type=int, default=1234, help="random seed of every variant")
    p.add_argument("--window", type=int, default=5, help="steps at the end the reward columns average over")
    p.add_argument("--share-engine", action="store_true", help="one engine for all variants (a smoke run)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("overrides", nargs="*", help="section.field=value, applied to every variant")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from megatron_onereason.cli import run_cli

    def ablate() -> None:
        configs = variant_configs([v.strip() for v in args.variants.split(",") if v.strip()], args.configs,
                                  args.overrides, args.steps, args.seed)
        rows = run_variants(configs, args.window, args.share_engine)
        print(f"\nGRPO ablations: {args.steps} steps, seed {args.seed}; reward/hit/clip/invalid: mean of the last "
              f"{args.window} steps")
        print(format_table(rows))
        if args.json:
            with atomic_file(args.json) as f:
                json.dump(rows, f, indent=1)

    return run_cli("run_ablations", ablate)


if __name__ == "__main__":
    sys.exit(main())
