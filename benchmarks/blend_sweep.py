"""The global-local blend's settings scored on a knob_sweep bench without re-running the network:
run it once with the blend off, keep the unblended flows and certainties, then apply
``SomaNet.affine_blend`` under each setting and score the relative error as ``knob_sweep score``
does (the blend is the last step of ``SomaNet.forward``, so the shipped setting reproduces
``knob_sweep score`` exactly).

    # 1. the network without its blend on one bench (CPU: about 15 min for 148 samples)
    python benchmarks/blend_sweep.py dump .devcache/sweep/chips.npz.xz --out /tmp/bl/b1.pt
    # 2. blend settings, each a comma-separated knob=value list ("" is the shipped blend)
    python benchmarks/blend_sweep.py score /tmp/bl/b1.pt --try "" --try blend_local=101

Settings are ``SomaNet`` attributes read by :meth:`SomaNet.affine_blend` (``blend_k``,
``blend_iters``, ``blend_step``, ``blend_similarity``, ``blend_local``, ``blend_tau``);
``--set`` on ``dump`` sets network knobs for the run (as knob_sweep's ``--set``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import knob_sweep as K  # noqa: E402


BLEND = ("blend_k", "blend_iters", "blend_step", "blend_similarity", "blend_local", "blend_tau")


def _model(a):
    model = K.load_model(a.weights, a.checkpoint)
    base = K.snapshot(model)
    K.apply(model, K._parse_set(a.set), base)
    return model, base


def dump(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    model, _ = _model(a)
    model.blend = False
    bench = K.Bench(Path(a.chips), torch.device("cpu"), a.batch, a.limit)
    t0 = time.perf_counter()
    out = {}
    with torch.inference_mode():
        out["flow0"], out["cert0"] = bench.outputs(model, bench.opt, bench.opt_valid, bench.sar0, bench.sar0_valid)
        out["flow1"], out["cert1"] = bench.outputs(model, bench.opt[bench.idx], bench.opt_valid[bench.idx],
                                                   bench.sar, bench.sar_valid)
    out.update(idx=bench.idx, gt=bench.gt, opt_valid=bench.opt_valid, protocol=list(bench.protocol),
               half=list(bench.half), names=bench.names, settings=K._parse_set(a.set),
               seconds=time.perf_counter() - t0)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, a.out)
    print(f"{len(bench.names)} samples in {out['seconds']:.0f} s -> {a.out}")


def score(a) -> None:
    import numpy as np
    import torch

    from soma_cli import train

    torch.set_num_threads(a.threads)
    d = torch.load(a.dump, weights_only=False)
    model, base = _model(a)
    names = np.array(d["names"])
    protocol = np.array(d["protocol"])
    half = np.array(d["half"])
    shipped = {k: getattr(model, k) for k in BLEND}
    for t in a.try_ or [""]:
        settings = K._parse_set([x for x in t.split(",") if x])
        for k, v in shipped.items():
            setattr(model, k, v)
        K.apply(model, settings, base)
        with torch.inference_mode():
            f0 = model.affine_blend(d["flow0"], d["cert0"])
            f1 = torch.cat([model.affine_blend(d["flow1"][i:i + 16], d["cert1"][i:i + 16])
                            for i in range(0, len(d["flow1"]), 16)])
            err = train.relative_rmse(f0[d["idx"]], f1, d["gt"], d["opt_valid"][d["idx"]]).numpy()
        s = K.summarise(err, protocol, half)
        s["try"] = t
        print(json.dumps(s), flush=True)
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            np.savez(Path(a.out) / f"{t or 'shipped'}.npz", err=err, names=names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("dump", "score"):
        q = sub.add_parser(name)
        q.add_argument("chips" if name == "dump" else "dump")
        q.add_argument("--weights", default="")
        q.add_argument("--checkpoint", default="")
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--set", action="append", help="knob=value for the network")
        if name == "dump":
            q.add_argument("--out", required=True)
            q.add_argument("--batch", type=int, default=16)
            q.add_argument("--limit", type=int, default=0)
        else:
            q.add_argument("--try", dest="try_", action="append", help="blend knobs, comma-separated")
            q.add_argument("--out", default="", help="folder for each try's per-sample errors")
    a = ap.parse_args()
    {"dump": dump, "score": score}[a.cmd](a)


if __name__ == "__main__":
    main()
