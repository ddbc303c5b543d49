#!/usr/bin/env bash
# Issue 15's measurements: false alarms on held-out empty slices with and without tumor-free training input,
# with and without the calibrated slice-level decision. CPU runs on the two sets that have empty slices:
# synthetic (data=synthetic_empty) and the 10-patient LGG sample. Each configuration: train (val fold 1,
# test fold 2, patient-wise), evaluate the test fold without the decision, calibrate it on the val fold
# (target 5 % false alarms), evaluate the test fold with it. Tabulate with benchmarks/false_alarms_table.py.
# The *1200_* and lgg60_* runs compare the slice-presence loss term (experiment=empty_slices) with tumor-only training.
# synthetic1200_tumor_slices_loss and synthetic1200_presence_gate (named only, not in the default list) add the
# segmentation-on-tumor-slices loss and the presence gate (benchmarks/false_alarms.md);
# synthetic1200_slice_term_per_batch the same share of empty slices in every batch (data.empty_fraction_per_batch).
# synthetic1200_cascade and lgg60_cascade join the *_tumor_only run's segmentation with the *_slice_term_long run's
# presence (experiment=empty_slices on twice the schedule; python -m bts_lightning.cascade): list those runs first.
#   bash benchmarks/false_alarms.sh OUT [LGG_ROOT] [only-these-names...]
# TRAINER=gpu (any conf/trainer option; default cpu, as measured in benchmarks/false_alarms.md) runs them elsewhere.
set -euo pipefail
out=${1:?usage: bash benchmarks/false_alarms.sh OUT [LGG_ROOT] [names...]}
lgg=${2:-../shared/data/lgg-sample}
shift $(( $# > 1 ? 2 : 1 ))
trainer=${TRAINER:-cpu}
mkdir -p "$out"
out=$(cd "$out" && pwd)
crop='data.extra_augmentations=[{_target_: bts_lightning.data.augment.TumorFreeCrop, p: 0.5}]'
synthetic=(data=synthetic_empty data.synthetic.size=96 "paths.data_dir=$out/data" "trainer=$trainer" trainer.max_epochs=20)
lgg_data=(data=lgg "data.root=$lgg" data.image_size=128 data.test_fold=2 "trainer=$trainer" trainer.max_epochs=15)
# The slice-presence term against its baseline: 1,200 synthetic slices (120 tumor / 120 empty per held-out fold),
# both runs chosen on val/dice_tumor with patience 15 (experiment=empty_slices sets these for its run).
synthetic1200=(data=synthetic_empty data.synthetic.size=96 data.synthetic.n=1200 "paths.data_dir=$out/data" "trainer=$trainer"
               trainer.max_epochs=100)
lgg60=(data=lgg "data.root=$lgg" data.image_size=128 data.test_fold=2 "trainer=$trainer" trainer.max_epochs=60)
baseline="data.empty_fraction=0|monitor.metric=val/dice_tumor|callbacks.early_stopping.patience=15"
long="callbacks.early_stopping.patience=30|scheduler.scheduler.patience=8"
declare -A runs=(
  [synthetic_tumor_only]="data.empty_fraction=0"
  [synthetic_empty_slices]=""
  [synthetic_tumor_free_crops]="data.empty_fraction=0|$crop"
  [lgg_tumor_only]="data.empty_fraction=0"
  [lgg_empty_slices]=""
  [lgg_empty_half]="data.empty_fraction=0.5"
  [lgg_tumor_free_crops]="data.empty_fraction=0|$crop"
  [synthetic1200_tumor_only]="$baseline"
  [synthetic1200_slice_term]="experiment=empty_slices"
  [lgg60_tumor_only]="$baseline"
  [lgg60_slice_term]="experiment=empty_slices"
  [synthetic1200_slice_term_long]="experiment=empty_slices|$long|trainer.max_epochs=200"
  [lgg60_slice_term_long]="experiment=empty_slices|$long|trainer.max_epochs=120"
  [synthetic1200_tumor_slices_loss]="experiment=empty_slices|loss=dice_ce_slice_tumor"
  [synthetic1200_presence_gate]="experiment=empty_slices|model.net.presence_gate=true|loss=dice_ce"
  [synthetic1200_slice_term_per_batch]="experiment=empty_slices|data.empty_fraction=0.5|data.empty_fraction_per_batch=true"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(synthetic_tumor_only synthetic_empty_slices synthetic_tumor_free_crops
                                 lgg_tumor_only lgg_empty_slices lgg_empty_half lgg_tumor_free_crops
                                 synthetic1200_tumor_only synthetic1200_slice_term lgg60_tumor_only lgg60_slice_term
                                 synthetic1200_slice_term_long lgg60_slice_term_long synthetic1200_cascade lgg60_cascade)
for name in "${names[@]}"; do
  run=$out/$name
  if [[ $name == *_cascade ]]; then
    pair=${name%_cascade}
    python -m bts_lightning.cascade "segmentation=$out/${pair}_tumor_only/train/checkpoints/best.ckpt" \
        "presence=$out/${pair}_slice_term_long/train/checkpoints/best.ckpt" target_false_alarm_rate=0.05 "hydra.run.dir=$run/cascade"
    ckpt=$run/cascade/checkpoints/cascade.ckpt
    python -m bts_lightning.evaluate "ckpt_path=$ckpt" split=test slice_decision=off "hydra.run.dir=$run/test_raw"
    python -m bts_lightning.evaluate "ckpt_path=$ckpt" split=test "hydra.run.dir=$run/test_decision"
    continue
  fi
  IFS='|' read -r -a extra <<< "${runs[$name]}"
  case $name in
    synthetic1200_*) base=("${synthetic1200[@]}") ;;
    lgg60_*) base=("${lgg60[@]}") ;;
    synthetic_*) base=("${synthetic[@]}") ;;
    *) base=("${lgg_data[@]}") ;;
  esac
  resume=(); [ -f "$run/train/checkpoints/last.ckpt" ] && resume=(ckpt_path=last)  # a killed run resumes
  [ -f "$run/train/metrics.json" ] ||
    python -m bts_lightning.train "${base[@]}" "${extra[@]}" "${resume[@]}" "hydra.run.dir=$run/train"
  ckpt=$run/train/checkpoints/best.ckpt
  python -m bts_lightning.evaluate "ckpt_path=$ckpt" split=test slice_decision=off "hydra.run.dir=$run/test_raw"
  python -m bts_lightning.calibrate "ckpt_path=$ckpt" split=val target_false_alarm_rate=0.05 "hydra.run.dir=$run/calibrate"
  python -m bts_lightning.evaluate "ckpt_path=$ckpt" split=test "hydra.run.dir=$run/test_decision"
done
