"""Pre-training / SFT entry point (torchrun, srun or mpirun launch it once per rank).

    python -m megatron_onereason.train --config examples/configs/stage1.yaml [section.field=value ...]

Overrides are YAML values: ``optim.lr=2e-4``, ``data.blend="[1.0, /data/corpus]"``, ``train.trainable=[all]``.
"""
import argparse
import logging
import sys

from megatron_onereason.config import ConfigError, load_config
from megatron_onereason.training.config import TrainConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (sections: model parallel precision optim data train checkpoint logging)")
    p.add_argument("--metrics-jsonl", help="shorthand for logging.metrics_jsonl=PATH")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"logging.metrics_jsonl={args.metrics_jsonl}"] if args.metrics_jsonl else [])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # its per-file dataset reader chatter
    try:
        cfg = load_config(TrainConfig, args.config, overrides)
    except ConfigError as e:
        print(f"train: config error: {e}", file=sys.stderr)
        return 2
    from megatron_onereason.training.trainer import run_training

    run_training(cfg)
    from megatron_onereason.platform import destroy_distributed

    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
