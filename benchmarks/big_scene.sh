#!/usr/bin/env bash
# Time `soma register` on a 10980 x 10980 scene (a Sentinel-2 tile) with peak memory, and score it.
# Usage: benchmarks/big_scene.sh [WORKDIR] [extra soma register options...]
# Registers the deformed mosaic (timed: wall clock and peak RSS from /usr/bin/time -v) and the
# undeformed one (F0, for the relative score in which the source pairs' own residual cancels).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/soma_big}; shift || true
PY=.venv/bin/python
$PY benchmarks/big_scene.py make "$DIR"
for name in sar sar_undeformed; do
    out=flow; [ "$name" = sar ] || out=flow0
    /usr/bin/time -v .venv/bin/soma register "$DIR/$name.tif" "$DIR/opt.tif" -o "$DIR/aligned_$name.tif" \
        --flow-out "$DIR/$out.tif" --overwrite --quiet "$@" 2> "$DIR/time_$name.txt"
    echo "$name: $(grep -E 'Elapsed' "$DIR/time_$name.txt" | sed 's/.*: //') wall, peak RSS $(grep 'Maximum resident' "$DIR/time_$name.txt" | sed 's/.*: //') kB"
done
$PY benchmarks/big_scene.py score "$DIR/flow.tif" --f0 "$DIR/flow0.tif"
