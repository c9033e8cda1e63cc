#!/usr/bin/env bash
# Throughput of `soma batch` on the shared s1s2_calif data: N pairs (default 16) with 1 and with 2
# local worker processes (one thread each); prints pairs per minute.
#
#   benchmarks/batch_bench.sh                 # 16 pairs, --method soma (the default), workers 1 and 2
#   METHOD=gradient benchmarks/batch_bench.sh  # the training-free matcher
#   N=4 METHOD=identity WORKERS="1 2" benchmarks/batch_bench.sh
#
# Env: DATA (default ../shared/data/s1s2_calif from the repo root), N, METHOD, WORKERS, SOMA
# (default .venv/bin/soma), KEEP=1 keeps the output folders (default: a temp dir, removed).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/s1s2_calif}
N=${N:-16}
METHOD=${METHOD:-soma}
WORKERS=${WORKERS:-"1 2"}
SOMA=${SOMA:-.venv/bin/soma}
[ -f "$DATA/pairs.csv" ] || { echo "no dataset at $DATA" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/soma_batch_bench.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
DATA_ABS=$(cd "$DATA" && pwd)
# manifest: the first N pairs of pairs.csv (id, sar, opt), absolute paths
{
  echo "id,sar,opt"
  tail -n +2 "$DATA_ABS/pairs.csv" | head -n "$N" | while IFS=, read -r id sar opt _; do
    echo "$id,$DATA_ABS/$sar,$DATA_ABS/$opt"
  done
} > "$WORK/manifest.csv"
echo "pairs: $(($(wc -l < "$WORK/manifest.csv") - 1)), method: $METHOD, cores: $(nproc), $(date -u +%FT%TZ)"
for w in $WORKERS; do
  out="$WORK/out_w$w"
  t0=$(date +%s.%N)
  "$SOMA" batch "$WORK/manifest.csv" --out-dir "$out" --method "$METHOD" --workers "$w" --no-report --quiet \
    || echo "  (some pairs failed, see $out/runlog.jsonl)"
  t1=$(date +%s.%N)
  ok=$(grep -c '"status": "ok"' "$out/runlog.jsonl" 2>/dev/null || true); ok=${ok:-0}
  python3 - "$w" "$t0" "$t1" "$ok" <<'PY'
import sys
w, t0, t1, ok = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
s = t1 - t0
print(f"workers={w}: {ok} ok pairs in {s:.1f} s wall -> {60 * ok / s:.2f} pairs/min (incl. cluster start-up)")
PY
done
[ "${KEEP:-0}" = 1 ] && echo "outputs kept in $WORK"
exit 0
