#!/usr/bin/env bash
# recipes/own_data.yaml on a CPU, at its CPU sizes (--profile cpu), with the students trained under 3 seeds.
#
#   bash eval/own_data_cpu.sh DATA_DIR [RUNS_DIR [--set KEY=VALUE ...]]
#   e.g. bash eval/own_data_cpu.sh ../shared/data/shakespeare          (extra --set lines go to every run)
#
# Seed 0 runs the whole template (the two teachers and the choice between them, student, student_ft, pts,
# distill, best, eval) in RUNS_DIR/seed0, two stages at a time (--jobs 2, a thread each).
# Seeds 1 and 2 reuse its teachers, pruned student and PTs (copied: their stages are unchanged, so nlgkd skips
# them) and train student_ft and the distill candidates again with their own seed, then choose and evaluate,
# two seeds at a time with one thread each. Last, eval/own_data_seeds.py prints the per-seed table (test BLEU of
# student_ft and of the chosen student), the mean gain, and the wall and CPU seconds of every stage.
# The template's data columns are Shakespeare's (original -> modern); for other data add --set lines below.
set -euo pipefail
DATA=${1:?usage: bash eval/own_data_cpu.sh DATA_DIR [RUNS_DIR [--set KEY=VALUE ...]]}
RUNS=${2:-runs/own_data_cpu}
shift $(( $# < 2 ? $# : 2 ))
PY=${PYTHON:-python}
RECIPE=recipes/own_data.yaml

# the template's CPU sizes (its `profiles: cpu`), then any extra --set lines
CPU=(--profile cpu --set "data.dir=$DATA" "$@")

"$PY" -m nlgkd run "$RECIPE" --runs-dir "$RUNS/seed0" --jobs 2 "${CPU[@]}"

NAME=$("$PY" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$RECIPE")
pids=()
for seed in 1 2; do
  mkdir -p "$RUNS/seed$seed/$NAME"
  for stage in teachers@mixed teachers@gold teacher student pts; do
    [ -d "$RUNS/seed$seed/$NAME/$stage" ] || cp -r "$RUNS/seed0/$NAME/$stage" "$RUNS/seed$seed/$NAME/$stage"
  done
  OMP_NUM_THREADS=1 "$PY" -m nlgkd run "$RECIPE" --runs-dir "$RUNS/seed$seed" "${CPU[@]}" \
    --set stages.student_ft.seed=$seed --set stages.distill.seed=$seed > "$RUNS/seed$seed.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
"$PY" eval/own_data_seeds.py "$RUNS" --name "$NAME"
