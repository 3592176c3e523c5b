#!/usr/bin/env python
"""Tokenize JSONL / parquet samples into a Megatron IndexedDataset pair with loss masks.

    python tools/preprocess_data.py --input a.jsonl b.parquet --tokenizer TOKDIR --output-prefix P --workers 2 \
        [--input-format auto|onereason|openonerec|megatron] [--json-keys text] [--soft-switch]

Writes ``P_tokens.bin/.idx`` (int32), ``P_lossmask.bin/.idx`` (uint8), one document per sample, in input order, and
``P_stats.json`` (samples, tokens, loss tokens, itemic tokens, per source / domain, skipped lines with reasons). The
input formats — this project's, OpenOneRec's parquet / JSONL (JSON-string columns, text parts, inline ``<think>``),
Megatron-LM's ``{"text"}`` JSONL — are described in :mod:`megatron_onereason.data.formats`; parquet is read batch by
batch, only the columns a record may use. TOKDIR without ``itemic_tokens.json`` encodes plain text, refusing (per
record) any that writes itemic tokens. A malformed sample stops the run with
``file:line: reason`` unless ``--skip-invalid`` (then it is counted per reason, and the first ones are listed).
Nothing is left at the output prefix unless the run completes.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from megatron_onereason.cli import UserError, raise_on_sigterm, run_cli
from megatron_onereason.data.formats import INPUT_FORMATS, FormatConfig, SampleEncoder, SampleError, iter_input, \
    open_parquet, parse_json_line, parse_sample, record_columns
from megatron_onereason.fileio import is_no_space, no_space_message
from megatron_onereason.help_text import DocHelpFormatter
from megatron_onereason.tokenizer.fingerprint import FINGERPRINT_KEY, tokenizer_fingerprint

BATCH_SAMPLES = 256  # samples per worker task: large enough to amortise pickling, small enough to stream
IN_FLIGHT_PER_WORKER = 4  # tasks queued per worker: bounds memory on huge inputs
SKIPPED_EXAMPLES = 20  # skipped lines quoted verbatim in the stats file


class InputError(ValueError):
    """A bad input sample, as ``file:line: reason``."""


@dataclass
class BatchResult:
    tokens: np.ndarray  # int32, the batch's documents concatenated
    lossmask: np.ndarray  # uint8
    lengths: List[int]
    # per document: source, domain, format, loss tokens, itemic tokens, dropped reasoning turns
    meta: List[Tuple[str, str, str, int, int, int]]
    errors: List[Tuple[int, str, str]]  # (line, reason, message)
    blank_lines: int


_ENCODER: Optional[SampleEncoder] = None  # set in the main process; forked workers inherit it


def _init_worker() -> None:
    # Each worker tokenizes single-threaded: N processes on N cores beat nested thread pools.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool stops its workers with SIGTERM


def _encode_batch(batch: List[Tuple[int, object]]) -> BatchResult:
    samples, linenos, errors, blank = [], [], [], 0
    for lineno, raw in batch:
        is_line = isinstance(raw, bytes)
        if is_line and not raw.strip():
            blank += 1
            continue
        try:
            samples.append(parse_sample(parse_json_line(raw) if is_line else raw, _ENCODER.config))
            linenos.append(lineno)
        except SampleError as e:
            errors.append((lineno, e.reason, str(e)))
    tokens, masks, lengths, meta = [], [], [], []
    for sample, lineno, encoded in zip(samples, linenos, _ENCODER.encode(samples)):
        if isinstance(encoded, SampleError):
            errors.append((lineno, encoded.reason, str(encoded)))
            continue
        tokens.append(encoded.tokens)
        masks.append(encoded.lossmask)
        lengths.append(encoded.tokens.size)
        meta.append((sample.source, sample.domain, sample.kind, int(encoded.lossmask.sum()), encoded.itemic_tokens,
                     sample.dropped_reasoning))
    errors.sort()
    return BatchResult(
        tokens=np.concatenate(tokens) if tokens else np.empty(0, np.int32),
        lossmask=np.concatenate(masks) if masks else np.empty(0, np.uint8),
        lengths=lengths, meta=meta, errors=errors, blank_lines=blank,
    )


def _counter() -> Dict[str, int]:
    return {"samples": 0, "tokens": 0, "loss_tokens": 0, "itemic_tokens": 0}


@dataclass
class CorpusStats:
    samples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    itemic_tokens: int = 0
    by_format: Dict[str, int] = field(default_factory=lambda: defaultdict(int))
    per_source: Dict[str, Dict[str, int]] = field(default_factory=lambda: defaultdict(_counter))
    per_domain: Dict[str, Dict[str, int]] = field(default_factory=lambda: defaultdict(_counter))
    dropped_reasoning_turns: int = 0
    blank_lines: int = 0
    skipped: int = 0
    skipped_by_reason: Dict[str, int] = field(default_factory=lambda: defaultdict(int))
    skipped_examples: List[str] = field(default_factory=list)

    def add_document(self, source: str, domain: str, kind: str, tokens: int, loss: int, itemic: int,
                     dropped_reasoning: int) -> None:
        for counter in (self.per_source[source], self.per_domain[domain]):
            counter["samples"] += 1
            counter["tokens"] += tokens
            counter["loss_tokens"] += loss
            counter["itemic_tokens"] += itemic
        self.samples += 1
        self.tokens += tokens
        self.loss_tokens += loss
        self.itemic_tokens += itemic
        self.by_format[kind] += 1
        self.dropped_reasoning_turns += dropped_reasoning

    def add_skipped(self, where: str, reason: str, message: str) -> None:
        self.skipped += 1
        self.skipped_by_reason[reason] += 1
        if len(self.skipped_examples) < SKIPPED_EXAMPLES:
            self.skipped_examples.append(f"{where}: {message}")

    def to_dict(self) -> Dict:
        return {
            "samples": self.samples,
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            "itemic_tokens": self.itemic_tokens,
            "by_format": dict(self.by_format),
            "per_source": {k: dict(v) for k, v in self.per_source.items()},
            "per_domain": {k: dict(v) for k, v in self.per_domain.items()},
            "dropped_reasoning_turns": self.dropped_reasoning_turns,
            "blank_lines": self.blank_lines,
            "skipped": {"total": self.skipped, "by_reason": dict(self.skipped_by_reason),
                        "first": self.skipped_examples},
        }


def _batches(inputs: Sequence[str], columns: Sequence[str]) -> Iterator[Tuple[str, List[Tuple[int, object]]]]:
    for path in inputs:
        batch: List[Tuple[int, object]] = []
        for lineno, raw in iter_input(path, columns):
            batch.append((lineno, raw))
            if len(batch) == BATCH_SAMPLES:
                yield path, batch
                batch = []
        if batch:
            yield path, batch


def _results(inputs: Sequence[str], pool: Optional[multiprocessing.pool.Pool], workers: int
             ) -> Iterator[Tuple[str, BatchResult]]:
    """Batch results in input order; with a pool, a bounded number of batches in flight."""
    columns = record_columns(_ENCODER.config)
    if pool is None:
        for path, batch in _batches(inputs, columns):
            yield path, _encode_batch(batch)
        return
    pending: deque = deque()
    for path, batch in _batches(inputs, columns):
        pending.append((path, pool.apply_async(_encode_batch, (batch,))))
        if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
            path_done, result = pending.popleft()
            yield path_done, result.get()
    while pending:
        path_done, result = pending.popleft()
        yield path_done, result.get()


def preprocess(
    inputs: Sequence[str],
    tokenizer_dir: str,
    output_prefix: str,
    workers: int = 1,
    skip_invalid: bool = False,
    config: FormatConfig = FormatConfig(),
    progress: bool = True,
) -> Dict:
    """Run the preprocessing; returns the statistics also written to ``P_stats.json``."""
    from megatron_onereason.data.indexed import IndexedPairWriter  # imports megatron (~5 s): only the writer needs it

    seen: Dict[str, str] = {}
    for path in inputs:
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path}: a directory; --input takes files (JSONL or parquet), e.g. {path}/*.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: input file not found")
        same = seen.setdefault(os.path.realpath(path), path)
        if same is not path:
            raise InputError(f"--input names {path} twice{'' if same == path else f' (also as {same})'}: every "
                             "sample would be written twice; give each file once")
        if path.endswith(".parquet"):
            open_parquet(path)  # a broken file is named before any output or progress bar
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    global _ENCODER
    _ENCODER = SampleEncoder(tokenizer_dir, config)  # load (and validate) the tokenizer once, before any output
    fingerprint = tokenizer_fingerprint(tokenizer_dir)  # recorded: the trainer refuses data of another tokenizer
    stats = CorpusStats()
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # Fork the workers first: they inherit the encoder, and no thread (tqdm's monitor) exists yet.
        pool = stack.enter_context(multiprocessing.get_context("fork").Pool(workers, _init_worker)) \
            if workers > 1 else None
        writer = stack.enter_context(IndexedPairWriter(output_prefix))
        bar = stack.enter_context(tqdm(desc="preprocess", unit="tok", unit_scale=True, disable=not progress,
                                       file=sys.stderr))
        for path, result in _results(inputs, pool, workers):
            for lineno, reason, message in result.errors:
                if not skip_invalid:
                    raise InputError(f"{path}:{lineno}: {message}")
                stats.add_skipped(f"{path}:{lineno}", reason, message)
            stats.blank_lines += result.blank_lines
            offset = 0
            for length, meta in zip(result.lengths, result.meta):
                writer.add(result.tokens[offset:offset + length], result.lossmask[offset:offset + length])
                source, domain, kind, loss, itemic, dropped = meta
                stats.add_document(source, domain, kind, length, loss, itemic, dropped)
                offset += length
            bar.update(offset)
            bar.set_postfix(samples=stats.samples, skipped=stats.skipped, refresh=False)
        if stats.samples == 0:
            raise InputError(f"{', '.join(inputs)}: no valid samples ({stats.skipped} skipped)")
        elapsed = time.perf_counter() - start
        out = stats.to_dict()
        out.update(inputs=list(inputs), tokenizer=tokenizer_dir, output_prefix=output_prefix, workers=workers,
                   append_eod=config.append_eod, input_format=config.input_format, json_keys=list(config.json_keys),
                   soft_switch=config.soft_switch, elapsed_s=round(elapsed, 3),
                   tokens_per_s=round(stats.tokens / elapsed, 1), **{FINGERPRINT_KEY: fingerprint})
        writer.commit(out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DocHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL or .parquet files, one sample per line/row")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.json, and "
                                                           "itemic_tokens.json for itemic text)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_tokens.*, PREFIX_lossmask.*, "
                                                               "PREFIX_stats.json")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (use the number of cores)")
    parser.add_argument("--skip-invalid", action="store_true", help="skip and count malformed samples instead of "
                                                                    "stopping at the first")
    parser.add_argument("--no-append-eod", action="store_true", help="do not end pre-training samples with "
                                                                     "<|endoftext|>")
    parser.add_argument("--input-format", default="auto", choices=INPUT_FORMATS,
                        help="record schema: this project's (onereason), OpenOneRec's (openonerec), Megatron-LM's "
                             "{'text'} (megatron), or any of them per record (auto)")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="plain-text keys of a record (Megatron-LM's "
                                                                         "--json-keys), concatenated in order")
    parser.add_argument("--soft-switch", action="store_true", help="append /think or /no_think to the last user "
                                                                   "turn (OpenOneRec's qwen3_soft_switch)")
    args = parser.parse_args(argv)
    raise_on_sigterm()  # a killed run removes its temporary files on the way out

    def run() -> None:
        config = FormatConfig(append_eod=not args.no_append_eod, input_format=args.input_format,
                              json_keys=tuple(args.json_keys), soft_switch=args.soft_switch)
        try:
            stats = preprocess(args.input, args.tokenizer, args.output_prefix, args.workers, args.skip_invalid,
                               config)
        except OSError as e:
            if not is_no_space(e):
                raise
            raise UserError(f"{no_space_message(args.output_prefix, 'the preprocessed data')}; nothing was left at "
                            "the output prefix") from None
        print(f"{stats['samples']} samples, {stats['tokens']} tokens ({stats['loss_tokens']} with loss, "
              f"{stats['itemic_tokens']} itemic), {stats['skipped']['total']} skipped, "
              f"{stats['tokens_per_s']:.0f} tokens/s -> {args.output_prefix}_{{tokens,lossmask}}.{{bin,idx}}")

    return run_cli("preprocess_data", run)


if __name__ == "__main__":
    sys.exit(main())
