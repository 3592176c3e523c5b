"""OneReason's RL ablations at tiny scale on the learnable world, several seeds each, with one verdict per claim.

    python tools/world_ablations.py --out runs/ablations [--seeds 0,1,2,3,4] [--steps 100]

Every run is :mod:`megatron_onereason.eval.world_sim` — the project's reward, advantage, GRPO-loss and MOPD code on
a log-linear policy over a tiny world (8 video interests x 12 items + 4 product interests as history noise) —
not the Megatron/vLLM engine: it shows what the *algorithm* as implemented does, in seconds per run. Claims
(OneReason §6) and how each is read:

- Fig. 13, two-stage rollout beats N×1 at equal effective rollout size: ``no_diversity`` (4 traces x 4 items)
  vs ``n_by_1`` (16 traces x 1 item; both without R_div, which is 0 for a single item), Recall@8 / @32;
- Fig. 14, the diversity reward helps, more at larger K: ``full`` − ``no_diversity`` at Recall@1 / @8 / @32;
- Fig. 15, stage-wise clipping helps Recall@8/32: ``full`` vs ``uniform_clip`` (the CoT's range for item tokens);
- Fig. 16, non-hit down-weighting (β) prevents collapse: ``full`` vs ``no_downweight`` (β = 1), by the share of
  distinct items within a trace's K completions over the last steps, and Recall@32;
- Fig. 19, MOPD gains grow with K: the student's Recall@K after minus before distilling the ``full`` teacher;
- Figs. 20–21, the IG filter (ρ = 0.8 vs 1) lowers the PG-loss variance and helps at large K;
- thinking beats non-thinking: ``full`` vs ``non_thinking`` (no interest step), Recall@1 / @8 / @32.

Verdict per claim: the mean difference over seeds in the claimed direction and more than 2 standard errors from 0:
"agrees"; opposite and more than 2 SE: "disagrees"; otherwise "inside noise". Writes ``OUT/results.json``,
``OUT/table.md`` and ``OUT/*.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_onereason.cli import run_cli
from megatron_onereason.eval.world_sim import MopdConfig, SimConfig, WorldPolicy, tiny_world, train_grpo, train_mopd
from megatron_onereason.help_text import DocHelpFormatter

KS = (1, 8, 32)
GRPO_VARIANTS: Dict[str, Dict] = {
    "full": {},
    "n_by_1": {"num_traces": 16, "num_items": 1, "diversity": False},
    "no_diversity": {"diversity": False},
    "uniform_clip": {"clip_item": (0.2, 0.28)},
    "no_downweight": {"nonhit_weight": 1.0},
    "non_thinking": {"thinking": False},
}
LAST = 10  # steps averaged for the training-time columns


def run_grpo_variants(seeds: Sequence[int], steps: int, base: SimConfig) -> Tuple[Dict, Dict[Tuple[str, int], object]]:
    world = tiny_world()
    train, held_out = world.draw_users(256, seed=1, prefix="train"), world.draw_users(128, seed=2, prefix="eval")
    results: Dict[str, List[Dict]] = {}
    policies = {}
    for name, change in GRPO_VARIANTS.items():
        for seed in seeds:
            cfg = dataclasses.replace(base, steps=steps, seed=seed, **change)
            policy, history = train_grpo(world, train, cfg, held_out, KS)
            tail = history[-LAST - 1:-1]
            results.setdefault(name, []).append({
                **{f"recall@{k}": history[-1][f"recall@{k}"] for k in KS},
                "reward_last": statistics.mean(h["reward"] for h in tail),
                "hit_rate_last": statistics.mean(h["hit_rate"] for h in tail),
                "distinct_last": statistics.mean(h["distinct_items"] for h in tail),
                "curve": [{k: h[k] for k in ("step", "reward", "hit_rate", "recall@8") if k in h} for h in history],
            })
            policies[(name, seed)] = policy
    oracle = {"oracle_recall": world.oracle_recall(held_out, KS), "random_recall": world.random_recall(held_out, KS)}
    return {"grpo": results, **oracle}, {"world": (world, train, held_out), **policies}


def run_mopd(seeds: Sequence[int], steps: int, teachers: Dict, base: SimConfig) -> Dict[str, List[Dict]]:
    world, train, held_out = teachers["world"]
    out: Dict[str, List[Dict]] = {}
    for name, rho in (("mopd_ig", 0.8), ("mopd_no_ig", 1.0)):
        for seed in seeds:
            torch.manual_seed(seed)
            student = WorldPolicy(world, thinking=True)
            history = train_mopd(student, teachers[("full", seed)], train, MopdConfig(steps=steps, rho=rho, seed=seed),
                                 held_out, KS)
            losses = [h["pg_loss"] for h in history[:-1]]
            out.setdefault(name, []).append({
                **{f"recall@{k}": history[-1][f"recall@{k}"] for k in KS},
                **{f"gain@{k}": history[-1][f"recall@{k}"] - history[0][f"recall@{k}"] for k in KS},
                "pg_loss_var": statistics.pvariance(losses),
                "logp_gap_first": statistics.mean(h["logp_gap"] for h in history[:LAST]),
                "logp_gap_last": statistics.mean(h["logp_gap"] for h in history[-LAST - 1:-1]),
            })
    return out


def _stats(values: Sequence[float]) -> Tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(a: Sequence[float], b: Sequence[float], claimed_sign: float = 1.0) -> Tuple[float, float, str]:
    """``mean(a) − mean(b)``, its standard error, and the verdict for the claim ``sign · (a − b) > 0``."""
    diff = statistics.mean(a) - statistics.mean(b)
    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    if claimed_sign * diff > 2 * se:
        return diff, se, "agrees"
    if claimed_sign * diff < -2 * se:
        return diff, se, "disagrees"
    return diff, se, "inside noise"


def claims(results: Dict) -> List[Dict]:
    g, m = results["grpo"], results["mopd"]

    def col(rows, key):
        return [r[key] for r in rows]

    rows = []

    def add(claim, metric, a_name, a, b_name, b, sign=1.0):
        diff, se, word = verdict(a, b, sign)
        rows.append({"claim": claim, "metric": metric, "a": a_name, "a_stats": _stats(a), "b": b_name,
                     "b_stats": _stats(b), "diff": diff, "se": se, "verdict": word})

    for k in (8, 32):
        add("Fig. 13: two-stage (N x K) beats N x 1 at equal rollout size", f"Recall@{k}", "no_diversity (4x4)",
            col(g["no_diversity"], f"recall@{k}"), "n_by_1 (16x1)", col(g["n_by_1"], f"recall@{k}"))
    for k in KS:
        add("Fig. 14: the diversity reward helps, more at larger K", f"Recall@{k}", "full",
            col(g["full"], f"recall@{k}"), "no_diversity", col(g["no_diversity"], f"recall@{k}"))
    for k in (8, 32):
        add("Fig. 15: stage-wise clipping helps Recall@8/32", f"Recall@{k}", "full", col(g["full"], f"recall@{k}"),
            "uniform_clip", col(g["uniform_clip"], f"recall@{k}"))
    add("Fig. 16: non-hit down-weighting (beta) prevents collapse", f"distinct items per trace (last {LAST} steps)",
        "full", col(g["full"], "distinct_last"), "no_downweight", col(g["no_downweight"], "distinct_last"))
    add("Fig. 16: non-hit down-weighting (beta) helps", "Recall@32", "full", col(g["full"], "recall@32"),
        "no_downweight", col(g["no_downweight"], "recall@32"))
    add("Fig. 19: MOPD gains grow with K", "gain@32 vs gain@1 (student, IG on)", "gain@32",
        col(m["mopd_ig"], "gain@32"), "gain@1", col(m["mopd_ig"], "gain@1"))
    add("Figs. 20-21: the IG filter lowers PG-loss variance", "PG-loss variance over steps", "mopd_ig",
        col(m["mopd_ig"], "pg_loss_var"), "mopd_no_ig", col(m["mopd_no_ig"], "pg_loss_var"), sign=-1.0)
    add("Figs. 20-21: the IG filter helps at large K", "Recall@32 (student)", "mopd_ig", col(m["mopd_ig"], "recall@32"),
        "mopd_no_ig", col(m["mopd_no_ig"], "recall@32"))
    for k in KS:
        add("thinking beats non-thinking", f"Recall@{k}", "full (thinking)", col(g["full"], f"recall@{k}"),
            "non_thinking", col(g["non_thinking"], f"recall@{k}"))
    return rows


def markdown(results: Dict, rows: List[Dict], seeds: Sequence[int], steps: int, seconds: float) -> str:
    lines = [f"GRPO/MOPD ablations on the tiny world (megatron_onereason/eval/world_sim.py), {len(seeds)} seeds "
             f"({list(seeds)}), "
             f"{steps} steps each, {seconds:.0f} s in all. Mean ± std over seeds.", "",
             "| run | " + " | ".join(f"Recall@{k}" for k in KS) + f" | reward (last {LAST}) | hit rate (last {LAST}) "
             "| distinct items / trace |", "|---|" + "---|" * (len(KS) + 3)]
    for name in ("oracle_recall", "random_recall"):
        lines.append(f"| {name.split('_')[0]} (exact) | " + " | ".join(f"{results[name][k]:.3f}" for k in KS)
                     + " | | | |")
    for name, runs in results["grpo"].items():
        cells = [_fmt(_stats([r[f"recall@{k}"] for r in runs])) for k in KS]
        cells += [_fmt(_stats([r[key] for r in runs])) for key in ("reward_last", "hit_rate_last", "distinct_last")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, runs in results["mopd"].items():
        cells = [_fmt(_stats([r[f"recall@{k}"] for r in runs])) for k in KS]
        lines.append(f"| {name} (student) | " + " | ".join(cells) + " | | | |")
    lines += ["", "| report's claim | metric | A | B | A − B (± SE) | report's claim: |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['claim']} | {r['metric']} | {r['a']} {_fmt(r['a_stats'])} | {r['b']} "
                     f"{_fmt(r['b_stats'])} | {r['diff']:+.3f} ± {r['se']:.3f} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def _fmt(stats: Tuple[float, float]) -> str:
    return f"{stats[0]:.3f} ± {stats[1]:.3f}"


def plot(results: Dict, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for name, runs in results["grpo"].items():
        steps = [h["step"] for h in runs[0]["curve"] if "reward" in h]
        for key, axis in (("hit_rate", left), ("recall@8", right)):
            values = [[h[key] for h in r["curve"] if key in h and h["step"] in steps] for r in runs]
            mean = [statistics.mean(v) for v in zip(*values)]
            axis.plot(steps[:len(mean)], mean, label=name)
    left.set(title="GRPO training hit rate (mean over seeds)", xlabel="step")
    right.set(title="held-out Recall@8 (mean over seeds)", xlabel="step")
    right.axhline(results["oracle_recall"][8], color="k", ls="--", label="Bayes-optimal")
    right.axhline(results["random_recall"][8], color="gray", ls=":", label="random")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "grpo_curves.png"), dpi=100)
    plt.close(fig)

    fig, axis = plt.subplots(figsize=(10, 4))
    names = list(results["grpo"]) + [f"{n} (student)" for n in results["mopd"]]
    runs = list(results["grpo"].values()) + list(results["mopd"].values())
    width = 0.8 / len(KS)
    for j, k in enumerate(KS):
        stats = [_stats([r[f"recall@{k}"] for r in rs]) for rs in runs]
        axis.bar([i + j * width for i in range(len(names))], [s[0] for s in stats], width,
                 yerr=[s[1] for s in stats], label=f"Recall@{k}", capsize=2)
    axis.set_xticks([i + width for i in range(len(names))], names, rotation=20, fontsize=8)
    axis.set_title("held-out Recall@K after training (mean ± std over seeds)")
    axis.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "recall_by_variant.png"), dpi=100)
    plt.close(fig)


def run(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DocHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (results.json, table.md, PNGs)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (>= 3 for a standard error)")
    p.add_argument("--steps", type=int, default=100, help="GRPO steps per run")
    p.add_argument("--mopd-steps", type=int, default=60, help="MOPD steps per run")
    p.add_argument("--accuracy", default="prefix", help="R_acc of eq. 7: rule (exact hit) or prefix")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if len(seeds) < 3:
        raise ValueError(f"--seeds needs at least 3 seeds for mean ± std and a standard error, got {seeds}")
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    base = SimConfig(accuracy=args.accuracy)
    results, policies = run_grpo_variants(seeds, args.steps, base)
    results["mopd"] = run_mopd(seeds, args.mopd_steps, policies, base)
    rows = claims(results)
    table = markdown(results, rows, seeds, args.steps, time.time() - start)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"seeds": seeds, "steps": args.steps, "config": dataclasses.asdict(base), "claims": rows,
                   **{k: v for k, v in results.items()}}, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    plot(results, args.out)
    print(table)
    print(f"wrote {args.out}/table.md, results.json, grpo_curves.png, recall_by_variant.png")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: user errors become one line on stderr and exit code 1."""
    return run_cli("world_ablations", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
