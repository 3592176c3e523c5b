"""From generations to benchmark numbers: item ranking, per-instance metrics and CoT indicators, per-domain means.

Ranking: the completions of a trace are ordered by model log-probability (beam search already returns them so);
with several traces the lists are interleaved rank by rank (every trace's best item first). Each completion is
decoded to an item id through the catalog (``None`` if it names no catalog item of its domain; with a begin token
shared by all domains, by its codes alone).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_onereason.eval.benchmark import RecInstance
from megatron_onereason.eval.cot_indicators import (
    CatalogPatterns,
    cot_context,
    decoded_token_texts,
    cot_item_references,
    cot_likelihood_gain,
    history_validity,
    item_legality,
    likelihood_progression,
    segment_boundaries,
)
from megatron_onereason.eval.metrics import pass_at_k, recall_at_k
from megatron_onereason.generation.outputs import ItemCompletion, PromptOutput, Trace
from megatron_onereason.generation.prompts import ChatTokens
from megatron_onereason.tokenizer.item_catalog import ItemCatalog, UnknownItemError
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab

Measurement = Dict[str, Optional[float]]


def completion_item_id(catalog: ItemCatalog, completion: ItemCompletion) -> Optional[str]:
    if completion.codes is None:
        return None
    try:
        return catalog.item_id_for(completion.domain, completion.codes)
    except UnknownItemError:
        return None


def ranked_item_ids(output: PromptOutput, catalog: ItemCatalog) -> List[Optional[str]]:
    per_trace = [sorted(t.completions, key=lambda c: c.log_prob, reverse=True) for t in output.traces]
    depth = max((len(c) for c in per_trace), default=0)
    return [completion_item_id(catalog, completions[rank])
            for rank in range(depth) for completions in per_trace if rank < len(completions)]


def rec_metrics(predictions: Sequence[Optional[str]], targets: Sequence[str], ks: Sequence[int]) -> Measurement:
    out: Measurement = {}
    for k in ks:
        out[f"pass@{k}"] = pass_at_k(predictions, targets, k)
        out[f"recall@{k}"] = recall_at_k(predictions, targets, k)
    return out


def reasoning_ids(trace: Trace, chat: ChatTokens) -> List[int]:
    """The CoT ``c``: the trace's tokens before its (last) ``</think>``."""
    tokens = trace.token_ids
    if chat.think_end_id not in tokens:
        raise ValueError("the trace has no </think>: not a thinking-mode trace")
    return tokens[:len(tokens) - 1 - tokens[::-1].index(chat.think_end_id)]


def cot_measurement(model, tokenizer, chat: ChatTokens, vocab: ItemicVocab, catalog: ItemCatalog,
                    instance: RecInstance, thinking_prompt: Sequence[int], plain_prompt: Sequence[int],
                    trace: Trace, progression: bool) -> Tuple[Measurement, List[float]]:
    """Eqs. 21, 24, 25 for one instance (averaged over its targets), and eq. 23's ``ℓ_0..ℓ_T`` if asked."""
    cot = reasoning_ids(trace, chat)
    references = cot_item_references(tokenizer.decode(cot), vocab.scheme)
    legal = CatalogPatterns(catalog, vocab.scheme)
    history = {catalog.item_text(i, vocab.scheme) for i in instance.user.history}
    targets = [vocab.item_ids(catalog.domain_for(i), catalog.codes_for(i)) for i in instance.targets]
    gains = cot_likelihood_gain(model, [cot_context(thinking_prompt, cot, chat)] * len(targets),
                                [plain_prompt] * len(targets), targets)
    measurement: Measurement = {
        "delta_ll": float(gains.mean()),
        "gamma_legal": item_legality(references, legal),
        "gamma_hist_given_legal": history_validity(references, legal, history),
    }
    curve: List[float] = []
    if progression and cot:
        bounds = segment_boundaries(decoded_token_texts(tokenizer, cot))
        curves = [likelihood_progression(model, thinking_prompt, cot, bounds, t, chat) for t in targets]
        curve = [sum(values) / len(values) for values in zip(*curves)]
    return measurement, curve


def mean_by_domain(domains: Sequence[str], measurements: Sequence[Measurement]) -> Dict[str, Dict[str, float]]:
    """Per domain and over ``"all"``: the mean of each metric over the instances where it is defined."""
    groups: Dict[str, List[Measurement]] = defaultdict(list)
    for domain, m in zip(domains, measurements):
        groups[domain].append(m)
        groups["all"].append(m)
    out = {}
    for domain in sorted(groups, key=lambda d: (d == "all", d)):
        rows = groups[domain]
        summary: Dict[str, float] = {"instances": len(rows)}
        for key in rows[0]:
            values = [r[key] for r in rows if r[key] is not None]
            summary[key] = sum(values) / len(values) if values else None
        out[domain] = summary
    return out


def mean_curve(curves: Sequence[Sequence[float]]) -> Dict[str, List[float]]:
    """``ℓ_t`` averaged over the instances whose CoT has at least t segments, with those counts."""
    depth = max((len(c) for c in curves), default=0)
    counts = [sum(len(c) > t for c in curves) for t in range(depth)]
    means = [sum(c[t] for c in curves if len(c) > t) / counts[t] for t in range(depth)]
    return {"mean": means, "instances": counts}


def markdown_tables(results: Dict[str, Dict[str, Dict[str, float]]], ks: Sequence[int]) -> str:
    """One table per domain: a row per mode, columns Pass@K and Recall@K (in %), and the CoT indicators if any."""
    cot_keys = ("delta_ll", "gamma_legal", "gamma_hist_given_legal")
    domains = sorted({d for per_mode in results.values() for d in per_mode}, key=lambda d: (d == "all", d))
    lines = []
    for domain in domains:
        rows = {mode: per_mode[domain] for mode, per_mode in results.items() if domain in per_mode}
        shown_cot = [k for k in cot_keys if any(r.get(k) is not None for r in rows.values())]
        header = ["mode", "instances"] + [f"Pass@{k}" for k in ks] + [f"Recall@{k}" for k in ks] + shown_cot
        lines += [f"### {domain}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for mode, r in rows.items():
            cells = [mode, str(r["instances"])]
            cells += [f"{100 * r[f'pass@{k}']:.2f}" for k in ks] + [f"{100 * r[f'recall@{k}']:.2f}" for k in ks]
            cells += ["-" if r.get(k) is None else f"{r[k]:.4f}" for k in shown_cot]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
