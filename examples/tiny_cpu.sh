#!/usr/bin/env bash
# The embedded default: the whole flow on a tiny random Qwen3 on CPU, no downloads, a few minutes on 2 cores.
#   bash examples/tiny_cpu.sh [RUN_DIR]      (default runs/tiny_cpu; re-running starts it afresh)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_venv.sh
PY=.venv/bin/python
RUN=${1:-runs/tiny_cpu}
rm -rf "$RUN" && mkdir -p "$RUN"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
step() { echo; echo "=== $* ==="; }
start=$(date +%s)

step "1. tiny random Qwen3 (GQA 4 heads / 2 groups, tied embeddings) + locally built Qwen3 tokenizer"
$PY tools/make_tiny_qwen3.py --out "$RUN/hf_base"

step "2. extend the vocabulary with itemic tokens (5 domains + 3 levels x 32 codes, rows ~ N(mean, cov))"
$PY tools/extend_vocab.py --hf-dir "$RUN/hf_base" --out-dir "$RUN/hf_itemic" --codebook-size 32

step "3. convert HF -> megatron-core torch_dist (vocab padded for TP=2), verifying logits at TP1"
$PY checkpoints_convert/hf_to_mcore.py --hf-dir "$RUN/hf_itemic" --out-dir "$RUN/mcore" --tp 2 --verify

step "4. megatron forward at TP=2 on CPU (gloo, 2 processes), batch and packed documents, vs transformers"
$PY -m torch.distributed.run --standalone --nproc_per_node 2 tools/compare_logits.py \
  --mcore-dir "$RUN/mcore" --hf-dir "$RUN/hf_itemic" --tp 2

step "5. export megatron -> HF (sharded safetensors + tokenizer), verifying logits"
$PY checkpoints_convert/mcore_to_hf.py --mcore-dir "$RUN/mcore" --out-dir "$RUN/hf_export" --verify

echo
echo "tiny_cpu: all steps passed in $(( $(date +%s) - start ))s; outputs under $RUN"
