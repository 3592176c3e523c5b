"""benchmarks/rollout.py's ``sync`` section drives the real weight-sync transport (a spawned sender, gloo) into the
transformers backend: the zeroed receiver ends with the sent weights bit for bit, and the row reports the bytes of
every tensor."""
import argparse
import os

import pytest

from conftest import REPO


@pytest.mark.multiprocess
def test_sync_section_delivers_every_weight(tiny_recommender, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))  # the spawned sender imports it by this name
    import rollout

    from megatron_onereason.generation.hf_backend import TransformersBackend

    hf = TransformersBackend.from_pretrained(tiny_recommender.model_dir)
    expected = {n: p.detach().clone() for n, p in hf.model.named_parameters()}
    args = argparse.Namespace(preset="tiny", repeats=1, sync_bucket_mb=1, sync_widths=[128], sync_layers=1)
    rollout.sync_section(rollout.Bench({"transformers": hf}, [], None), args)
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if " -> " in line][1:]  # after the header
    assert [r[:3] for r in rows] == [["tiny", "->", "transformers"], ["h128", "x1L", "->"]]
    assert all(r[-1] == "yes" for r in rows), rows
    mib = sum(t.numel() * t.element_size() for t in expected.values()) / 2**20
    assert float(rows[0][4]) == pytest.approx(mib, abs=0.1)  # 16-byte alignment adds at most a few hundred bytes
    for n, p in hf.model.named_parameters():  # the tiny model got its own weights back after being zeroed
        assert p.equal(expected[n]), n
