#!/usr/bin/env bash
# The second stage's sweep (issue 25): from the repository root, `nohup bash
# results/tinyimagenet100/second_stage.sh >> second_stage.log 2>&1 &`. Resumable: a finished run is skipped, an
# interrupted one resumes from its last epoch's checkpoint (same machine), and each group is probed on the 100 unseen
# classes as soon as it finishes (the probe needs the student's weights, which are not committed). The runs of the
# first stage and the noise-floor runs are under "Regenerate" in README.md.
set -u
export OMP_WAIT_POLICY=PASSIVE  # waiting threads sleep instead of spinning: no number changes
R=results/tinyimagenet100
PROBE_DATA=${PROBE_DATA:-../shared/data/tiny-imagenet-100b}
probe() {
  OMP_NUM_THREADS=1 nice -n 5 kdbench probe --all --results $R --dataset tinyimagenet --data-root "$PROBE_DATA" \
    --protocol fast --device cpu
  local rc=$?
  echo "=== $(date -u +%FT%TZ) rc=$rc probe"
}
run() {
  nice -n 5 kdbench run --pairs tinyimagenet100-cpu --results $R "$@"
  local rc=$?
  echo "=== $(date -u +%FT%TZ) rc=$rc run $*"
  probe
}
probe
for seed in 0 1 2; do
  run --methods dkd,dkd-ls,kd-ls,dist --seeds $seed
  run --methods reviewkd,simkd,ofd --seeds $seed
done
for group in ce,vid,rkd,nst at,sp,cc ab,ft,fsp crd,crd+kd,rrd,rrd+kd,rrd-2025 crcd; do run --methods $group --seeds 2; done
# The grids, one command so that each seed's 6 runs share one cohort (one teacher pass): each --set applies to its
# own method only, so this is 12 runs (`--dry-run` lists them): AT 125 and 500 (with 250 from the investigation and
# the reference 1000), FT 50 (with 100 and 200), KD temperature 1, 2 and 8 (with 4).
run --methods at,ft,kd --seeds 0,1 --set methods.at.weight=125,500 --set methods.ft.weight=50 \
  --set methods.kd.temperature=1,2,8
echo "=== $(date -u +%FT%TZ) second stage done"
