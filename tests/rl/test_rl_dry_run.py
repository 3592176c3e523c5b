"""``rl.run --dry-run`` on the 8B example configs: placement, the actor's memory plan and the input checks, no Ray."""
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from megatron_onereason.model.qwen3_config import Qwen3Config, qwen3_preset
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab


@pytest.fixture(scope="module")
def inputs(tiny_recommender, tmp_path_factory):
    """An "8B" HF directory (the tiny recommender's tokenizer, Qwen3-8B's architecture; no weights: a dry run
    loads none), a RecIF-format prompt file and the catalog."""
    root = tmp_path_factory.mktemp("dry_run")
    model = str(root / "qwen3_8b")
    shutil.copytree(tiny_recommender.model_dir, model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    vocab = Qwen3Config.from_hf_dir(tiny_recommender.model_dir).vocab_size
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(qwen3_preset("8b").with_vocab_size(vocab).to_hf_dict(), f)
    catalog = ItemCatalog.load(tiny_recommender.catalog_dir)
    scheme = ItemicVocab.load(model).scheme
    rows = [{"messages": json.dumps([{"role": "system", "content": "你是推荐助手。"},
                                     {"role": "user", "content": "历史：" + scheme.format_item(catalog.domains[i],
                                                                                             catalog.codes[i])}],
                                    ensure_ascii=False),
             "metadata": json.dumps({"answer": scheme.format_item(catalog.domains[i + 1], catalog.codes[i + 1])})}
            for i in range(4)]
    prompts = str(root / "video_train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), prompts)
    return [f"actor.model.load={root / 'no_checkpoint_yet'}", f"rollout.model_dir={model}", f"data.prompts={prompts}",
            f"data.eval_prompts={prompts}", f"data.catalog={tiny_recommender.catalog_dir}", "data.domains=null"]


def dry_run(config, *overrides):
    return subprocess.run([sys.executable, "-m", "megatron_onereason.rl.run", "--config", config, "--dry-run",
                           *overrides], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO))


@pytest.mark.parametrize("name, roles", [
    ("grpo_8b", {"actor": (16, 16), "rollout": (15, 15), "evaluator": (1, 1)}),
    ("mopd_8b", {"actor": (16, 16), "rollout": (11, 11), "teacher": (2, 2), "evaluator": (1, 1)})])
def test_dry_run_of_the_8b_configs_prints_placement_and_actor_memory(inputs, name, roles):
    over = list(inputs)
    if name == "mopd_8b":  # two domain teachers (the 8B directory stands in for both)
        model = inputs[1].split("=", 1)[1]
        over.append(f"mopd.teachers={{video: {model}, prod: {model}_prod}}")
        shutil.copytree(model, f"{model}_prod", dirs_exist_ok=True)
    result = dry_run(f"examples/configs/{name}.yaml", *over)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "# resolved config" in out and "eval_batch: 64" in out
    for role, (processes, gpus) in roles.items():
        assert f"{role} {gpus} GPUs ({processes} process" in out, out
    total = sum(g for _, g in roles.values())
    assert f"{total} GPUs in all" in out and f"{-(-total // 8)} node(s) of 8 GPUs" in out
    assert "data.prompts: " in out and "(recif): 4 prompts" in out
    # Qwen3-8B's 36 layers (with the tiny vocabulary) at TP=4, DP=4: one table row per pipeline rank.
    assert "# actor memory plan: " in out and "TP=4 PP=1 DP=4" in out and "| 0 | 36 |" in out
    assert "of 80 GiB: fits" in out


def test_dry_run_refuses_an_8b_evaluator_on_cpu_in_one_line(inputs):
    result = dry_run("examples/configs/grpo_8b.yaml", *inputs, "evaluator.gpus=0")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("rl.run")]
    assert len(lines) == 1 and lines[0].startswith("rl.run: error: evaluator.gpus=0 would run a 7.0B-parameter") \
        and "on CPU; give it GPUs (evaluator.gpus: 1" in lines[0], result.stderr
    assert "# placement" not in result.stdout  # refused before anything is planned further
