"""benchmarks/allowed_sets.py at a tiny size: both paths produce the same positions and log-masses, and the CSR
step message is smaller than the padded baseline's."""
import os
import re

from conftest import REPO


def test_both_paths_agree_and_the_csr_message_is_smaller(capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    import allowed_sets

    allowed_sets.main(["--items", "3000", "--codebook-size", "32", "--trees", "8", "--items-per-tree", "4",
                       "--logmass-positions", "16"])
    out = capsys.readouterr().out
    assert "equal positions: True" in out
    assert float(re.search(r"max \|csr - baseline\| = (\S+)", out).group(1)) < 1e-5
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("baseline ", "csr "))}
    assert float(rows["csr"][3]) < float(rows["baseline"][3])  # MB/step/rank
