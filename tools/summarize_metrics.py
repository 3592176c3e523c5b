"""Print a per-run loss table from trainer metrics JSONL files.

    python tools/summarize_metrics.py stage1=runs/x/stage1.jsonl stage2=runs/x/stage2.jsonl ...
"""
import json
import sys


def _fmt(rows, key):
    values = [r[key] for r in rows if key in r]
    return f"{values[0]:.3f} → {values[-1]:.3f}" if values else "–"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    print("| run | iterations | loss | loss (itemic targets) | loss (text targets) | tokens/s |")
    print("|---|---|---|---|---|---|")
    for item in argv:
        name, _, path = item.partition("=")
        try:
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            print(f"summarize_metrics: {path}: {e}", file=sys.stderr)
            return 1
        if not rows:
            print(f"| {name} | 0 | – | – | – | – |")
            continue
        speed = sum(r["tokens_per_sec"] for r in rows) / len(rows)
        print(f"| {name} | {rows[0]['step']}–{rows[-1]['step']} | {_fmt(rows, 'loss')} | {_fmt(rows, 'loss_itemic')} | "
              f"{_fmt(rows, 'loss_text')} | {speed:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
