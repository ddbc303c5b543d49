#!/usr/bin/env bash
# The cascade (issue 15) cross-validated on the LGG sample: five patient-wise fold pairs (val / test) 1/2, 2/3,
# 3/4, 4/5, 5/1, so that every patient is in one test fold. Each pair: the tumor-only segmentation model and the
# presence model (experiment=empty_slices on the longer schedule) of benchmarks/false_alarms.md, the cascade
# calibrated on the val fold (target 5 % false alarms), and both scored on the test fold. Tabulate (per pair and
# pooled over every test slice) with: python -m benchmarks.cascade_cv_table OUT
#   bash benchmarks/cascade_cv.sh OUT [LGG_ROOT] [VAL/TEST pairs...]
# TRAINER=gpu (any conf/trainer option; default cpu, as measured in benchmarks/false_alarms.md) runs them elsewhere;
# EXTRA="trainer.max_epochs=1 ..." appends Hydra overrides to both trainings (a quick check of the script; or a variant
# of the recipe, e.g. EXTRA="data.channels=[0,1,2]" or EXTRA="seed=1 data.seed=42", into another OUT);
# PRESENCE_EXTRA="loss=dice_ce_slice_tumor" appends overrides to the presence training only; CASCADE_EXTRA="target_on=
# new_slices" to both cascade calls (a variant of the calibration, e.g. into an OUT whose pairs link to another OUT's
# trainings).
# ENSEMBLE_WITH="OUT_B [OUT_C ...]" (other OUT folders of this script, e.g. trained with another seed) makes each pair's
# presence an ensemble: its own presence model and the same pair's presence/checkpoints/best.ckpt of every OUT_B.
# Each pair also gets the scan-context cascade (context=${CONTEXT:-1}: presence averaged with CONTEXT slices either
# side in the scan; CONTEXT=0 skips it), in cascade_context/ and cascade_context_test/. A training whose
# checkpoints/best.ckpt exists is not run again, so a rerun adds the steps an earlier run lacks.
set -euo pipefail
out=${1:?usage: bash benchmarks/cascade_cv.sh OUT [LGG_ROOT] [VAL/TEST pairs, e.g. 1/2 3/4]}
lgg=${2:-../shared/data/lgg-sample}
shift $(( $# > 1 ? 2 : 1 ))
pairs=("$@")
[ ${#pairs[@]} -gt 0 ] || pairs=(1/2 2/3 3/4 4/5 5/1)
mkdir -p "$out"
out=$(cd "$out" && pwd)
for pair in "${pairs[@]}"; do
  val=${pair%/*} test=${pair#*/}
  run=$out/val${val}_test${test}
  data=(data=lgg "data.root=$lgg" data.image_size=128 "data.val_fold=$val" "data.test_fold=$test" "trainer=${TRAINER:-cpu}")
  # A finished run (metrics.json) is kept; one killed before it resumes from its last.ckpt.
  resume=(); [ -f "$run/tumor_only/checkpoints/last.ckpt" ] && resume=(ckpt_path=last)
  [ -f "$run/tumor_only/metrics.json" ] ||
    python -m bts_lightning.train "${data[@]}" trainer.max_epochs=60 data.empty_fraction=0 monitor.metric=val/dice_tumor \
        callbacks.early_stopping.patience=15 ${EXTRA:-} "${resume[@]}" "hydra.run.dir=$run/tumor_only"
  resume=(); [ -f "$run/presence/checkpoints/last.ckpt" ] && resume=(ckpt_path=last)
  [ -f "$run/presence/metrics.json" ] ||
    python -m bts_lightning.train "${data[@]}" experiment=empty_slices trainer.max_epochs=120 \
        callbacks.early_stopping.patience=30 scheduler.scheduler.patience=8 ${EXTRA:-} ${PRESENCE_EXTRA:-} \
        "${resume[@]}" "hydra.run.dir=$run/presence"
  presence=$run/presence/checkpoints/best.ckpt
  for other in ${ENSEMBLE_WITH:-}; do
    presence="$presence,$other/val${val}_test${test}/presence/checkpoints/best.ckpt"
  done
  presence="[$presence]"
  python -m bts_lightning.cascade "segmentation=$run/tumor_only/checkpoints/best.ckpt" \
      "presence=$presence" target_false_alarm_rate=0.05 ${CASCADE_EXTRA:-} "hydra.run.dir=$run/cascade"
  python -m bts_lightning.evaluate "ckpt_path=$run/tumor_only/checkpoints/best.ckpt" split=test slice_decision=off \
      "hydra.run.dir=$run/tumor_only_test"
  python -m bts_lightning.evaluate "ckpt_path=$run/cascade/checkpoints/cascade.ckpt" split=test \
      "hydra.run.dir=$run/cascade_test"
  if [ "${CONTEXT:-1}" != 0 ]; then
    python -m bts_lightning.cascade "segmentation=$run/tumor_only/checkpoints/best.ckpt" \
        "presence=$presence" target_false_alarm_rate=0.05 "context=${CONTEXT:-1}" ${CASCADE_EXTRA:-} \
        "hydra.run.dir=$run/cascade_context"
    python -m bts_lightning.evaluate "ckpt_path=$run/cascade_context/checkpoints/cascade.ckpt" split=test \
        "hydra.run.dir=$run/cascade_context_test"
  fi
done
