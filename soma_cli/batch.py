"""``soma batch``: register many SAR/optical pairs in parallel on a Dask cluster, resumably.

The pairs (a manifest CSV or two globs) and when a pair counts as done: :mod:`soma_cli.batch_pairs`.

Outputs (``OUT_DIR``)
---------------------
``<id>/aligned.tif``, ``<id>/flow.tif``, ``<id>/tiepoints.gpkg``, ``<id>/qa/`` (from
:func:`soma_cli.pipeline.register`), ``<id>/done.json`` (written atomically LAST: the outputs and
their sizes plus the result), or ``<id>/failed.json`` (the error) and ``runlog.jsonl`` (one JSON
line per pair and run; created before any work starts, it marks the folder as a batch folder, so
a run interrupted at any point resumes).

Parallelism
-----------
A local cluster of ``workers`` processes that share the usable cores (each runs its network on
``cores // workers`` threads, at least one, unless the options set ``threads``), or an existing
cluster (``scheduler="tcp://host:port"``, one thread per worker unless set; the inputs and
``OUT_DIR`` must then be visible at the same paths on every worker). Each worker builds a
matcher once (a :class:`MatcherCache` worker plugin) and reuses it for all its pairs. Ctrl-C reaches the driver only (the local cluster's workers
block it), which stops the workers at once and closes the cluster with its logging silenced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from distributed.diagnostics.plugin import WorkerPlugin

from .errors import ConfigError, OutputError, RegistrationFailed, SomaError
from .atomic import read_json, to_jsonable, write_json
from .cpu import usable_cores
from .batch_pairs import DONE, FAILED, BatchPair, check_options, check_unique, output_sizes, pair_state

RUNLOG = "runlog.jsonl"
PLUGIN_NAME = "soma-matcher-cache"

_FAILED_BEFORE = "failed in an earlier run (--retry-failed reruns it)"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- worker side


class MatcherCache(WorkerPlugin):
    """Worker plugin holding the worker's matchers, built on first use and kept for later pairs."""

    name = PLUGIN_NAME

    def __init__(self) -> None:
        self.matchers: Dict[tuple, object] = {}

    def setup(self, worker) -> None:
        self.matchers = {}

    def teardown(self, worker) -> None:
        self.matchers.clear()

    def get(self, method: str, options: Dict[str, object]) -> Tuple[object, bool]:
        """(matcher, cached): ``cached`` is False when this call built it.  ``options``: those of
        :func:`~soma_cli.matchers.get_matcher`."""
        key = (method,) + tuple(sorted((k, str(v)) for k, v in options.items()))
        if key in self.matchers:
            return self.matchers[key], True
        from .matchers import get_matcher

        m = get_matcher(method, **options)
        self.matchers[key] = m
        return m, False


def _matcher_options(opts: Dict[str, object]) -> Dict[str, object]:
    """The :func:`~soma_cli.matchers.get_matcher` options among a pair's register options."""
    from .matchers import OPTIONS

    return {k: opts[k] for k in OPTIONS if opts.get(k) is not None}


def _worker_matcher(method: str, options: Dict[str, object]) -> Tuple[object, bool, str]:
    """The calling worker's cached matcher (built once per worker); outside a worker, a fresh one."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except ValueError:
        worker = None
    cache = worker.plugins.get(PLUGIN_NAME) if worker is not None else None
    if cache is None:
        cache = MatcherCache()
    m, cached = cache.get(method, options)
    return m, cached, (worker.address if worker is not None else "local")


def _flat_qa(qa: Optional[dict]) -> dict:
    qa = qa or {}
    return {
        "similarity_before": qa.get("similarity_before_median"),
        "similarity_after": qa.get("similarity_after_median"),
        "outlier_share": qa.get("outlier_share"),
    }


def _fail_record(job: dict, error: str, seconds: float) -> dict:
    return {"id": job["id"], "status": "failed", "error": error, "seconds": round(seconds, 3),
            "sar": job["sar"], "opt": job["opt"]}


def run_pair(job: dict) -> dict:
    """Register one pair into ``job['pair_dir']`` (runs on a worker). Never raises for a pair
    failure: returns a record with ``status`` ``ok`` or ``failed`` and the error message."""
    from .pipeline import RegisterOptions, register

    t0 = time.perf_counter()
    pair_dir = Path(job["pair_dir"])
    opts = dict(job["options"])
    try:
        pair_dir.mkdir(parents=True, exist_ok=True)
        for stale in (DONE, FAILED):
            (pair_dir / stale).unlink(missing_ok=True)
        _remove_temp_files(pair_dir)
        method = str(opts.get("method", "soma"))
        matcher, cached, worker = _worker_matcher(method, _matcher_options(opts))
        ropts = RegisterOptions(
            sar=Path(job["sar"]), opt=Path(job["opt"]), out=pair_dir / "aligned.tif",
            flow_out=pair_dir / "flow.tif", tiepoints_out=pair_dir / "tiepoints.gpkg", qa_out=pair_dir / "qa",
            overwrite=True, **opts,
        )
        result = register(ropts, matcher=matcher).to_dict()
        seconds = time.perf_counter() - t0
        rec = {
            "id": job["id"], "status": "ok", "error": None, "seconds": round(seconds, 3),
            "verdict": result.get("verdict"),
            "median_flow": result.get("median_flow"), "certainty_coverage": result.get("certainty_coverage"),
            "affine": result.get("affine"), "affine_rmse": result.get("affine_rmse"),
            **_flat_qa(result.get("qa")), "qa": result.get("qa"), "tiles": result.get("tiles"),
            "worker": worker, "matcher_cached": cached, "sar": job["sar"], "opt": job["opt"],
        }
        # LAST: the marker that makes the pair count as done on a rerun
        write_json(pair_dir / DONE, {"id": job["id"], "finished": _now(), "sar": job["sar"], "opt": job["opt"],
                                     "options": opts, "outputs": output_sizes(pair_dir), "result": result})
        return rec
    except RegistrationFailed as exc:  # strict: the verdict is failed, the outputs are written
        rec = {**_fail_record(job, str(exc), time.perf_counter() - t0), "verdict": exc.result.verdict}
    except SomaError as exc:
        rec = _fail_record(job, str(exc), time.perf_counter() - t0)
    except Exception as exc:  # a bug or an unexpected library error: keep the batch going
        rec = _fail_record(job, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
    _write_failed(pair_dir, rec)
    return rec


def _remove_temp_files(pair_dir: Path) -> None:
    """Delete hidden temporary files a killed run left in the pair's folders (``.NAME.*.tmp*``)."""
    for folder in (pair_dir, pair_dir / "qa"):
        if folder.is_dir():
            for p in folder.glob(".*.tmp*"):
                if p.is_file():
                    p.unlink(missing_ok=True)


def _write_failed(pair_dir: Path, rec: dict) -> None:
    try:
        pair_dir.mkdir(parents=True, exist_ok=True)
        write_json(pair_dir / FAILED, {**rec, "finished": _now()})
    except OSError:
        pass  # the run log still records the failure


# ----------------------------------------------------------------------------- driver


@dataclass
class BatchResult:
    out_dir: Path
    records: List[dict]
    seconds: float

    def counts(self) -> Dict[str, int]:
        c = {"ok": 0, "failed": 0, "skipped": 0}
        for r in self.records:
            c[r["status"]] = c.get(r["status"], 0) + 1
        return c

    def has_failures(self) -> bool:
        """True when a pair failed, in this run or in an earlier one."""
        return any(r["status"] == "failed" for r in self.records)

    def summary(self) -> str:
        """One line: the counts, the time, the rate of the pairs run, and how to rerun old failures."""
        c = self.counts()
        ran = sum(1 for r in self.records if r["status"] != "skipped" and r.get("reason") != _FAILED_BEFORE)
        before = sum(1 for r in self.records if r.get("reason") == _FAILED_BEFORE)
        rate = f", {60 * ran / self.seconds:.2f} pairs/min" if ran and self.seconds > 0 else ""
        return (f"{c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped in {self.seconds:.1f} s{rate}"
                + (f"; {before} {_FAILED_BEFORE}" if before else ""))


def _append_log(path: Path, rec: dict) -> None:
    line = json.dumps(to_jsonable(rec), allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def _claim_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir`` and its run log before any work, so that it is a batch folder from then on."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and not overwrite and not (out_dir / RUNLOG).is_file() and any(out_dir.iterdir()):
        raise OutputError(f"{out_dir}: not empty and not a soma batch folder (no {RUNLOG}); use --overwrite")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RUNLOG).touch()
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create ({exc.strerror})") from None


def run_batch(
    pairs: Sequence[BatchPair],
    out_dir: Path,
    options: Optional[dict] = None,
    workers: Optional[int] = None,
    scheduler: Optional[str] = None,
    retry_failed: bool = False,
    overwrite: bool = False,
    progress: Optional[Callable[[int, int, dict], None]] = None,
    client=None,
    processes: bool = True,
) -> BatchResult:
    """Run ``pairs`` into ``out_dir``; see the module docstring for resuming and parallelism.

    ``options``: batch-wide :class:`~soma_cli.pipeline.RegisterOptions` fields (``method``,
    ``mode``, ``device``, ``threads``, ...), overridden per pair by the manifest. ``client``: an
    existing ``distributed.Client`` (tests); else ``scheduler`` or a new local cluster of
    ``workers`` processes (default: one per CPU core; threads when ``processes=False``) sharing
    the cores (module doc). ``progress(done, total, record)`` is called after each pair (skipped
    ones included).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    check_unique(pairs, "batch")
    workers = usable_cores() if workers is None else workers
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    base = check_options(dict(options or {}), "batch options")
    # a local cluster's workers share this machine's cores; an existing cluster's are unknown here
    local = scheduler is None and client is None
    base.setdefault("threads", max(1, usable_cores() // workers) if local else 1)
    base.setdefault("io_threads", 0)  # the workers already keep every core busy
    _claim_out_dir(out_dir, overwrite)
    log = out_dir / RUNLOG
    run_id = _now()
    total = len(pairs)
    records: List[dict] = []

    def finish(rec: dict) -> None:
        rec = {"run": run_id, "time": _now(), **rec}
        _append_log(log, rec)
        records.append(rec)
        if progress is not None:
            progress(len(records), total, rec)

    jobs = []
    for p in pairs:
        state = "todo" if overwrite else pair_state(out_dir / p.id)
        if state == "done" or (state == "failed" and not retry_failed):
            prev = read_json(out_dir / p.id / (DONE if state == "done" else FAILED))
            prev = prev if isinstance(prev, dict) else {}
            res = prev.get("result") or {}
            finish({"id": p.id, "status": "skipped" if state == "done" else "failed",
                    "error": None if state == "done" else prev.get("error"),
                    "reason": "done" if state == "done" else _FAILED_BEFORE,
                    "seconds": 0.0, "verdict": res.get("verdict", prev.get("verdict")),
                    "median_flow": res.get("median_flow"),
                    "certainty_coverage": res.get("certainty_coverage"), "affine": res.get("affine"),
                    "affine_rmse": res.get("affine_rmse"), **_flat_qa(res.get("qa"))})
            continue
        jobs.append({"id": p.id, "sar": str(p.sar), "opt": str(p.opt), "pair_dir": str(out_dir / p.id),
                     "options": {**base, **p.options}})

    if jobs:
        _run_jobs(jobs, finish, workers, scheduler, client, processes)
    return BatchResult(out_dir, records, time.perf_counter() - t0)


def _run_jobs(jobs, finish, workers, scheduler, client, processes) -> None:
    from distributed import Client, as_completed

    cluster = own_client = None
    try:
        if client is None:
            if scheduler:
                try:
                    own_client = Client(scheduler, timeout="20s")
                except (OSError, TimeoutError) as exc:
                    raise ConfigError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
            else:
                cluster = _local_cluster(min(workers, len(jobs)), processes)
                own_client = Client(cluster)
            client = own_client
        client.register_plugin(MatcherCache(), name=PLUGIN_NAME)
        futures = {}
        for job in jobs:
            fut = client.submit(run_pair, job, key=f"soma-pair-{job['id']}-{time.time_ns()}", pure=False)
            futures[fut] = job
        for fut in as_completed(list(futures)):
            job = futures[fut]
            try:
                rec = fut.result()
            except Exception as exc:  # the worker died (memory, kill) or the task could not run
                rec = _fail_record(job, f"{type(exc).__name__}: {exc}", math.nan)
                _write_failed(Path(job["pair_dir"]), rec)
            finish(rec)
    except BaseException:  # Ctrl-C, or a failing driver: stop now, without the shutdown chatter
        with _silenced_logging():
            _close(own_client, cluster, now=True)
        raise
    _close(own_client, cluster)


def _local_cluster(workers: int, processes: bool):
    """A local cluster of ``workers`` one-thread workers whose processes never see Ctrl-C (a
    terminal sends it to the whole process group; a worker would print its own tracebacks).

    SIGINT is blocked in this thread while the cluster starts: the threads it creates, and the
    worker processes they spawn (now or on a restart), inherit the blocked signal, and a Ctrl-C
    meanwhile is delivered once the cluster is up and can be closed. multiprocessing's resource
    tracker is started before: starting it unblocks SIGINT in the thread that does."""
    from multiprocessing import resource_tracker

    from distributed import LocalCluster

    def start():
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes, dashboard_address=None,
                            # no dashboard; its HTTP health server on a free port
                            scheduler_kwargs={"dashboard_address": ":0"}, silence_logs=logging.ERROR)

    if not processes or not hasattr(signal, "pthread_sigmask"):  # threads, or Windows
        return start()
    resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _close(client, cluster, now: bool = False) -> None:
    """Close our client and local cluster; ``now``: stop workers that are mid-pair within a second
    (a graceful close waits seconds for their tasks)."""
    if client is not None:
        client.close()
    if cluster is not None:
        if now:
            cluster.sync(lambda: asyncio.gather(*(w.close(timeout=0.5) for w in cluster.workers.values())))
        cluster.close()


@contextmanager
def _silenced_logging() -> Iterator[None]:
    """No log records while a cluster with work in flight shuts down (cancelled tasks, closed
    connections: errors and tracebacks from Dask, tornado and asyncio that mean nothing here)."""
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(before)
