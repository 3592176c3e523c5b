"""The trainer on CPU with real processes: layouts agree, stage 1 freezes all but the new rows, resume is exact."""
import dataclasses
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from train_runs import cli, expect_code, read_metrics, run_trainer, tiny_blend_args
from megatron_onereason.model.qwen3_config import qwen3_preset
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab, preset
from megatron_onereason.tokenizer.qwen3_tokenizer import save_tiny_hf_qwen3
from megatron_onereason.tokenizer.vocab_extension import extend_vocabulary

pytestmark = pytest.mark.multiprocess
ITERS = 6


@pytest.fixture(scope="module")
def setup(tokenizers_3x32, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    untied_base, untied = str(root / "untied_base"), str(root / "untied")
    save_tiny_hf_qwen3(untied_base, dataclasses.replace(qwen3_preset("tiny"), tie_word_embeddings=False), seed=3)
    extend_vocabulary(untied_base, untied, preset("onereason_report", codebook_size=32))
    hf = {"tied": tokenizers_3x32["extended"], "untied": untied}
    ckpt = {}
    for name, hf_dir in hf.items():
        ckpt[name] = str(root / f"mcore_{name}")
        cli("checkpoints_convert/hf_to_mcore.py", "--hf-dir", hf_dir, "--out-dir", ckpt[name], "--tp", "2")
    vocab = ItemicVocab.load(hf["tied"])
    base = tiny_blend_args(str(root), vocab, ITERS)
    return {"root": root, "hf": hf, "ckpt": ckpt, "base": base, "vocab": vocab}


def train(setup, name, nproc, *overrides, model="tied", iters=ITERS):
    """Run the trainer; returns its metrics (one dict per iteration). A run stopped by train.exit_at_iteration must
    exit with 75 ("requeue me"), a complete one with 0."""
    metrics = str(setup["root"] / f"{name}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    args = [f"model.load={setup['ckpt'][model]}", f"train.iters={iters}", f"logging.metrics_jsonl={metrics}",
            *setup["base"], *overrides]
    early = any(o.startswith("train.exit_at_iteration=") and int(o.split("=")[1]) < iters for o in overrides)
    expect_code(run_trainer(nproc, args), 75 if early else 0)
    return read_metrics(metrics)


def losses(rows):
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def reference(setup):
    """Uninterrupted TP1 run of ITERS iterations, all parameters trainable."""
    return train(setup, "reference", 1)


def test_layouts_give_the_same_losses(setup, reference):
    """Three steps from one checkpoint: TP2, PP2, DP2 and DP2 with the distributed optimizer equal TP1."""
    expected = losses(reference)[:3]
    for name, overrides in {
        "tp2": ["parallel.tensor_model_parallel_size=2"],
        "pp2": ["parallel.pipeline_model_parallel_size=2"],
        "dp2": [],
        "dp2_distopt": ["parallel.use_distributed_optimizer=true"],
    }.items():
        got = losses(train(setup, name, 2, *overrides, iters=3))
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5, err_msg=name)
    assert expected[2] < expected[0]  # it trains


@pytest.mark.parametrize("model, layout", [("tied", "parallel.tensor_model_parallel_size=2"),
                                           ("untied", "parallel.pipeline_model_parallel_size=2")])
def test_stage1_changes_only_the_new_vocabulary_rows(setup, model, layout):
    save = str(setup["root"] / f"stage1_{model}")
    train(setup, f"stage1_{model}", 2, layout, "train.trainable=[itemic_rows]", f"checkpoint.save={save}",
          model=model, iters=3)
    exported = str(setup["root"] / f"stage1_{model}_hf")
    cli("checkpoints_convert/mcore_to_hf.py", "--mcore-dir", save, "--out-dir", exported)
    before = load_file(glob.glob(os.path.join(setup["hf"][model], "*.safetensors"))[0])
    after = {}
    for f in glob.glob(os.path.join(exported, "*.safetensors")):
        after.update(load_file(f))
    assert set(before) == set(after)
    vocab = setup["vocab"]
    vocab_matrices = {"model.embed_tokens.weight"} | ({"lm_head.weight"} if model == "untied" else set())
    for name, tensor in before.items():
        if name not in vocab_matrices:
            assert torch.equal(tensor, after[name]), f"frozen {name} changed"
            continue
        (first_id, _), = vocab.id_ranges
        assert torch.equal(tensor[:first_id], after[name][:first_id]), f"old rows of {name} changed"
        moved = (after[name][first_id:] - tensor[first_id:]).abs().amax(dim=1) > 0
        if name == "model.embed_tokens.weight" and model == "untied":
            # An untied input embedding row only gets gradient when its token occurs in the 3 steps' inputs.
            assert bool(moved.any()), f"no new row of {name} moved"
        else:  # the output layer's softmax gives every row a gradient
            assert bool(moved.all()), f"some new rows of {name} did not move"


def test_kill_and_resume_reproduces_the_uninterrupted_losses(setup, reference):
    save = str(setup["root"] / "resume")
    first = train(setup, "resume_a", 1, f"checkpoint.save={save}", f"checkpoint.load={save}",
                  "train.exit_at_iteration=3")
    assert [r["step"] for r in first] == [1, 2, 3]
    second = train(setup, "resume_b", 1, f"checkpoint.save={save}", f"checkpoint.load={save}")
    assert [r["step"] for r in second] == [4, 5, 6]
    assert losses(first + second) == losses(reference)  # bit-exact
    assert [r["grad_norm"] for r in first + second] == [r["grad_norm"] for r in reference]


def test_checkpoint_saved_at_tp2_resumes_at_tp1(setup, reference):
    save = str(setup["root"] / "tp2_to_tp1")
    train(setup, "tp2_part", 2, "parallel.tensor_model_parallel_size=2", f"checkpoint.save={save}",
          "train.exit_at_iteration=3")
    rest = train(setup, "tp1_part", 1, f"checkpoint.save={save}", f"checkpoint.load={save}")
    assert [r["step"] for r in rest] == [4, 5, 6]
    np.testing.assert_allclose(losses(rest), losses(reference)[3:], rtol=0, atol=2e-5)


def test_distributed_optimizer_kill_and_resume_is_exact(setup):
    distopt = "parallel.use_distributed_optimizer=true"
    straight = train(setup, "distopt_straight", 2, distopt)
    save = str(setup["root"] / "distopt")
    train(setup, "distopt_part", 2, distopt, f"checkpoint.save={save}", "train.exit_at_iteration=3")
    rest = train(setup, "distopt_rest", 2, distopt, f"checkpoint.save={save}", f"checkpoint.load={save}")
    assert losses(rest) == losses(straight)[3:]
    assert [r["grad_norm"] for r in rest] == [r["grad_norm"] for r in straight][3:]


def test_sigterm_saves_and_exits_for_requeue(setup):
    save = str(setup["root"] / "sigterm")
    metrics = str(setup["root"] / "sigterm.jsonl")
    cmd = [sys.executable, "-m", "megatron_onereason.train", f"model.load={setup['ckpt']['tied']}", "train.iters=200",
           f"logging.metrics_jsonl={metrics}", f"checkpoint.save={save}", *setup["base"]]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))  # as run_trainer: the same float reductions
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]  # EX_TEMPFAIL: saved, requeue to continue
    stopped = len(open(metrics).readlines())
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert int(f.read()) == stopped
    assert not os.path.exists(os.path.join(save, "training_complete.json"))  # the stage is not complete
    # The requeued job continues exactly: its next step equals the same run's uninterrupted step (train.iters
    # stays 200: the data order depends on it, so ITERS-iteration runs are no reference here).
    until = [f"train.exit_at_iteration={stopped + 1}"]
    nxt = train(setup, "sigterm_resume", 1, f"checkpoint.save={save}", f"checkpoint.load={save}", *until, iters=200)
    straight = train(setup, "sigterm_straight", 1, *until, iters=200)
    assert losses(nxt) == losses(straight)[stopped:]
