"""W&B beside TensorBoard: a tiny training run in offline mode writes every logged scalar into its run file."""
import json

import pytest

from train_runs import cli, expect_code, read_metrics, run_trainer, tiny_blend_args
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab
from megatron_onereason.training.run_dir import RUN_JSON
from wandb_records import offline_run

pytest.importorskip("wandb")
ITERS = 3


def test_offline_run_holds_the_training_scalars(tokenizers_3x32, tmp_path):
    hf = tokenizers_3x32["extended"]
    ckpt, metrics, wandb_dir = str(tmp_path / "mc"), str(tmp_path / "m.jsonl"), str(tmp_path / "wb")
    cli("checkpoints_convert/hf_to_mcore.py", "--hf-dir", hf, "--out-dir", ckpt)
    args = [f"model.load={ckpt}", f"train.iters={ITERS}", f"logging.metrics_jsonl={metrics}",
            f"checkpoint.save={tmp_path / 'save'}", "checkpoint.save_interval=100",
            "logging.wandb_project=onereason-tests", "logging.wandb_run_name=tiny", "logging.wandb_mode=offline",
            f"logging.wandb_dir={wandb_dir}", *tiny_blend_args(str(tmp_path), ItemicVocab.load(hf), ITERS)]
    expect_code(run_trainer(1, args, env={"WANDB_SILENT": "true"}), 0)

    run, history = offline_run(wandb_dir)
    assert (run.project, run.display_name) == ("onereason-tests", "tiny")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["iters"] == ITERS
    jsonl = read_metrics(metrics)
    assert [row["_step"] for row in history] == [row["step"] for row in jsonl] == list(range(1, ITERS + 1))
    for logged, written in zip(history, jsonl):  # every scalar of the step reached both sinks, the same number
        scalars = {k: v for k, v in written.items() if k not in ("step", "time")}
        assert {"loss", "loss_itemic", "lr", "grad_norm", "tokens_per_sec"} <= set(scalars)
        assert {k: logged[k] for k in scalars} == pytest.approx(scalars, rel=1e-12)
    # the run id is the checkpoint directory's, so a resumed run appends to the same W&B run
    assert run.run_id == json.loads((tmp_path / "save" / RUN_JSON).read_text())["run_id"]
