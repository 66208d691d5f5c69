#!/usr/bin/env bash
# Regenerates every derived table of results/tinyimagenet100 from its committed JSON, its README.md's main table and
# the repository README's digest of it included (run from the repository root; the report is `kdbench report`, and
# investigation/ holds its own scripts).
# tests/test_committed_results.py checks that each committed file is exactly what its command prints.
set -euo pipefail
R=results/tinyimagenet100
kdbench table --results $R --metric top1_last --metric top1_best > $R/table.md
kdbench table --results $R --transfer > $R/transfer.md
kdbench table --results $R --vs kd > $R/vs_kd.md
kdbench table --results $R --vs ce > $R/vs_ce.md
kdbench table --results $R --reference crd2020 --rank-corr resnet56:resnet20 > $R/rank_crd2020.md
kdbench table --results $R --reference crd2020,rrd2024,dkd2022,ls2024 --rank-corr resnet56:resnet20 \
  > $R/rank_published.md
kdbench table --results $R --best-of-grid > $R/best_of_grid.md
kdbench table --results $R --compute > $R/compute.md
python $R/noise/noise_floor.py > $R/noise/noise.md
python $R/summary.py --readme  # the tables of $R/README.md and README.md, between their markers
