"""Time the SOMA network's forward pass on the available device (tiles of 512 px).

    PYTHONPATH=. python benchmarks/gpu_infer_speed.py CHECKPOINT [--device cuda] [--batch 8]
"""

import argparse
import time

import torch

from soma_cli.model.checkpoint import load_model_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    dev = torch.device(a.device)
    model = load_model_checkpoint(a.checkpoint).to(dev).eval()
    x = torch.randn(a.batch, 1, a.size, a.size, device=dev)
    with torch.inference_mode():
        for _ in range(3):
            model(x, x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(a.reps):
            model(x, x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / a.reps
    mpx = a.batch * a.size * a.size / 1e6
    print(f"SPEED device={dev} batch={a.batch} size={a.size}: {dt * 1000:.1f} ms per batch, "
          f"{dt / mpx:.4f} s per megapixel")


if __name__ == "__main__":
    main()
