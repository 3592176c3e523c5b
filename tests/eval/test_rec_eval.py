"""Ranking generations into item lists, and per-domain means, by hand."""
import numpy as np
import pytest

from megatron_onereason.eval.rec_eval import markdown_tables, mean_by_domain, mean_curve, ranked_item_ids
from megatron_onereason.generation.outputs import ItemCompletion, PromptOutput, Trace
from megatron_onereason.generation.params import Prompt
from megatron_onereason.tokenizer.item_catalog import ItemCatalog

CATALOG = ItemCatalog(["v1", "v2", "p1"], ["video", "video", "prod"], np.array([[1, 1, 1], [2, 2, 2], [3, 3, 3]]), 4)


def completion(domain, codes, log_prob):
    return ItemCompletion([], None, [log_prob], domain, codes)


def test_ranking_sorts_each_trace_and_interleaves_traces():
    first = Trace([], [], [], [], False, [completion("video", (2, 2, 2), -3.0), completion("video", (1, 1, 1), -1.0),
                                          completion("prod", (1, 1, 1), -2.0)])  # codes of v1 under prod: illegal
    second = Trace([], [], [], [], False, [completion(None, None, -0.5), completion("prod", (3, 3, 3), -4.0)])
    output = PromptOutput(Prompt((1,)), [first, second])
    assert ranked_item_ids(output, CATALOG) == ["v1", None, None, "p1", "v2"]


def test_mean_by_domain_skips_undefined_values():
    measurements = [{"pass@1": 1.0, "gamma_legal": None}, {"pass@1": 0.0, "gamma_legal": 0.5},
                    {"pass@1": 1.0, "gamma_legal": None}]
    out = mean_by_domain(["video", "prod", "video"], measurements)
    assert list(out) == ["prod", "video", "all"]
    assert out["video"] == {"instances": 2, "pass@1": 1.0, "gamma_legal": None}
    assert out["all"]["pass@1"] == pytest.approx(2 / 3) and out["all"]["gamma_legal"] == 0.5


def test_mean_curve_averages_over_instances_long_enough():
    assert mean_curve([[1.0, 2.0, 3.0], [3.0], [2.0, 4.0]]) == {"mean": [2.0, 3.0, 3.0], "instances": [3, 2, 1]}


def test_markdown_has_a_table_per_domain():
    results = {"thinking": {"video": {"instances": 2, "pass@1": 0.5, "recall@1": 0.25, "delta_ll": 0.1}},
               "non-thinking": {"video": {"instances": 2, "pass@1": 1.0, "recall@1": 0.75, "delta_ll": None}}}
    text = markdown_tables(results, [1])
    assert "### video" in text
    assert "| thinking | 2 | 50.00 | 25.00 | 0.1000 |" in text
    assert "| non-thinking | 2 | 100.00 | 75.00 | - |" in text
