#!/usr/bin/env python
"""Plan a training run's blend and packs once, ahead of the job, and save them where the trainer looks.

    python tools/plan_packs.py --config examples/configs/stage1.yaml "data.blend=[0.6, /data/a, 0.4, /data/b]"

Takes the trainer's config and overrides (only the ``data`` section matters). The plan is saved under
``data.plan_cache`` (default ``pack_plans/`` beside the first blend prefix), in a directory named by a hash of the
inputs' document lengths and the blend/packing settings; every trainer rank then memory-maps it instead of planning.
Running it again with the same inputs finds the saved plan and does nothing. Prints the directory and the stats.
"""
import argparse
import json
import sys
import time

from megatron_onereason.cli import run_cli
from megatron_onereason.config import ConfigError, load_config
from megatron_onereason.help_text import DocHelpFormatter
from megatron_onereason.training.config import TrainConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DocHelpFormatter)
    p.add_argument("--config", help="the trainer's YAML config")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args(argv)

    def plan() -> None:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        if not cfg.data.blend:
            raise ConfigError("data.blend is empty: give [weight, prefix, ...] of tools/preprocess_data.py outputs")
        from megatron_onereason.data.packed_dataset import cached_plans, default_plan_cache, load_plans, open_sources
        from megatron_onereason.training.setup import data_configs

        blend, packing = data_configs(cfg.data)
        start = time.time()
        directory, built = cached_plans(open_sources(blend), blend, packing,
                                        cfg.data.plan_cache or default_plan_cache(blend))
        blended, packs = load_plans(directory)
        print(json.dumps({"plan": directory, "built": built, "seconds": round(time.time() - start, 1),
                          "blend": blended.stats(), "packing": packs.stats.to_dict()}, indent=1))

    return run_cli("plan_packs", plan)


if __name__ == "__main__":
    sys.exit(main())
