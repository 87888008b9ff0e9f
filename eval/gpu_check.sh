#!/usr/bin/env bash
# One prepared check of what only a GPU shows, in about 9 minutes on one H100: run it first whenever a GPU is lent.
#
#   bash eval/gpu_check.sh OUT_DIR [SHAKESPEARE_DIR]      # SHAKESPEARE_DIR: ../shared/data/shakespeare
#
# Each part runs under its own time guard (a part that runs out is stopped and the next one starts), its log
# in OUT_DIR/logs/PART.log and one line in OUT_DIR/status.txt (exit code, seconds); everything worth keeping
# (logs, stage.json and metrics.json files, the own-data report) is packed into OUT_DIR/gpu_check.tar.gz.
#   kd_step         our chunked KD step vs a naive one vs CE (time, peak memory), BART-large shape, bf16 teacher
#   mfu             a KD step eager vs compile + fused AdamW: model FLOPs utilisation, BART-large shape
#   joint_teaching  Joint-Teaching steps vs plain KD steps on the demo
#   export          the demo's teacher (PyTorch) vs its student (PyTorch) vs the student in CTranslate2
#                   int8_float16: BLEU and sequences/s at batch 16 and 64
#   own_data        recipes/own_data.yaml at its GPU sizes on the Shakespeare data (--jobs 4), then its report
#   pt_engine       pseudo-targets of the demo's teacher: transformers bf16 vs CTranslate2 float16 and
#                   int8_float16 (seq/s, share equal), and a distill step with each source encoded once
# SMOKE=1 runs the same parts with tiny sizes on a CPU in a few minutes (tests/test_gpu_check.py does).
set -u
OUT=${1:?OUT_DIR}
DATA=${2:-../shared/data/shakespeare}
PY=${PYTHON:-python3}
RUNS="$OUT/runs"
mkdir -p "$OUT/logs"
: > "$OUT/status.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# compiled kernels of its own: another process compiling into the shared /tmp cache at the same moment can hand
# this one a half-written library ("file too short", seen beside the suite's compile test). Not inherited: torch
# writes its default into the environment of any process that compiled, and children get that
export TORCHINDUCTOR_CACHE_DIR="$OUT/inductor_cache"

if [ "${SMOKE:-0}" = 1 ]; then
  # the flow, not the numbers: tiny models, a few steps, the demo shrunk
  KD=(--size small --repeats 1 --warmup 0)
  MFU=(--size tiny --steps 1 --warmup 1)
  JT=(--steps 2)
  EXPORT=(--batch-sizes 8 --quantization int8)
  PT_ENGINE=(--device cpu --inputs 16 --rounds 1)
  DEMO=(--set data.demo.train=48 --set data.demo.validation=8 --set data.demo.test=8 --set data.demo.unlabeled=16
        --set models.teacher.d_model=32 --set models.teacher.ffn_dim=64 --set models.teacher.attention_heads=2
        --set models.teacher.vocab_size=300 --set stages.teacher.max_steps=4 --set stages.teacher.eval_every=2
        --set stages.teacher.eval_samples=4)
  DEMO_ALL=("${DEMO[@]}" --set stages.student_ft.max_steps=2 --set stages.distill.max_steps=2
            --set stages.student_ft.eval_every=2 --set stages.distill.eval_every=2
            --set stages.pts.decoding.num_return_sequences=1 --set stages.eval.timing_passes=0)
  OWN=(--set models.teacher.d_model=32 --set models.teacher.ffn_dim=64 --set models.teacher.attention_heads=2
       --set models.teacher.vocab_size=300
       --set stages.teachers.max_steps=4 --set stages.teachers.eval_every=2 --set stages.teachers.eval_samples=4
       --set stages.student_ft.max_steps=2 --set stages.student_ft.eval_every=2 --set stages.distill.max_steps=2
       --set stages.distill.eval_every=2 --set stages.best.max_examples=4 --set stages.eval.timing_passes=0
       --set stages.pts.decoding.num_beams=1)
  LIMITS=(150 300 240 240 300 240)  # torch.compile on a CPU takes minutes on a busy 2-core machine
else
  KD=(--size large --teacher-dtype bf16)
  MFU=(--size large)
  JT=(--steps 100)
  EXPORT=(--batch-sizes 16,64 --quantization int8_float16)
  PT_ENGINE=(--device cuda --inputs 256 --rounds 1)
  DEMO=()
  DEMO_ALL=()
  OWN=()
  LIMITS=(45 90 60 45 240 75)  # 555 s of parts; the archive takes the rest of 10 minutes
fi

part() {  # part NAME SECONDS COMMAND...: one part under its own time guard; its log, exit code and seconds kept
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  timeout --kill-after=15 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local code=$?
  echo "$name exit=$code seconds=$((SECONDS - started))$([ $code = 124 ] && echo ' (stopped at its limit)')" \
    | tee -a "$OUT/status.txt"
  tail -n 15 "$OUT/logs/$name.log"
}

command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  > "$OUT/logs/gpu.txt" 2>&1
part kd_step "${LIMITS[0]}" "$PY" eval/bench_kd_step.py "${KD[@]}"
part mfu "${LIMITS[1]}" "$PY" eval/bench_mfu.py "${MFU[@]}"
part joint_teaching "${LIMITS[2]}" "$PY" eval/bench_joint_teaching.py --runs-dir "$RUNS" "${JT[@]}" "${DEMO[@]}"
part export "${LIMITS[3]}" "$PY" eval/bench_export.py --runs-dir "$RUNS" "${EXPORT[@]}" "${DEMO_ALL[@]}"
part own_data "${LIMITS[4]}" "$PY" -m nlgkd run recipes/own_data.yaml --runs-dir "$RUNS" --jobs 4 \
  --set "data.dir=$DATA" "${OWN[@]}"
"$PY" -m nlgkd report "$RUNS/own_data" > "$OUT/logs/own_data_report.log" 2>&1
part pt_engine "${LIMITS[5]}" "$PY" eval/bench_pt_engine.py --speed-only --runs-dir "$RUNS" "${PT_ENGINE[@]}" \
  "${DEMO[@]}"

kept=$(cd "$OUT" && find runs \( -name stage.json -o -name metrics.json -o -name metrics.jsonl -o -name report.md \) \
  2>/dev/null)
tar czf "$OUT/gpu_check.tar.gz" -C "$OUT" logs status.txt $kept
echo "packed $OUT/gpu_check.tar.gz"
