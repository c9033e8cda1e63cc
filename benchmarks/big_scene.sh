#!/usr/bin/env bash
# Time `soma register` on a 10980 x 10980 scene (a Sentinel-2 tile) with peak memory.
# Usage: benchmarks/big_scene.sh [WORKDIR] [extra soma register options...]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/soma_big}; shift || true
PY=.venv/bin/python
[ -f "$DIR/sar.tif" ] || $PY benchmarks/big_scene.py make "$DIR"
/usr/bin/time -v .venv/bin/soma register "$DIR/sar.tif" "$DIR/opt.tif" -o "$DIR/aligned.tif" \
    --flow-out "$DIR/flow.tif" --overwrite "$@" 2> "$DIR/time.txt" | tee "$DIR/summary.txt"
grep -E "Elapsed|Maximum resident" "$DIR/time.txt"
$PY benchmarks/big_scene.py score "$DIR/flow.tif"
