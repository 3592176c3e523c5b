"""Every command's --help is plain text (no RST markup); train and rl.run list their settings with defaults and
print their resolved config with --print-config."""
import importlib
import os
import tomllib

import pytest
import yaml

from conftest import REPO
from megatron_onereason.config import load_config, to_dict
from megatron_onereason.rl.config import RLConfig
from megatron_onereason.training.config import TrainConfig

with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    SCRIPTS = tomllib.load(f)["project"]["scripts"]


def _help(target, capsys):
    module, function = target.split(":")
    with pytest.raises(SystemExit) as done:
        getattr(importlib.import_module(module), function)(["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_is_plain_text(name, capsys):
    out = _help(SCRIPTS[name], capsys)
    for markup in ("``", ":mod:`", ":class:`", ":func:`", "**"):
        assert markup not in out, (name, markup)


def test_rl_help_lists_every_setting_with_its_default(capsys):
    out = _help(SCRIPTS["onereason-rl"], capsys)
    for line in ("algorithm: grpo | mopd | rft = grpo", "steps: int = 10", "grpo.clip_cot: tuple[float, float] = "
                 "[0.2, 0.28]", "actor.parallel.tensor_model_parallel_size: int = 1", "ray.address: str | null = null"):
        assert f"\n  {line}\n" in out, line
    assert "--print-config" in out and "rl/config.py" not in out


def test_train_help_lists_the_wandb_settings(capsys):
    out = _help(SCRIPTS["onereason-train"], capsys)
    assert "\n  logging.wandb_project: str | null = null\n" in out
    assert "\n  logging.wandb_mode: online | offline = online\n" in out


@pytest.mark.parametrize("command, cls, config", [("megatron_onereason.train", TrainConfig, "stage1.yaml"),
                                                  ("megatron_onereason.rl.run", RLConfig, "tiny/grpo.yaml")])
def test_print_config_is_the_resolved_config(command, cls, config, capsys):
    path = os.path.join(REPO, "examples", "configs", config)
    # the RL example names its model and data in the launcher script: paths here (not read by --print-config)
    overrides = ["train.iters=7"] if cls is TrainConfig else \
        ["steps=7", "rollout.model_dir=/m", "data.benchmark=/b", "data.catalog=/c", "actor.model.load=/a"]
    main = importlib.import_module(command).main
    assert main(["--config", path, "--print-config", *overrides]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config(cls, path, overrides))
    assert (printed["train"]["iters"] if cls is TrainConfig else printed["steps"]) == 7
