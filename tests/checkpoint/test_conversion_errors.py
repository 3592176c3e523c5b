"""Bad input to the converters fails early with a message naming the problem, leaving no output behind."""
import json
import os
import shutil

import pytest

from megatron_onereason.tools import hf_to_mcore


def _convert(hf_dir, out, *extra):
    return hf_to_mcore.main(["--hf-dir", hf_dir, "--out-dir", out, "--no-tokenizer", *extra])


def _copy(src, dst, edit_config=None, drop=()):
    shutil.copytree(src, dst)
    for name in drop:
        os.remove(os.path.join(dst, name))
    if edit_config:
        path = os.path.join(dst, "config.json")
        cfg = json.load(open(path))
        edit_config(cfg)
        json.dump(cfg, open(path, "w"))
    return dst


@pytest.mark.parametrize(
    "edit, drop, extra, message",
    [
        (None, ("model.safetensors",), (), "neither model.safetensors"),
        (lambda c: c.update(model_type="llama"), (), (), "only 'qwen3'"),
        (None, (), ("--tp", "3"), "TP=3 does not divide num_attention_heads=4: use a TP among 1, 2"),
        (None, (), ("--pp", "3"), "PP=3 does not divide num_layers=4: use a PP (× virtual stages) among 1, 2, 4"),
        (lambda c: c.update(intermediate_size=100), (), (), "mlp.gate_proj.weight has shape (192, 64)"),
        (lambda c: c.pop("hidden_size"), (), (), "missing field 'hidden_size'"),
    ],
)
def test_bad_hf_input_is_refused(tiny_hf_dirs, tmp_path, capsys, edit, drop, extra, message):
    src = _copy(tiny_hf_dirs["tied"], str(tmp_path / "hf"), edit, drop)
    out = str(tmp_path / "mc")
    assert _convert(src, out, *extra) == 1
    assert message in capsys.readouterr().err
    assert not os.path.exists(out)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".mc")] == []


def test_missing_directory_and_existing_output(tiny_hf_dirs, tmp_path, capsys):
    assert _convert(str(tmp_path / "nope"), str(tmp_path / "mc")) == 1
    assert "config.json: not found" in capsys.readouterr().err
    existing = tmp_path / "exists"
    existing.mkdir()
    assert _convert(tiny_hf_dirs["tied"], str(existing)) == 1
    assert "already exists" in capsys.readouterr().err
