#!/usr/bin/env bash
# Issue 13's results table, one prepared run (made for the GPU machine's short lease): every model named (default:
# the four original architectures) trained with one command each on the real folds (train on three, validate on
# the fourth, patient-wise), its last and best checkpoints scored per image on that validation fold, and
# everything gathered into OUT/accuracy.json with the GPU, versions, date and exact commands.
#   bash benchmarks/accuracy_run.sh OUT DATA_ROOT [models...]
#   then, here: python -m benchmarks.accuracy_table OUT/accuracy.json --out results/RESULTS.md
# Environment: TRAINER (gpu), PRECISION (bf16-mixed), MAX_TIME (per model, Lightning's DD:HH:MM:SS; 00:00:01:40),
# MAX_EPOCHS (100), VAL_FOLD (1), EXTRA (more Hydra overrides for every training, e.g. "data.image_size=128"),
# WORK (where the run folders go; default OUT/runs). OUT then gets accuracy.json and logs.tar.gz (the training and
# evaluate logs), few enough files to come back from the GPU machine with WORK outside OUT.
set -euo pipefail
out=${1:?usage: bash benchmarks/accuracy_run.sh OUT DATA_ROOT [models...]}
root=${2:?usage: bash benchmarks/accuracy_run.sh OUT DATA_ROOT [models...]}
shift 2
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(unet deeplabv3 fcn lraspp)
work=${WORK:-$out/runs}
mkdir -p "$out" "$work"
out=$(cd "$out" && pwd)
work=$(cd "$work" && pwd)
for model in "${models[@]}"; do
  run=$work/$model
  train=(python -m bts_lightning.train "model=$model" "data.root=$root" "data.val_fold=${VAL_FOLD:-1}" data.test_fold=null
         "trainer=${TRAINER:-gpu}" "trainer.precision=${PRECISION:-bf16-mixed}" "trainer.max_epochs=${MAX_EPOCHS:-100}"
         "++trainer.max_time=${MAX_TIME:-00:00:01:40}" ${EXTRA:-} "hydra.run.dir=$run")
  echo "${train[*]}" > "$work/$model.command"
  if [ -f "$run/metrics.json" ]; then
    echo "$model: trained already in $run (kept; remove the folder to train it again)"
  else  # a run killed before its metrics.json resumes from its last.ckpt
    resume=(); [ -f "$run/checkpoints/last.ckpt" ] && resume=(ckpt_path=last)
    "${train[@]}" "${resume[@]}" > "$work/$model.train.log" 2>&1 ||
      { echo "$model: training failed (see $work/$model.train.log)"; continue; }
  fi
  for which in last best; do
    python -m bts_lightning.evaluate "ckpt_path=$run/checkpoints/$which.ckpt" split=val "hydra.run.dir=$run/evaluate_$which" \
        > "$work/$model.evaluate_$which.log" 2>&1 || echo "$model: evaluate of $which.ckpt failed"
  done
  echo "$model done"
done
tar -C "$work" -czf "$out/logs.tar.gz" $(cd "$work" && ls *.log *.command)
python -m benchmarks.accuracy_table --collect "$work" --val-fold "${VAL_FOLD:-1}" --out "$out/accuracy.json"
