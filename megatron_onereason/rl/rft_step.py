"""RFT data selection of OneReason §6.2 on an :class:`~megatron_onereason.rl.runtime.RLRuntime`: sample every domain
teacher on its users, keep verified hits that pass the reasoning filters (eq. 14, :mod:`megatron_onereason.rl.rft`)
and write chat SFT JSONL."""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, Sequence

from megatron_onereason.eval.benchmark import TaskInstance, task_messages
from megatron_onereason.eval.rec_eval import completion_item_id
from megatron_onereason.rl.rft import select_rft_trajectories
from megatron_onereason.rl.runtime import RLRuntime

log = logging.getLogger("megatron_onereason.rl")


def rft_dataset(rt: RLRuntime, instances: Sequence[TaskInstance], out_path: str) -> Dict[str, float]:
    """Sample every domain teacher on its users among ``instances`` and write the kept samples to ``out_path``
    (atomically); the drop count of every filter is in the returned stats."""
    cfg = rt.cfg
    thinking = cfg.rollout.thinking
    samples, hits = [], []
    for domain, teacher in sorted(cfg.mopd.teachers.items()):
        users = [i for i in instances if i.domain == domain]
        if not users:
            continue
        outputs = rt.generate(users, rt.params(0), [rt.teachers[teacher]])
        for inst, out in zip(users, outputs):
            targets = set(inst.targets)
            history = [(rt.catalog.domain_for(i), rt.catalog.codes_for(i)) for i in inst.user.history]
            for trace in out.traces:
                text = rt.tokenizer.decode(trace.token_ids)
                reasoning = text.split("</think>")[0].strip() if thinking else ""
                for c in trace.completions:
                    answer = rt.tokenizer.decode(c.token_ids)
                    think = f"<think>\n{reasoning}\n</think>\n\n" if thinking else ""
                    samples.append({"user_id": inst.user.user_id, "domain": domain,
                                    "messages": task_messages(inst, rt.catalog, rt.scheme),
                                    "response": think + answer, "answer": answer, "reasoning": reasoning,
                                    "closed_by_model": trace.closed_by_model,
                                    "reasoning_tokens": sum(trace.sampled), "history": history})
                    hits.append(completion_item_id(rt.catalog, c) in targets)
    legal = {(d, tuple(int(x) for x in codes)) for d, codes in zip(rt.catalog.domains, rt.catalog.codes)}
    selection = select_rft_trajectories(samples, hits, dedupe=True, legal_items=legal, filters=cfg.rft,
                                        scheme=rt.scheme)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        for s in selection.kept:
            turn = {"role": "assistant", "content": s["answer"]}
            if thinking:
                turn["reasoning"] = s["reasoning"]
            f.write(json.dumps({"messages": s["messages"] + [turn], "source": f"rft/{s['domain']}"}) + "\n")
    os.replace(tmp, out_path)
    stats = {"rft_samples": float(len(samples)), "rft_kept": float(len(selection.kept)),
             **{f"rft_dropped/{k}": float(v) for k, v in selection.dropped.items()}}
    log.info("RFT: kept %d of %d teacher samples (%s) -> %s", len(selection.kept), len(samples),
             selection.dropped, out_path)
    return stats
