"""Print per-run tables from metrics JSONL files: trainer runs (losses) and RL runs (reward, Recall@K, time split).

    python tools/summarize_metrics.py stage1=runs/x/stage1.jsonl grpo=runs/x/grpo.jsonl ...
"""
import argparse
import json
import sys
from typing import Dict, List, Sequence, Tuple

from megatron_onereason.cli import run_cli

from megatron_onereason.help_text import DocHelpFormatter


def _values(rows, key):
    return [r[key] for r in rows if r.get(key) is not None]  # null: a skipped non-finite step


def _fmt(rows, key):
    values = _values(rows, key)
    return f"{values[0]:.3f} → {values[-1]:.3f}" if values else "–"


def _mean(rows, key):
    values = _values(rows, key)
    return sum(values) / len(values) if values else float("nan")


def _window(rows, key, n=5):
    """Mean of the first and of the last ``n`` values: RL step metrics are too noisy to read one at a time."""
    values = _values(rows, key)
    head, tail = values[:n], values[-n:]
    return f"{sum(head) / len(head):.3f} → {sum(tail) / len(tail):.3f}" if values else "–"


def _rl_row(name, rows):
    steps = [r for r in rows if r["step"] > 0]
    recall = [k for k in rows[-1] if k.startswith("eval/recall@")]
    gen, indep = _mean(steps, "generated_tokens"), _mean(steps, "independent_rollout_tokens")
    shares = "/".join(f"{_mean(steps, f'time_share/{p}'):.2f}" for p in ("rollout", "train", "sync"))
    signal = "reward" if "reward" in steps[0] else "student_teacher_logp_abs_gap"
    ratio = f"{gen / indep:.2f}" if indep == indep and indep else "–"
    return (f"| {name} | {steps[0]['step']}–{steps[-1]['step']} | {signal} {_window(steps, signal)} | "
            f"{_fmt(rows, recall[0]) if recall else '–'} | {shares} | {ratio} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DocHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="NAME=PATH",
                   help="a run's name and its metrics JSONL (logging.metrics_jsonl / metrics_jsonl of an RL run)")
    args = p.parse_args(argv)
    named = []
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"{item!r} is not NAME=PATH")
        named.append((name, path))
    return run_cli("summarize_metrics", lambda: summarize(named))


def _read_rows(path: str) -> List[Dict]:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from None
    if not rows:
        raise ValueError(f"{path}: no metrics rows (did the run log any step? logging.metrics_jsonl / metrics_jsonl)")
    return rows


def summarize(named: Sequence[Tuple[str, str]]) -> None:
    """Print the tables of the runs ``(name, metrics JSONL path)``."""
    runs = [(name, _read_rows(path)) for name, path in named]
    train = [(n, rows) for n, rows in runs if rows and "loss" in rows[-1]]
    rl = [(n, rows) for n, rows in runs if rows and "loss" not in rows[-1]]
    if train:
        print("| run | iterations | loss | loss (itemic targets) | loss (text targets) | tokens/s |")
        print("|---|---|---|---|---|---|")
        for name, rows in train:
            print(f"| {name} | {rows[0]['step']}–{rows[-1]['step']} | {_fmt(rows, 'loss')} | "
                  f"{_fmt(rows, 'loss_itemic')} | {_fmt(rows, 'loss_text')} | {_mean(rows, 'tokens_per_sec'):.0f} |")
    if rl:
        print("\n| RL run | steps | signal (mean of first 5 → last 5 steps) | Recall@K (before → after) | "
              "time rollout/train/sync | "
              "tokens two-stage / N×K |")
        print("|---|---|---|---|---|---|")
        for name, rows in rl:
            print(_rl_row(name, rows))


if __name__ == "__main__":
    sys.exit(main())
