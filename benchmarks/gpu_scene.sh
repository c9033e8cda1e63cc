#!/usr/bin/env bash
# `soma register` end to end on a GPU, on the 10980 x 10980 scene of benchmarks/big_scene.py:
# wall clock and peak host memory (/usr/bin/time -v), GPU utilisation and peak GPU memory
# (nvidia-smi, sampled every 0.2 s), the relative score, then the per-stage breakdown
# (benchmarks/profile_register.py, reading and warping in the calling thread).
#
#   bash benchmarks/gpu_scene.sh [WORKDIR] [extra soma register options]
#   SIZE=2048 DEVICE=cpu bash benchmarks/gpu_scene.sh /tmp/gs    # the same steps on the CPU, small
#
# Environment: SIZE (scene side, default 10980), DEVICE (default cuda), PY (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/soma_gpu}; shift || true
SIZE=${SIZE:-10980}
DEVICE=${DEVICE:-cuda}
PY=${PY:-.venv/bin/python}
echo "== $(hostname): $(nproc) cores, $($PY -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "no cuda")')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY benchmarks/big_scene.py make "$DIR" --size "$SIZE"
SMI_PID=
if command -v nvidia-smi >/dev/null; then
    : > "$DIR/smi.csv"  # appended to (O_APPEND), so that emptying it between runs restarts it
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 >> "$DIR/smi.csv" &
    SMI_PID=$!
fi
for name in sar sar_undeformed; do
    out=flow; [ "$name" = sar ] || out=flow0
    /usr/bin/time -v $PY -m soma_cli register "$DIR/$name.tif" "$DIR/opt.tif" -o "$DIR/aligned_$name.tif" \
        --flow-out "$DIR/$out.tif" --overwrite --quiet --device "$DEVICE" "$@" 2> "$DIR/time_$name.txt"
    echo "$name: $(grep -E 'Elapsed' "$DIR/time_$name.txt" | sed 's/.*: //') wall, peak RSS $(grep 'Maximum resident' "$DIR/time_$name.txt" | sed 's/.*: //') kB"
    if [ -n "$SMI_PID" ]; then  # the samples of this run only
        awk -F', ' '{u+=$1; n++; if ($2>m) m=$2} END {if (n) printf "  GPU: mean utilisation %.0f %%, peak memory %d MiB (%d samples)\n", u/n, m, n}' "$DIR/smi.csv"
        : > "$DIR/smi.csv"
    fi
done
[ -n "$SMI_PID" ] && kill "$SMI_PID"
$PY benchmarks/big_scene.py score "$DIR/flow.tif" --f0 "$DIR/flow0.tif"
echo "== stages (deformed scene, one more run under cProfile)"
$PY benchmarks/profile_register.py "$DIR/sar.tif" "$DIR/opt.tif" --device "$DEVICE"
