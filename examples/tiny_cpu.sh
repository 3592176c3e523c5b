#!/usr/bin/env bash
# The embedded default: OneReason's pre-training pipeline end to end on a tiny random Qwen3, on CPU, no downloads.
#   bash examples/tiny_cpu.sh [RUN_DIR]      (default runs/tiny_cpu; re-running starts it afresh, deleting RUN_DIR only
#   if this script created it; 9-10 min measured on 2 quiet cores, plus ~2 min for the venv on a first run).
#   WORLD_SEED (default 0) and RL_SEED (default 1234) pick the world and the RL runs' seeds.
# learnable synthetic world (catalog, RQ-KMeans itemic codes, corpus, SFT data with CoTs, RL prompts, oracle) ->
# tiny Qwen3 + extended vocabulary -> megatron checkpoint -> preprocessing -> stage 1 (TP=2) -> stage 2 (PP=2) ->
# stage 3 (DP=2) -> SFT (TP=2) -> export to Hugging Face -> GRPO (video, TP=2 actor + rollout on Ray) -> MOPD (PP=2
# actor), with a loss table per stage, held-out Recall@1/8/32 of the SFT and GRPO models beside the world's
# Bayes-optimal and random Recall@K, RUN_DIR/summary.json, RUN_DIR/curves.png and TensorBoard logs under RUN_DIR/tb.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/tiny_cpu}
MARK=.made_by_tiny_cpu  # only a directory this script created is deleted on a re-run
if [ -e "$RUN" ] && [ ! -f "$RUN/$MARK" ] && [ -n "$(ls -A "$RUN" 2>/dev/null)" ]; then
  echo "tiny_cpu: $RUN exists and was not created by this script; refusing to delete it" \
       "(give a new RUN_DIR, or delete it yourself)" >&2
  exit 1
fi
bash tools/setup_venv.sh
PY=.venv/bin/python
rm -rf "$RUN" && mkdir -p "$RUN" && touch "$RUN/$MARK"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
step() { echo; echo "=== $* ==="; }
torchrun2() { $PY -m torch.distributed.run --standalone --nproc_per_node 2 "$@"; }
start=$(date +%s)

step "1-2. learnable world: 4 domains x 200 items in 8 interests each, RQ-KMeans itemic codes (3 levels x 16),
users whose next video is a popular item of their dominant interest (Zipf popularity); SFT answers from a demonstrator
that knows the interest but not the popularity, so GRPO's reward has something to teach; the oracle's Recall@K"
$PY tools/make_synthetic_world.py --out "$RUN/world" --seed "${WORLD_SEED:-0}" --target-domains video \
  --follow-prob 0 --popularity-skew 2 --sft-answers interest --train-users 512 --eval-users 256
W=$RUN/world

step "3. tiny random Qwen3 + locally built Qwen3 tokenizer, vocabulary extended with the itemic tokens"
$PY tools/make_tiny_qwen3.py --out "$RUN/hf_base"
$PY tools/extend_vocab.py --hf-dir "$RUN/hf_base" --out-dir "$RUN/hf_itemic" --levels 3 --codebook-size 16 > /dev/null

step "4. HF -> megatron-core checkpoint (vocab padded for TP=2), logits verified against transformers"
$PY checkpoints_convert/hf_to_mcore.py --hf-dir "$RUN/hf_itemic" --out-dir "$RUN/ckpt/base" --tp 2 --verify
torchrun2 tools/compare_logits.py --mcore-dir "$RUN/ckpt/base" --hf-dir "$RUN/hf_itemic" --tp 2

step "5. the world's four-granularity corpus + chat SFT samples (CoT), preprocessed into IndexedDataset files"
for part in token_granularity item_granularity relational_granularity user_granularity sft_chat; do
  $PY tools/preprocess_data.py --input "$W/corpus/$part.jsonl" --tokenizer "$RUN/hf_itemic" \
    --output-prefix "$RUN/data/$part" --workers 2
done
D=$RUN/data
BLEND="[0.2, $D/token_granularity, 0.3, $D/item_granularity, 0.2, $D/relational_granularity, 0.3, $D/user_granularity]"

train() {  # name config starting-weights
  torchrun2 -m megatron_onereason.train --config "examples/configs/tiny/$2" model.load="$3" \
    checkpoint.save="$RUN/ckpt/$1" checkpoint.load="$RUN/ckpt/$1" logging.tensorboard_dir="$RUN/tb/$1" \
    logging.metrics_jsonl="$RUN/metrics/$1.jsonl" "data.blend=${4:-$BLEND}"
}
step "6. pre-training stage 1: only the itemic rows train (TP=2)";      train stage1 stage1.yaml "$RUN/ckpt/base"
step "7. pre-training stage 2: all parameters (PP=2)";                  train stage2 stage2.yaml "$RUN/ckpt/stage1"
step "8. pre-training stage 3: longer samples (DP=2, distributed optimizer)"; train stage3 stage3.yaml "$RUN/ckpt/stage2"
step "9. SFT on chat data, loss on assistant turns only (TP=2)";       train sft sft.yaml "$RUN/ckpt/stage3" "[1.0, $D/sft_chat]"

step "10. export to Hugging Face (sharded safetensors + tokenizer with itemic tokens), logits verified"
$PY checkpoints_convert/mcore_to_hf.py --mcore-dir "$RUN/ckpt/sft" --out-dir "$RUN/hf_final" --verify

RL_DATA=(rollout.model_dir="$RUN/hf_final" data.catalog="$W/itemic" data.benchmark="$W/rl_train.jsonl"
         data.eval_benchmark="$W/rl_eval.jsonl" seed="${RL_SEED:-1234}")
evaluate() {  # name model: held-out Recall@1/8/32 (greedy CoT, then a beam of 32 items over the catalog)
  $PY -m megatron_onereason.evaluate --model "$2" --catalog "$W/itemic" --data "$W/rl_eval.jsonl" --k 1,8,32 \
    --mode thinking --max-think-tokens 32 --out "$RUN/eval/$1" > /dev/null
}
step "11. held-out Recall@K of the SFT model"; evaluate sft "$RUN/hf_final"

step "12. GRPO on video: two-stage rollout (16 prompts x N=2 traces x K=16 items per step), TP=2 megatron actor + vLLM rollout on Ray"
$PY -m megatron_onereason.rl.run --config examples/configs/tiny/grpo.yaml actor.model.load="$RUN/ckpt/sft" \
  "${RL_DATA[@]}" save="$RUN/ckpt/grpo_video" metrics_jsonl="$RUN/metrics/grpo.jsonl" tensorboard_dir="$RUN/tb/grpo"
$PY checkpoints_convert/mcore_to_hf.py --mcore-dir "$RUN/ckpt/grpo_video" --out-dir "$RUN/hf_grpo_video"
evaluate grpo "$RUN/hf_grpo_video"

step "13. MOPD: the SFT student distils the GRPO video teacher on its domain (PP=2 actor)"
$PY -m megatron_onereason.rl.run --config examples/configs/tiny/mopd.yaml actor.model.load="$RUN/ckpt/sft" \
  "${RL_DATA[@]}" "mopd.teachers={video: $RUN/hf_grpo_video}" save="$RUN/ckpt/mopd" \
  metrics_jsonl="$RUN/metrics/mopd.jsonl" tensorboard_dir="$RUN/tb/mopd"

step "summary"
$PY tools/summarize_metrics.py stage1="$RUN/metrics/stage1.jsonl" stage2="$RUN/metrics/stage2.jsonl" \
  stage3="$RUN/metrics/stage3.jsonl" sft="$RUN/metrics/sft.jsonl" grpo="$RUN/metrics/grpo.jsonl" \
  mopd="$RUN/metrics/mopd.jsonl"
$PY tools/summarize_demo.py --run "$RUN"
echo
echo "tiny_cpu: done in $(( $(date +%s) - start ))s; HF model in $RUN/hf_final, TensorBoard logs in $RUN/tb"
