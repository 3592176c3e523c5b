"""OneReason's RL ablations at tiny scale on the learnable world (megatron_onereason/eval/world_ablations.py).

    python tools/world_ablations.py --out runs/ablations [--seeds 0,1,2,3,4] [--steps 100]
"""
import sys

from megatron_onereason.cli import run_cli
from megatron_onereason.eval.world_ablations import main

if __name__ == "__main__":
    sys.exit(run_cli("world_ablations", main))  # user errors: one line, exit 1
