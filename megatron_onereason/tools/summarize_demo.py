"""Summarise examples/tiny_cpu.sh's RL part: RUN/summary.json and RUN/curves.png (reward and Recall curves).

    python tools/summarize_demo.py --run runs/tiny_cpu

Reads RUN/world/oracle.json (tools/make_synthetic_world.py), RUN/eval/{sft,grpo}/report.json
(megatron_onereason.evaluate on the held-out prompts) and RUN/metrics/{grpo,mopd}.jsonl. summary.json holds
``grpo.recall_before`` / ``grpo.recall_after`` ({K: held-out Recall@K of the SFT / GRPO model}), the reward of the
first vs last ``--window`` GRPO steps, ``oracle_recall`` / ``random_recall`` ({K: value}) and the MOPD gaps: the
student–teacher |log-prob| gap of the first vs last steps and the teacher's minus the student's held-out Recall@K
(the RL engine's evaluation) before vs after MOPD.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from megatron_onereason.cli import run_cli
from megatron_onereason.fileio import atomic_file
from megatron_onereason.help_text import DocHelpFormatter


def _rows(path: str) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _recall(report_path: str, domain: str) -> Dict[str, float]:
    with open(report_path) as f:
        results = json.load(f)["results"]["thinking"][domain]
    return {key.split("@")[1]: value for key, value in results.items() if key.startswith("recall@")}


def _window_means(rows: Sequence[Dict], key: str, window: int) -> Dict[str, float]:
    values = [r[key] for r in rows if r.get(key) is not None and r["step"] > 0]
    if not values:
        raise ValueError(f"no {key!r} in the metrics")
    return {"first": sum(values[:window]) / len(values[:window]), "last": sum(values[-window:]) / len(values[-window:])}


def _evals(rows: Sequence[Dict]) -> Dict[int, float]:
    """{step: eval/recall@K} of an RL run."""
    return {r["step"]: v for r in rows for k, v in r.items() if k.startswith("eval/recall@")}


def summarize(run: str, domain: str = "video", window: int = 5) -> Dict:
    with open(os.path.join(run, "world", "oracle.json")) as f:
        oracle = json.load(f)["held_out"]
    grpo = _rows(os.path.join(run, "metrics", "grpo.jsonl"))
    mopd = _rows(os.path.join(run, "metrics", "mopd.jsonl"))
    grpo_evals, mopd_evals = _evals(grpo), _evals(mopd)
    teacher = grpo_evals[max(grpo_evals)]
    eval_key = next(k for r in grpo for k in r if k.startswith("eval/recall@"))
    return {
        "oracle_recall": oracle["oracle_recall"],
        "random_recall": oracle["random_recall"],
        "grpo": {
            "recall_before": _recall(os.path.join(run, "eval", "sft", "report.json"), domain),
            "recall_after": _recall(os.path.join(run, "eval", "grpo", "report.json"), domain),
            "reward": _window_means(grpo, "reward", window),
            "hit_rate": _window_means(grpo, "hit_rate", window),
            "engine_eval": {"metric": eval_key, "by_step": grpo_evals},
        },
        "mopd": {
            "logp_gap": _window_means(mopd, "student_teacher_logp_abs_gap", window),
            "recall_gap": {"metric": eval_key, "before": teacher - mopd_evals[min(mopd_evals)],
                           "after": teacher - mopd_evals[max(mopd_evals)]},
        },
        "window": window,
    }


def plot(run: str, summary: Dict, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grpo = _rows(os.path.join(run, "metrics", "grpo.jsonl"))
    steps = [r for r in grpo if r["step"] > 0 and r.get("reward") is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in steps], [r["reward"] for r in steps], label="reward")
    left.plot([r["step"] for r in steps], [r["hit_rate"] for r in steps], label="hit rate (eq. 8)")
    left.set_xlabel("GRPO step")
    left.set_title("GRPO training reward")
    left.legend()
    ks = sorted(summary["oracle_recall"], key=int)
    x = range(len(ks))
    for offset, (label, values) in enumerate((("random", summary["random_recall"]),
                                               ("SFT", summary["grpo"]["recall_before"]),
                                               ("GRPO", summary["grpo"]["recall_after"]),
                                               ("Bayes-optimal", summary["oracle_recall"]))):
        right.bar([i + 0.2 * offset - 0.3 for i in x], [values[k] for k in ks], width=0.2, label=label)
    right.set_xticks(list(x), [f"Recall@{k}" for k in ks])
    right.set_title("held-out Recall@K")
    right.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def run(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DocHelpFormatter)
    p.add_argument("--run", required=True, help="examples/tiny_cpu.sh's run directory")
    p.add_argument("--domain", default="video", help="the RL target domain")
    p.add_argument("--window", type=int, default=5, help="steps averaged at the start and at the end")
    args = p.parse_args(argv)
    summary = summarize(args.run, args.domain, args.window)
    with atomic_file(os.path.join(args.run, "summary.json")) as f:
        json.dump(summary, f, indent=1)
    plot(args.run, summary, os.path.join(args.run, "curves.png"))
    g, ks = summary["grpo"], sorted(summary["oracle_recall"], key=int)
    print("\n| held-out | " + " | ".join(f"Recall@{k}" for k in ks) + " |\n|---|" + "---|" * len(ks))
    for label, values in (("random", summary["random_recall"]), ("SFT (before GRPO)", g["recall_before"]),
                          ("GRPO (after)", g["recall_after"]), ("Bayes-optimal", summary["oracle_recall"])):
        print(f"| {label} | " + " | ".join(f"{values[k]:.3f}" for k in ks) + " |")
    m = summary["mopd"]
    print(f"GRPO reward {g['reward']['first']:.3f} → {g['reward']['last']:.3f}, "
          f"hit rate {g['hit_rate']['first']:.3f} "
          f"→ {g['hit_rate']['last']:.3f} (first vs last {args.window} steps); MOPD student–teacher |Δlog p| "
          f"{m['logp_gap']['first']:.3f} → {m['logp_gap']['last']:.3f}, {m['recall_gap']['metric']} gap "
          f"{m['recall_gap']['before']:.3f} → {m['recall_gap']['after']:.3f}; "
          f"{os.path.join(args.run, 'summary.json')}, {os.path.join(args.run, 'curves.png')}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: user errors become one line on stderr and exit code 1."""
    return run_cli("summarize_demo", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
