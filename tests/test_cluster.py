"""``soma batch --scheduler`` on a real Dask cluster: a ``dask scheduler`` and two ``dask worker``
processes on the loopback interface, then the same with a worker killed mid-pair."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import pyogrio
import rasterio

from soma_cli import batch, batch_pairs
from test_batch import make_pair

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = (REPO / "examples" / "s1_vh.tif", REPO / "examples" / "s2_rgb.tif")


def _env():
    path = os.pathsep.join([str(REPO), *os.environ.get("PYTHONPATH", "").split(os.pathsep)])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait(timeout=10)


@pytest.fixture()
def cluster(tmp_path):
    """(scheduler address, worker processes): a scheduler and two one-thread workers, loopback only."""
    from distributed import Client

    info = tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster.log", "w")
    mod = [sys.executable, "-m"]
    procs = [subprocess.Popen([*mod, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(info)],
                              stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)]
    try:
        t_end = time.monotonic() + 60
        while not info.is_file() or not info.read_text().strip():
            assert procs[0].poll() is None and time.monotonic() < t_end, (tmp_path / "cluster.log").read_text()
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        for i in (1, 2):
            procs.append(subprocess.Popen(
                [*mod, "distributed.cli.dask_worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                 "--no-nanny", "--no-dashboard", "--name", f"w{i}"],
                stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path))
        with Client(address, timeout="30s") as c:
            c.wait_for_workers(2, timeout=60)
        yield address, procs[1:]
    finally:
        _stop(procs)
        log.close()


def _manifest(path: Path, pairs) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "sar", "opt"])
        w.writeheader()
        w.writerows({"id": pid, "sar": s, "opt": o} for pid, (s, o) in pairs)
    return path


def _soma_batch(*args):
    return subprocess.Popen([sys.executable, "-m", "soma_cli", "batch", *map(str, args), "--method", "gradient",
                             "--no-report", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())


def _finish(proc, timeout=120):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def _check_outcomes(out: Path, ids):
    """Every pair is done with complete, readable outputs, or failed and retryable."""
    states = {pid: batch_pairs.pair_state(out / pid) for pid in ids}
    assert set(states.values()) <= {"done", "failed"}, states
    for pid, state in states.items():
        if state == "done":
            for name in batch_pairs.OUTPUTS:
                if name.endswith(".tif"):
                    with rasterio.open(out / pid / name) as ds:
                        assert np.isfinite(ds.read(1).astype(float)).any()
                else:
                    assert pyogrio.read_info(out / pid / name)["features"] > 0
    latest = {}  # per pair, the last record of a run that ran it
    for line in (out / batch.RUNLOG).read_text().splitlines():
        rec = json.loads(line)
        if rec["status"] != "skipped":
            latest[rec["id"]] = rec
    assert set(latest) == set(ids)
    for pid, rec in latest.items():  # nothing reported ok that is not complete
        assert (rec["status"] == "ok") == (states[pid] == "done"), (pid, rec, states[pid])
    return states


def test_batch_on_a_dask_cluster(tmp_path, cluster):
    address, _ = cluster
    pairs = [(f"c{i}", make_pair(tmp_path / "in", f"c{i}", seed=20 + i)) for i in range(3)]
    out = tmp_path / "out"
    rc, err = _finish(_soma_batch(_manifest(tmp_path / "m.csv", pairs), "-o", out, "--scheduler", address))
    assert rc == 0, err
    states = _check_outcomes(out, [pid for pid, _ in pairs])
    assert set(states.values()) == {"done"}
    log = [json.loads(line) for line in (out / batch.RUNLOG).read_text().splitlines()]
    assert {r["worker"] for r in log} <= _worker_addresses(address)


def _worker_addresses(address):
    from distributed import Client

    with Client(address, timeout="30s") as c:
        return set(c.scheduler_info()["workers"])


def test_worker_killed_mid_pair(tmp_path, cluster):
    address, workers = cluster
    ids = [f"k{i}" for i in range(4)]
    out = tmp_path / "out"
    manifest = _manifest(tmp_path / "m.csv", [(pid, EXAMPLE) for pid in ids])
    proc = _soma_batch(manifest, "-o", out, "--scheduler", address)
    try:
        victim, t_end = None, time.monotonic() + 90
        while victim is None:  # the worker writing a pair's temporary output right now
            assert proc.poll() is None and time.monotonic() < t_end, "no pair was seen in flight"
            for w in workers:
                try:
                    files = [f.path for f in psutil.Process(w.pid).open_files()]
                except psutil.Error:
                    continue
                if any(Path(f).parent.parent == out and ".tmp" in Path(f).name for f in files):
                    victim = w
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        rc, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err, err
    states = _check_outcomes(out, ids)
    assert rc == (1 if "failed" in states.values() else 0), err
    # failed pairs are retryable; done ones are skipped
    rc2, err2 = _finish(_soma_batch(manifest, "-o", out, "--scheduler", address, "--retry-failed"))
    assert rc2 == 0, err2
    assert set(_check_outcomes(out, ids).values()) == {"done"}
