#!/usr/bin/env bash
# Regenerates the figures in docs/figures/ with the documented default commands, and keeps each
# command's printed output and JSON next to its figures in $OUT, so that every number quoted in
# docs/gallery.md can be checked against the run that drew the figure.
#
#   bash docs/make_gallery.sh [OUT] [SECTION ...]      (run from the repository root)
#
# OUT defaults to analysis_out. Start from an empty OUT to reproduce the gallery from scratch; a
# reused OUT loads the models cached in OUT/models, which are bit-identical to freshly trained ones
# (tests/analysis/test_runs.py). SECTIONS: analyze (docs/gallery.md), vdp, burgers (figures of
# docs/physics.md and benchmarks/RESULTS.md); default: all three. Every command runs with one torch
# thread (its CLI default); another thread count changes the order of floating-point sums.
# Measured on the shared 2-core box (2026-12-01): analyze about 20 min at load 3 on an empty OUT
# (landscape 11 min, hessian 5 min of it) and about 2 h at load 10-13; vdp 14 min and burgers
# 12 min at load 10-13.
set -euo pipefail
OUT=${1:-analysis_out}
shift || true
SECTIONS=${*:-analyze vdp burgers}
export OMP_NUM_THREADS=1
mkdir -p "$OUT" docs/figures

for section in $SECTIONS; do
  case $section in
    analyze)
      for tool in residuals trajectories ntk hessian landscape; do
        deqdiff analyze "$tool" --out "$OUT" --no-progress 2>&1 | tee "$OUT/$tool.log"
      done
      for f in residuals trajectories ntk ntk_linear_rate hessian landscape_contour landscape_surface landscape_1d; do
        cp "$OUT/$f.png" "docs/figures/analysis_$f.png"
      done
      ;;
    vdp)
      deqdiff pinn vdp --out "$OUT/pinn_vdp" --no-progress 2>&1 | tee "$OUT/pinn_vdp.log"
      for f in vdp_loss vdp_trajectory vdp_phase; do cp "$OUT/pinn_vdp/$f.png" "docs/figures/$f.png"; done
      ;;
    burgers)
      deqdiff pinn burgers --out "$OUT/pinn_burgers" --no-progress 2>&1 | tee "$OUT/pinn_burgers.log"
      for f in burgers_solution burgers_slices burgers_loss; do cp "$OUT/pinn_burgers/$f.png" "docs/figures/$f.png"; done
      ;;
    *)
      echo "make_gallery.sh: unknown section '$section' (expected analyze, vdp or burgers)" >&2
      exit 2
      ;;
  esac
done
