"""The vLLM generation backend (GPU): two-stage rollouts with prefix caching and the trie as a logits processor.

Written against the vLLM V1 engine API of vLLM 0.11 and later (``vllm.v1.sample.logits_processor.
AdapterLogitsProcessor``, added by vLLM PR #23656 and first released in 0.11.0; ``LLM(logits_processors=
["module:Class"])``; ``SamplingParams.extra_args``; ``LLM.collective_rpc`` with a callable;
``LLM.reset_prefix_cache``). vLLM 0.32's documentation describes a "model runner V2" with a different
logits-processor interface; with it, select the legacy runner (``VLLM_USE_V2_MODEL_RUNNER=0``). vLLM ≤ 0.10
(per-request ``SamplingParams.logits_processors``) is not supported. vLLM is imported lazily; none of this is
exercised by the CPU tests here (vLLM does not install without a GPU).

Stage 1 is one request per prompt with ``n = N`` that stops at ``</think>``; stage 2 is one request per trace
(prompt + trace + forced tokens) with ``n = K`` and ``max_tokens = L + 1``; prefix caching makes the K completions
(and the N traces) share the prompt's and the trace's KV blocks. Only ``item_strategy="sample"`` is implemented
(vLLM's beam search does not take logits processors); beam and hierarchical search run on the transformers backend.

Log-probs: vLLM reports the raw model's log-prob of each sampled token (before temperature and the trie mask), so
``model_logprobs`` are filled and ``logprobs`` is ``None``; trace tokens the backend appends itself (``</think>``
at the length limit, the answer separator) have ``model_logprobs`` NaN. Items are always trie-constrained here.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_onereason.generation.constrained import decode_item
from megatron_onereason.generation.outputs import ItemCompletion, PromptOutput, Trace
from megatron_onereason.generation.params import GenerationParams, Prompt
from megatron_onereason.generation.prompts import ChatTokens
from megatron_onereason.generation.weights import hf_named_tensors
from megatron_onereason.model.qwen3_config import Qwen3Config
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab


def _require_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError("the vLLM backend needs vllm >= 0.11 on a GPU machine; use TransformersBackend on CPU") from e
    return vllm


def _load_weights_on_worker(worker, weights: List[Tuple[str, torch.Tensor]]) -> None:
    worker.model_runner.model.load_weights(weights=weights)


class VLLMBackend:
    def __init__(self, model_dir: str, catalog_dir: Optional[str] = None, **llm_kwargs):
        """``llm_kwargs`` go to ``vllm.LLM`` (``tensor_parallel_size``, ``gpu_memory_utilization``, ``seed``, ...)."""
        vllm = _require_vllm()
        from megatron_onereason.generation import vllm_logits_processor

        self.logits_processor_module = vllm_logits_processor  # imports vLLM, so imported here
        self.model_dir = model_dir
        self.catalog_dir = catalog_dir
        self.vocab = ItemicVocab.load(model_dir)
        self.config = Qwen3Config.from_hf_dir(model_dir)
        self.llm = vllm.LLM(model=model_dir, enable_prefix_caching=True,
                            logits_processors=[vllm_logits_processor.QUALIFIED_NAME], **llm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.chat_tokens = ChatTokens.from_tokenizer(self.tokenizer)

    def _itemic_args(self, first_token_ids: Optional[Sequence[int]] = None, banned_ids: Sequence[int] = ()) -> dict:
        args = {"catalog_dir": self.catalog_dir, "first_token_ids": first_token_ids, "banned_ids": list(banned_ids)}
        return {self.logits_processor_module.ITEMIC_ARG: args}

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> List[PromptOutput]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if params.item_strategy != "sample":
            raise ValueError(f"the vLLM backend samples items only; item_strategy={params.item_strategy!r} runs on "
                             "the transformers backend")
        if not params.constrained or self.catalog_dir is None:
            raise ValueError("the vLLM backend always decodes items with the catalog trie: pass catalog_dir and "
                             "keep constrained=True")
        constraint = self.logits_processor_module.itemic_constraint(self.model_dir, self.catalog_dir,
                                                                    self.config.vocab_size)
        traces = [[Trace([], None, [], [], False) for _ in range(params.num_traces)] for _ in prompts]
        if params.thinking and params.max_think_tokens > 0:
            # Stop tokens are banned inside the trace only with the reasoning constraint; without it a sampled stop
            # token ends the trace early and </think> is forced after it.
            sampling = SamplingParams(
                n=params.num_traces, temperature=params.temperature, max_tokens=params.max_think_tokens,
                stop_token_ids=[self.chat_tokens.think_end_id], logprobs=0, seed=params.seed,
                extra_args=self._itemic_args(banned_ids=self.chat_tokens.stop_ids) if params.constrain_reasoning
                else None)
            results = self.llm.generate([TokensPrompt(prompt_token_ids=list(p.token_ids)) for p in prompts], sampling)
            for p_traces, result in zip(traces, results):
                for trace, out in zip(p_traces, result.outputs):
                    self._fill_reasoning(trace, out)
        if params.thinking:
            for p_traces in traces:
                for trace in p_traces:
                    self._close_trace(trace)
        requests, sampling_list, owners = [], [], []
        for prompt, p_traces in zip(prompts, traces):
            first = ([self.vocab.begin_id(prompt.domain)] if prompt.domain is not None
                     else list(constraint.live_begin_ids))
            for trace in p_traces:
                requests.append(TokensPrompt(prompt_token_ids=list(prompt.token_ids) + trace.token_ids))
                sampling_list.append(SamplingParams(
                    n=params.num_items, temperature=params.item_temperature, max_tokens=self.vocab.scheme.item_length,
                    min_tokens=self.vocab.scheme.item_length, ignore_eos=True, logprobs=0, seed=params.seed,
                    extra_args=self._itemic_args(first_token_ids=first)))
                owners.append(trace)
        for trace, result in zip(owners, self.llm.generate(requests, sampling_list)):
            for out in result.outputs:
                tokens = list(out.token_ids)
                item = decode_item(self.vocab, tokens)
                trace.completions.append(ItemCompletion(tokens, None, _sampled_logprobs(out),
                                                        item[0] if item else None, item[1] if item else None))
        return [PromptOutput(p, t) for p, t in zip(prompts, traces)]

    def _fill_reasoning(self, trace: Trace, out) -> None:
        tokens = list(out.token_ids)
        trace.token_ids.extend(tokens)
        trace.model_logprobs.extend(_sampled_logprobs(out))
        trace.sampled.extend([True] * len(tokens))
        trace.closed_by_model = bool(tokens) and tokens[-1] == self.chat_tokens.think_end_id

    def _close_trace(self, trace: Trace) -> None:
        forced = ([] if trace.closed_by_model else [self.chat_tokens.think_end_id])
        forced += list(self.chat_tokens.answer_separator_ids)
        trace.token_ids.extend(forced)
        trace.model_logprobs.extend([math.nan] * len(forced))
        trace.sampled.extend([False] * len(forced))

    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Load the tensors into every vLLM worker, then drop cached prefixes computed with the old weights.

        The tensors travel through ``collective_rpc`` (pickled to worker processes unless vLLM runs in-process,
        ``VLLM_ENABLE_V1_MULTIPROCESSING=0``); a large-scale RL setup broadcasts them over NCCL instead.
        """
        weights = [(hf_name, tensor) for _, hf_name, tensor in hf_named_tensors(named_tensors, self.config)]
        self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
        self.llm.reset_prefix_cache()


def _sampled_logprobs(out) -> List[float]:
    """The raw model log-prob of each sampled token of a vLLM ``CompletionOutput`` (requested with logprobs=0)."""
    return [step[token].logprob for token, step in zip(out.token_ids, out.logprobs)]
