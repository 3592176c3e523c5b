"""torchrun, with a failed job ending on its own one-line error instead of torchrun's ChildFailedError report.

    python -m megatron_onereason.launch --nproc_per_node 8 -m megatron_onereason.train --config stage1.yaml
    onereason-torchrun --nproc_per_node 8 --no-python onereason-train --config stage1.yaml

The arguments are torchrun's. Each rank reports a user error as one line (rank 0 alone for errors every rank shares,
see :mod:`megatron_onereason.cli`); torchrun would then print a traceback and a "Root Cause" block for the failed
worker. This launcher omits that block and exits with the exit code of the first rank that failed (1 a user error,
2 a config error, 75 stopped early for requeue), so scripts and schedulers see the trainer's own code. Failures
without a one-line report (a crash, a signal) keep torchrun's report.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_onereason.cli import EXIT_CONFIG, EXIT_ERROR, EXIT_REQUEUE
from megatron_onereason.help_text import DocHelpFormatter

# exit codes whose cause the rank printed itself as one line
REPORTED_CODES = (EXIT_ERROR, EXIT_CONFIG, EXIT_REQUEUE)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()
    parser.prog, parser.description, parser.formatter_class = "onereason-torchrun", __doc__, DocHelpFormatter
    args = parser.parse_args(argv)
    try:
        run(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        if failure.exitcode in REPORTED_CODES:
            return failure.exitcode
        print(e.format_msg(), file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
    return 0


if __name__ == "__main__":
    sys.exit(main())
