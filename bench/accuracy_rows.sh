#!/bin/sh
# The headline rows of docs/accuracy.md from trained full SKUs: per set, the end of the default run again
# (`inspector train --resume`: memories stored, settings chosen, memories refilled), the --ng row, the default
# command on the split less the scrap parts, and a fresh quick SKU; each evaluated with --require-held-out.
#   bench/accuracy_rows.sh SRC OUT [SETS]   # SRC/<set>: SKUs trained by `inspector train` (train_state kept);
#                                           # scrap splits from bench/scrap_split.py in var/scrap/<set>
# One core, one step at a time (about 45 min for both sets on a busy 2-core box).
set -x
SRC=$1; D=$2; SETS=${3:-"cookies magnetic_tile"}
I=.venv/bin/inspector; T="--threads 1"
export OMP_NUM_THREADS=1
ev() { $I eval --sku-dir "$1" --dataset mvtec --root "$2" --category "$c" --backend onnxruntime $T --out "$3" --require-held-out; }
for c in $SETS; do
  extra=""; [ "$c" = cookies ] && extra="--min-defect-px 12"
  rm -rf "$D/$c" "$D/$c-ng" "$D/$c-quick"; mkdir -p "$D"
  cp -r "$SRC/$c" "$D/$c"; cp -r "$SRC/$c" "$D/$c-ng"
  (time $I train --out "$D/$c" --resume $T) > "$D/$c-select.log" 2>&1
  $I export --sku-dir "$D/$c" > /dev/null 2>&1
  ev "$D/$c" ../shared/data "$D/eval/$c" > "$D/eval-$c.log" 2>&1
  ev "$D/$c" "var/scrap/$c/root" "$D/eval/$c-minus-scrap" > "$D/eval-$c-minus-scrap.log" 2>&1
  (time $I train --out "$D/$c-ng" --resume $T --ng "var/scrap/$c/scrap") > "$D/$c-ng-select.log" 2>&1
  $I export --sku-dir "$D/$c-ng" > /dev/null 2>&1
  ev "$D/$c-ng" "var/scrap/$c/root" "$D/eval/$c-ng" > "$D/eval-$c-ng.log" 2>&1
  (time $I train --out "$D/$c-quick" --dataset mvtec --data ../shared/data --category "$c" --quick $extra $T) \
    > "$D/$c-quick.log" 2>&1
  $I export --sku-dir "$D/$c-quick" > /dev/null 2>&1
  ev "$D/$c-quick" ../shared/data "$D/eval/$c-quick" > "$D/eval-$c-quick.log" 2>&1
done
