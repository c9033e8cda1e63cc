#!/usr/bin/env bash
# One prepared GPU training run of the SOMA network from the prepared cache (fit phase only).
#
#   bash benchmarks/train_gpu.sh OUT_DIR [MINUTES] [DEVICE] [extra key=value FitConfig overrides...]
#
# Needs: torch, numpy, scipy; no rasterio, no pip install (PYTHONPATH=.), the cache built on the
# dev machine by the prepare phase (carried as an ignored folder) and, when the `affine` package is
# absent, its copy in .devcache/pylib.  Build the cleaned cache of the model card's training data
# with `soma train ../shared/data/s1s2_calif --out runs/clean --cache .devcache/train_cache.npz
# --clean gradient --prepare-only` (or point SOMA_CACHE at runs/clean/cache.npz).  The learning rate
# and losses are those of the CPU runs (lr 3e-4, consistency 1, absolute 0.3); `val_cmr1` printed
# below is the relative (self-consistency) CMR@1px that selects best.pt.  Checkpoints go to OUT_DIR
# every minute (ckpt.pt resumable, model.pt / best.pt weights only), so a timeout still leaves one.
# The two H100 fine-tunes of the model card's "Tried and rejected" (logs in weights/logs/):
#   SOMA_CACHE=runs/clean/cache.npz bash benchmarks/train_gpu.sh OUT 6.5 cuda init=runs/v2c/best.pt lr=1e-4 batch_size=8 val_every=100
#   SOMA_CACHE=runs/clean/cache.npz bash benchmarks/train_gpu.sh OUT2 4.2 cuda init=OUT/model.pt lr=5e-5 batch_size=8 val_every=80 warmup=0.01
# (about 1.2 s a step of 8 x 512 px with both passes: the network is launch-bound on a GPU).
set -u
OUT_DIR="${1:?usage: train_gpu.sh OUT_DIR [MINUTES] [DEVICE] [key=value ...]}"
MINUTES="${2:-8}"
DEVICE="${3:-cuda}"
shift $(( $# < 3 ? $# : 3 ))
HERE="$(cd "$(dirname "$0")/.." && pwd)"
cd "$HERE" || exit 1
export PYTHONPATH="$HERE:$HERE/.devcache/pylib${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
CACHE="${SOMA_CACHE:-$HERE/.devcache/train_cache.npz}"
mkdir -p "$OUT_DIR"
echo "== host: $(hostname)  python: $($PY --version 2>&1)  cache: $CACHE ($(du -h "$CACHE" 2>/dev/null | cut -f1))"
$PY - "$CACHE" "$OUT_DIR" "$MINUTES" "$DEVICE" "$@" <<'PYEOF'
import json, os, sys, time
import torch
from soma_cli import train

cache, out_dir, minutes, device = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
gpu = device != "cpu" and torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", flush=True)
ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
cfg = train.FitConfig(
    steps=100000 if gpu else 40,
    time_budget_min=minutes,
    batch_size=12 if gpu else 2,
    crop=512 if gpu else 128,
    lr=3e-4,
    seed=0,
    threads=0 if gpu else 1,
    device=device,
    workers=max(min(ncpu - 2, 14), 0) if gpu else 0,
    val_chip=512 if gpu else 128,
    val_pairs=8 if gpu else 2,
    val_every=300 if gpu else 20,
    ckpt_every_s=60.0,
)
for kv in sys.argv[5:]:  # key=value overrides
    k, v = kv.split("=", 1)
    cur = getattr(cfg, k)
    setattr(cfg, k, type(cur)(v))
if cfg.workers > 0:  # each in-flight batch sits in /dev/shm: keep the loader within its size
    try:
        st = os.statvfs("/dev/shm")
        shm = st.f_bavail * st.f_frsize
    except OSError:
        shm = 0
    per_batch = cfg.batch_size * cfg.crop * cfg.crop * 6 * 4
    fit_workers = int(0.5 * shm // (2 * per_batch))
    if fit_workers < cfg.workers:
        print(f"/dev/shm has {shm / 1e9:.2f} GB free: workers {cfg.workers} -> {max(fit_workers, 0)}", flush=True)
        cfg.workers = max(fit_workers, 0)
print("config", json.dumps(cfg.__dict__), flush=True)
t0 = time.time()
last = [0.0]

def progress(done, total, info):
    if time.time() - last[0] >= 15 or done == total:
        last[0] = time.time()
        print(f"step {done} loss {info.get('loss', float('nan')):.3f} lr {info['lr']:.2e} "
              f"val_cmr1 {info.get('val_cmr1', float('nan')):.3f} "
              f"val_median_rmse {info.get('val_median_rmse', float('nan')):.3f} t {time.time() - t0:.0f}s",
              flush=True)

try:
    res = train.fit(cache, out_dir, cfg, progress=progress)
except Exception as exc:  # e.g. a data-loader worker failure: resume from the last checkpoint in-process
    import traceback
    traceback.print_exc()
    left = minutes - (time.time() - t0) / 60.0 - 0.5
    print(f"fit failed ({type(exc).__name__}); resuming without workers for {left:.1f} min", flush=True)
    cfg.workers = 0
    cfg.time_budget_min = max(left, 0.05)
    res = train.fit(cache, out_dir, cfg, progress=progress)
print("RESULT", json.dumps(res), flush=True)
for name in ("model.pt", "best.pt", "ckpt.pt"):
    p = os.path.join(out_dir, name)
    if os.path.exists(p):
        print(f"{name}: {os.path.getsize(p) / 1e6:.1f} MB", flush=True)
PYEOF
rc=$?
# keep only weights-only files small enough to come back: the resumable ckpt.pt holds optimizer state too
ls -la "$OUT_DIR"
exit $rc
