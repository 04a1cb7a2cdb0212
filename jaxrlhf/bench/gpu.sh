#!/usr/bin/env bash
# The GPU suite (issue 19): one short script, under 8 minutes on one H100/H200. Run from the repo root:
#   bash jaxrlhf/bench/gpu.sh [OUT_DIR]          (default docs/results/gpu)
# Rows (formulas in jaxrlhf/bench/steps.py's docstring):
#   1. DPO-step MFU, Qwen2.5-0.5B shape, bf16: (1 + 1/3) x flops_per_token(T) x tokens / step time / peak
#   2. sampler at batch 1 (decode bandwidth fraction: (parameter + KV bytes per step) / step time / HBM
#      bandwidth) and at batch 256 (tokens/s), Qwen2.5-0.5B shape, bf16
#   3. DPO-step MFU, Qwen2.5-1.5B shape, bf16
#   4. one PPO iteration split into generate / score / train (the tiny PPO config)
# The presets can be overridden (P05=tiny P15=tiny SEQ=64 ...) so CI runs the script on a CPU in seconds.
set -euo pipefail
OUT=${1:-docs/results/gpu}
PY=${PY:-python}
P05=${P05:-qwen2.5-0.5b}
P15=${P15:-qwen2.5-1.5b}
SEQ=${SEQ:-1024}
BATCH=${BATCH:-8}
NEW=${NEW:-128}
SAMPLER_BATCH=${SAMPLER_BATCH:-256}
DTYPE=${DTYPE:-bfloat16}
STEPS=${STEPS:-5}
mkdir -p "$OUT"
start=$(date +%s)
"$PY" -m jaxrlhf.bench --preset="$P05" --dtype="$DTYPE" --batch="$BATCH" --seq="$SEQ" --steps="$STEPS" \
  --only=dpo,sampler --new_tokens="$NEW" --sampler_batch="$SAMPLER_BATCH" --out="$OUT/qwen2.5-0.5b.json"
"$PY" -m jaxrlhf.bench --preset="$P15" --dtype="$DTYPE" --batch="$BATCH" --seq="$SEQ" --steps="$STEPS" \
  --only=dpo --out="$OUT/qwen2.5-1.5b.json"
"$PY" -m jaxrlhf.bench --preset=tiny --only=ppo_iteration --out="$OUT/ppo_iteration.json"
echo "GPU suite: $(( $(date +%s) - start )) s; results in $OUT" | tee "$OUT/wall.txt"
