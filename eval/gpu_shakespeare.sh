#!/usr/bin/env bash
# One GPU session for the study on real data (eval/README.md, "On a GPU: Shakespeare with fresh models"):
# recipes/study/shakespeare_fresh.yaml (the study's stages S2-S8, the final fine-tune, the headline with 3 seeds)
# and recipes/study/shakespeare_archs.yaml (fresh T5 / mBART / BART at equal steps), side by side on one GPU.
#
#   bash eval/gpu_shakespeare.sh DATA_DIR OUT_DIR [SECONDS]
#
# DATA_DIR holds the Shakespeare jsonl files (../shared/data/shakespeare in this project's checkout). Both
# recipes run with --jobs (small models leave the GPU mostly idle); after SECONDS (default 480) whatever still
# runs is stopped, so a fixed device lease always ends with the finished stages' results. Everything worth
# keeping (stage.json and metrics files, logs, predictions, the reports) is packed into OUT_DIR/results.tar.gz.
# SMOKE=1 shrinks every stage to a few steps and examples: the same script end to end on a CPU in minutes.
set -u
DATA=${1:?DATA_DIR}
OUT=${2:?OUT_DIR}
SECONDS_LEFT=${3:-480}
RUNS=${RUNS:-runs}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
NLGKD=(python3 -m nlgkd)
started=$(date +%s)

SET=(--set "data.dir=$DATA")
ARCH_SET=()
if [ "${SMOKE:-0}" = 1 ]; then
  # a few steps and examples per stage, tiny models: checks the flow, not the numbers
  SET+=(--set "data.max_examples={train: 64, validation: 16, test: 16, unlabeled: 32}"
        --set models.teacher.d_model=32 --set models.teacher.ffn_dim=64 --set models.teacher.attention_heads=2
        --set models.teacher.vocab_size=300 --set stages.teacher.max_steps=6 --set stages.teacher.eval_every=3
        --set stages.teacher.eval_samples=8 --set stages.pretrain.max_steps=4 --set stages.pretrain.eval_every=4)
  for stage in kd_seeds kd_seeds_final ce_seeds s2_pruning_ft s3_objective s4_pseudo_targets s5_unlabeled \
               s6_multiple_pts s7_sampling s8_joint_teaching final; do
    SET+=(--set "stages.$stage.max_steps=2" --set "stages.$stage.eval_every=2")
  done
  ARCH_SET+=(--set "data.max_examples={train: 64, validation: 16, test: 16}" --set stages.arch.max_steps=4
             --set stages.arch.eval_every=2 --set stages.arch.eval_samples=4)
  for model in t5 mbart_hf_init mbart bart; do
    ARCH_SET+=(--set "models.$model.d_model=32" --set "models.$model.ffn_dim=64"
               --set "models.$model.attention_heads=2" --set "models.$model.vocab_size=300")
  done
fi

{ python3 -c "import torch, transformers, accelerate, datasets; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu');
print('transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# GPU utilization every 5 s while both run (small models leave it mostly idle: the reason for --jobs)
smi=
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$OUT/gpu_utilization.csv" 2>&1 &
  smi=$!
fi

# the architecture comparison beside the study: 2 at a time, started first (the study's teacher runs alone
# for its first minutes, and the GPU has room)
timeout -s INT "$SECONDS_LEFT" "${NLGKD[@]}" run recipes/study/shakespeare_archs.yaml --jobs 2 --runs-dir "$RUNS" \
  --set "data.dir=$DATA" "${ARCH_SET[@]}" > "$OUT/archs.log" 2>&1 &
archs=$!
timeout -s INT "$SECONDS_LEFT" "${NLGKD[@]}" run recipes/study/shakespeare_fresh.yaml --jobs 6 --runs-dir "$RUNS" \
  "${SET[@]}" > "$OUT/study.log" 2>&1
echo "study exit $? after $(( $(date +%s) - started )) s"
wait $archs
echo "archs exit $? after $(( $(date +%s) - started )) s"
[ -n "$smi" ] && kill "$smi" 2>/dev/null

for run in study-shakespeare-fresh shakespeare-archs; do
  [ -d "$RUNS/$run" ] && "${NLGKD[@]}" report "$RUNS/$run" >> "$OUT/report.log" 2>&1
done
tail -n 40 "$OUT/study.log" "$OUT/archs.log"
for run in study-shakespeare-fresh shakespeare-archs; do
  [ -f "$RUNS/$run/report/report.md" ] && cat "$RUNS/$run/report/report.md" | head -60
done
# stage records, metrics, logs, predictions and reports; no model weights
(cd "$RUNS" && find study-shakespeare-fresh shakespeare-archs \( -name stage.json -o -name 'metrics.json*' \
  -o -name '*.log' -o -path '*/predictions/*' -o -path '*/report/*' \) -print0 2>/dev/null \
  | tar --null -czf "$OUT/results.tar.gz" -T -)
ls -la "$OUT"
