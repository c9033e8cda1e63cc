#!/usr/bin/env bash
# Times `soma register` on the shipped example with --threads 1 and with the default thread count,
# each on an idle machine and beside one busy competitor process (a Python loop on one core), and
# prints the ratios. Usage: bash benchmarks/threads_under_load.sh [soma executable] [repeats]
set -euo pipefail
cd "$(dirname "$0")/.."
SOMA=${1:-.venv/bin/soma}
REPEATS=${2:-3}
out=$(mktemp -d)
trap 'kill "${busy:-}" 2>/dev/null || true; rm -rf "$out"' EXIT
best() {  # best wall time of $REPEATS runs, in seconds
  local b=""
  for _ in $(seq "$REPEATS"); do
    local t0 t1
    t0=$(date +%s.%N)
    "$SOMA" register examples/s1_vh.tif examples/s2_rgb.tif -o "$out/a.tif" --overwrite -q "$@"
    t1=$(date +%s.%N)
    b=$(python3 -c "import sys; t=$t1-$t0; b='$b'; print(min(t, float(b)) if b else t)")
  done
  printf '%.2f' "$b"
}
"$SOMA" register examples/s1_vh.tif examples/s2_rgb.tif -o "$out/a.tif" --overwrite -q  # warm the file cache
idle1=$(best --threads 1); idled=$(best)
python3 -c "while True: pass" & busy=$!
sleep 1
load1=$(best --threads 1); loadd=$(best)
kill "$busy"; busy=""
echo "cores: $(nproc)  load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-28s %8s %8s %8s\n' "" "1 thread" "default" "ratio"
printf '%-28s %8s %8s %8s\n' "idle" "$idle1" "$idled" "$(python3 -c "print(f'{$idled/$idle1:.2f}')")"
printf '%-28s %8s %8s %8s\n' "beside one busy process" "$load1" "$loadd" "$(python3 -c "print(f'{$loadd/$load1:.2f}')")"
