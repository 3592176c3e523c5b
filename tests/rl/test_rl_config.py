"""RL config validation: settings under which a method of §6 would silently do nothing are refused by name."""
import logging

import pytest

from megatron_onereason.config import ConfigError, load_config
from megatron_onereason.rl.config import RLConfig

REQUIRED = ["rollout.model_dir=/m", "data.benchmark=/b.jsonl", "data.catalog=/c", "actor.model.load=/ckpt"]


def config(*overrides):
    return load_config(RLConfig, None, [*REQUIRED, *overrides])


def test_defaults_follow_the_report():
    cfg = config()
    assert cfg.mopd.rho == 0.8  # eq. 20's example value
    assert (cfg.grpo.old_logp, cfg.grpo.is_low, cfg.grpo.is_high) == ("recompute", 0.0, 2.0)
    assert cfg.rollout.sampling == "constrained"
    assert cfg.data.tasks == ["rec"]


def test_k1_with_diversity_is_refused_naming_the_ablation_setting():
    with pytest.raises(ConfigError, match=r"R_div = 0 .*set grpo.diversity=false"):
        config("rollout.num_items=1")
    assert config("rollout.num_items=1", "grpo.diversity=false").rollout.num_items == 1  # the N x 1 ablation
    assert config("rollout.num_items=1", "algorithm=mopd").algorithm == "mopd"  # MOPD samples one item, no R_div


@pytest.mark.parametrize("override, match", [
    ("grpo.clip_item=[1.0, 0.1]", "grpo.clip_item"),
    ("grpo.nonhit_weight=1.5", "nonhit_weight"),
    ("grpo.is_high=0.5", "is_low / grpo.is_high"),
    ("grpo.old_logp=rollout", "is_high=null"),
    ("mopd.rho=0", "mopd.rho"),
    ("mopd.is_low=1.5", "mopd.is_low"),
    ("actor.mini_batches=0", "mini_batches"),
    ("data.tasks=[rec, r5]", "data.tasks"),
    ("rft.max_reasoning_tokens=0", "rft.min_reasoning_tokens"),
    ("grpo.reward=beam-position", "rollout-beam"),
])
def test_bad_settings_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        config(override)


def test_general_domain_distillation_needs_its_prompts_and_teacher():
    with pytest.raises(ConfigError, match="data.general_prompts"):
        config("algorithm=mopd", "mopd.general_teacher=/qwen3", "mopd.adv_clip=[-5, 5]")
    with pytest.raises(ConfigError, match="go together"):
        config("algorithm=mopd", "data.general_prompts=/g.jsonl")
    with pytest.raises(ConfigError, match="free text, which the vllm rollout backend does not generate"):
        config("algorithm=mopd", "mopd.general_teacher=/qwen3", "mopd.adv_clip=[-5, 5]",
               "data.general_prompts=/g.jsonl")
    cfg = config("algorithm=mopd", "mopd.general_teacher=/qwen3", "mopd.adv_clip=[-5, 5]",
                 "data.general_prompts=/g.jsonl", "rollout.backend=hf", "rollout.engine_args={}")
    assert cfg.data.general_prompts == "/g.jsonl"


def test_inert_clipping_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_onereason.rl"):
        config("actor.mini_batches=1")
    assert "never acts" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_onereason.rl"):
        assert config().actor.mini_batches == 4  # the default: clipping acts from the second mini-batch
    assert caplog.text == ""


def test_rollout_beam_and_recall_evaluation_run_on_either_backend():
    """Both backends beam-search items (vLLM: prefix-cached rounds, tests/generation/test_vllm_beam.py)."""
    for backend in ("vllm", "hf"):
        cfg = config("grpo.reward=rollout-beam", f"rollout.backend={backend}", f"evaluator.backend={backend}")
        assert (cfg.grpo.reward, cfg.rollout.backend, cfg.evaluator.backend) == ("rollout-beam", backend, backend)


def test_constrained_sampling_needs_scorers_that_renormalise():
    with pytest.raises(ConfigError, match="teachers.backend=vllm scores raw log-probs only.*set teachers.backend=hf"):
        config("algorithm=mopd", "mopd.teachers={video: /t}", "teachers.backend=vllm", "rollout.num_items=1")
    assert config("algorithm=mopd", "mopd.teachers={video: /t}", "teachers.backend=vllm", "rollout.num_items=1",
                  "rollout.sampling=unconstrained").teachers.backend == "vllm"


def test_a_config_extends_a_base_file(tmp_path):
    """Ablation configs state only what they change: ``extends`` merges them over their base, section by section."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "grpo.yaml").write_text(
        "algorithm: grpo\nsteps: 20\nrollout: {num_traces: 2, num_items: 8, model_dir: /m, backend: hf}\n"
        "grpo: {reward: beam-prefix, clip_item: [0.1, 0.1]}\n")
    (tmp_path / "ablation.yaml").write_text("extends: base/grpo.yaml\nrollout: {num_items: 1}\n"
                                            "grpo: {diversity: false, clip_item: [0.2, 0.28]}\n")
    cfg = load_config(RLConfig, str(tmp_path / "ablation.yaml"), REQUIRED[1:])
    assert (cfg.steps, cfg.rollout.num_traces, cfg.rollout.num_items, cfg.rollout.model_dir) == (20, 2, 1, "/m")
    assert (cfg.grpo.reward, cfg.grpo.diversity, cfg.grpo.clip_item) == ("beam-prefix", False, (0.2, 0.28))
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_config(RLConfig, str(tmp_path / "loop.yaml"))
    (tmp_path / "missing.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config(RLConfig, str(tmp_path / "missing.yaml"))
