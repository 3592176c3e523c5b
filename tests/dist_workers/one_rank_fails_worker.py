"""A 2-rank gloo job in which only rank 1 meets a user error (a file only it reads) while rank 0 waits in a
collective: the job must end with rank 1's one-line error and rank 0's short "stopped" line.

    python -m megatron_onereason.launch --standalone --nproc_per_node 2 tests/dist_workers/one_rank_fails_worker.py \
        --rank-1-reads MISSING_FILE

SIGTERM is turned into a stop request as the trainer does (so the launcher's stop after rank 1's failure does not
kill rank 0 before it reports).
"""
import argparse
import os
import signal
import sys

import torch
import torch.distributed as dist

from megatron_onereason.cli import run_cli


def job(path: str) -> int:
    dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == 1:
        with open(path) as f:  # FileNotFoundError: the one real error of the job
            f.read()
    total = torch.ones(1)
    dist.all_reduce(total)  # rank 0 waits here for a rank that has ended
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank-1-reads", required=True)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: None)  # the trainer's stop request: finish the step first
    code = run_cli("train", lambda: job(args.rank_1_reads))
    sys.stdout.flush()
    os._exit(code)  # no process-group teardown that would wait for the ended peer


if __name__ == "__main__":
    main()
