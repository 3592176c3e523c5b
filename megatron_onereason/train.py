"""Pre-training / SFT entry point (torchrun, srun or mpirun launch it once per rank).

    python -m megatron_onereason.train --config examples/configs/stage1.yaml [section.field=value ...]

Overrides are YAML values: ``optim.lr=2e-4``, ``data.blend="[1.0, /data/corpus]"``, ``train.trainable=[all]``.

Exit codes: 0 the run reached train.iters (CHECKPOINT_SAVE/training_complete.json written); 75 it stopped early
(SIGTERM, train.exit_at_iteration, train.exit_after_minutes) after saving: requeue the job to continue
(sbatch --requeue, scontrol requeue); 1 a user error, reported as one line (bad path, damaged or foreign checkpoint,
changed settings on resume, NaN/inf loss); 2 a config error.
"""
import argparse
import logging
import sys

from megatron_onereason.cli import EXIT_OK, EXIT_REQUEUE, run_cli
from megatron_onereason.config import load_config
from megatron_onereason.training.config import TrainConfig, config_yaml
from megatron_onereason.help_text import DocHelpFormatter, config_epilog


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DocHelpFormatter,
                                epilog=config_epilog(TrainConfig))
    p.add_argument("--config", help="YAML file (sections: model parallel precision optim data train checkpoint logging)")
    p.add_argument("--metrics-jsonl", help="shorthand for logging.metrics_jsonl=PATH")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML: file, then overrides, then defaults) and exit")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"logging.metrics_jsonl={args.metrics_jsonl}"] if args.metrics_jsonl else [])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # its per-file dataset reader chatter

    def train() -> int:
        from megatron_onereason.platform import destroy_distributed
        from megatron_onereason.training.trainer import run_training

        cfg = load_config(TrainConfig, args.config, overrides)
        if args.print_config:
            print(config_yaml(cfg), end="")
            return EXIT_OK
        try:
            result = run_training(cfg)
        finally:
            destroy_distributed()
        return EXIT_OK if result.completed else EXIT_REQUEUE

    return run_cli("train", train)


if __name__ == "__main__":
    sys.exit(main())
