"""The whole path for a released-OpenOneRec-style checkpoint, through the user-facing CLIs, on real RecIF text:

tiny Qwen3 expanded exactly as OpenOneRec's expand_qwen3_vocab.py does (``openonerec_hf_dir``) → import its
itemic tokens → megatron checkpoint (logits verified) → preprocess OpenOneRec-format SFT parquet → SFT steps
(torchrun) → evaluate on a RecIF-format task file → export to HF (logits verified); ``tools/extend_vocab.py``
refuses it.
"""
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, run_torchrun
from recif_inputs import recif_rows, write_recif_task

from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab, preset

pytestmark = pytest.mark.multiprocess
SFT_SAMPLES = 6
EVAL_SAMPLES = 2


def _cli(*args, ok=True):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert (proc.returncode == 0) == ok, f"{args[0]} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n" \
                                         f"{proc.stderr[-4000:]}"
    return proc


def _sft_rows(samples):
    """OpenOneRec SFT rows: JSON-string messages of text parts; the assistant reasons inline (the model's own
    reasoning from the fixture), then names the first ground-truth item."""
    rows = []
    for row, s in zip(recif_rows(samples), samples):
        messages = json.loads(row["messages"])
        reasoning = s["generations"][0].split("</think>")[0].strip()
        first = s["ground_truth"].split("<|sid_end|>")[0] + "<|sid_end|>"
        messages.append({"role": "assistant", "content": [{"type": "text",
                                                           "text": f"<think>\n{reasoning}\n</think>\n{first}"}]})
        rows.append({"source": "RecIF_AdRec", "messages": json.dumps(messages, ensure_ascii=False)})
    return rows


def test_import_convert_sft_evaluate_export(openonerec_hf_dir, recif_fixture, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = [s for _, s in recif_fixture]
    hf, mc, sft = str(tmp_path / "hf"), str(tmp_path / "mc"), str(tmp_path / "sft")

    refused = _cli("tools/extend_vocab.py", "--hf-dir", openonerec_hf_dir, "--out-dir", str(tmp_path / "x"), ok=False)
    assert len(refused.stderr.strip().splitlines()) == 1 and "import_itemic_vocab" in refused.stderr
    assert not (tmp_path / "x").exists()

    _cli("tools/import_itemic_vocab.py", "--hf-dir", openonerec_hf_dir, "--out-dir", hf)
    assert ItemicVocab.load(hf).scheme == preset("openonerec")
    _cli("checkpoints_convert/hf_to_mcore.py", "--hf-dir", hf, "--out-dir", mc, "--verify")

    pq.write_table(pa.Table.from_pylist(_sft_rows(samples[EVAL_SAMPLES:EVAL_SAMPLES + SFT_SAMPLES])),
                   str(tmp_path / "sft.parquet"))
    _cli("tools/preprocess_data.py", "--input", str(tmp_path / "sft.parquet"), "--tokenizer", hf,
         "--output-prefix", str(tmp_path / "data" / "sft"), "--input-format", "openonerec", "--soft-switch")
    with open(tmp_path / "data" / "sft_stats.json") as f:
        stats = json.load(f)
    assert stats["samples"] == SFT_SAMPLES and stats["itemic_tokens"] > 0 and stats["skipped"]["total"] == 0

    metrics = str(tmp_path / "sft.jsonl")
    run_torchrun("-m", 1, ["megatron_onereason.train", "--config", "examples/configs/tiny/sft.yaml",
                           f"model.load={mc}", f"checkpoint.save={sft}", "parallel.tensor_model_parallel_size=1",
                           f"data.blend=[1.0, {tmp_path / 'data' / 'sft'}]", "data.seq_length=2048",
                           "data.max_sample_length=2048", "train.iters=3", "train.global_batch_size=2",
                           "optim.warmup_iters=1", "logging.log_interval=1", f"logging.metrics_jsonl={metrics}"])
    with open(metrics) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 3 and all(0 < loss < 100 for loss in losses)

    task = write_recif_task(str(tmp_path), "ad", recif_rows(samples[:EVAL_SAMPLES]))
    _cli("-m", "megatron_onereason.evaluate", "--model", sft, "--recif", task, "--out", str(tmp_path / "eval"),
         "--mode", "non-thinking", "--k", "1,2", "--num-beams", "2")
    with open(tmp_path / "eval" / "report.json") as f:
        result = json.load(f)["results"]["non-thinking"]
    assert result["counts"] == {"samples": EVAL_SAMPLES, "no_generations": 0, "no_target": 0, "no_pid_target": 0,
                                "unparsed_generations": 0, "generations": 2 * EVAL_SAMPLES}

    _cli("checkpoints_convert/mcore_to_hf.py", "--mcore-dir", sft, "--out-dir", str(tmp_path / "hf_sft"), "--verify")
    assert ItemicVocab.load(str(tmp_path / "hf_sft")) == ItemicVocab.load(hf)
