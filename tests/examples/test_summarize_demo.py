"""tools/summarize_demo.py: summary.json fields from the demo's outputs, and the PNG."""
import json
import os

import pytest

from megatron_onereason.tools.summarize_demo import main


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_summary_fields_from_the_run_outputs(tmp_path):
    run = str(tmp_path)
    ks = {"1": 0.8, "8": 0.9, "32": 1.0}
    _write(f"{run}/world/oracle.json", json.dumps({"held_out": {"oracle_recall": ks,
                                                                "random_recall": {"1": 0.005, "8": 0.04, "32": 0.16}}}))
    for name, values in (("sft", (0.05, 0.2, 0.5)), ("grpo", (0.1, 0.3, 0.6))):
        video = {f"recall@{k}": v for k, v in zip((1, 8, 32), values)}
        _write(f"{run}/eval/{name}/report.json", json.dumps({"results": {"thinking": {"video": video}}}))
    grpo = [{"step": 0, "eval/recall@8": 0.1}] + [{"step": s, "reward": float(s), "hit_rate": s / 100}
                                                  for s in range(1, 11)] + [{"step": 10, "eval/recall@8": 0.4}]
    mopd = [{"step": 0, "eval/recall@8": 0.1}] + [{"step": s, "student_teacher_logp_abs_gap": 1.0 / s}
                                                  for s in range(1, 11)] + [{"step": 10, "eval/recall@8": 0.3}]
    _write(f"{run}/metrics/grpo.jsonl", "".join(json.dumps(r) + "\n" for r in grpo))
    _write(f"{run}/metrics/mopd.jsonl", "".join(json.dumps(r) + "\n" for r in mopd))
    assert main(["--run", run, "--window", "2"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["grpo"]["recall_before"] == {"1": 0.05, "8": 0.2, "32": 0.5}
    assert summary["grpo"]["recall_after"] == {"1": 0.1, "8": 0.3, "32": 0.6}
    assert summary["grpo"]["reward"] == {"first": 1.5, "last": 9.5}
    assert summary["oracle_recall"] == ks
    assert summary["mopd"]["recall_gap"]["before"] == pytest.approx(0.3)  # teacher 0.4 - student 0.1
    assert summary["mopd"]["recall_gap"]["after"] == pytest.approx(0.1)
    assert summary["mopd"]["logp_gap"]["first"] == pytest.approx(0.75)
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_missing_input_is_one_line(tmp_path, capsys):
    assert main(["--run", str(tmp_path)]) == 1
    assert "oracle.json" in capsys.readouterr().err
