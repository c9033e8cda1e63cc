"""``soma batch``: manifests, glob pairing, parallel runs on an in-process Dask cluster, resuming,
failure isolation, kill safety, and the batch report."""

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
from matplotlib.image import imread
from rasterio.transform import from_origin
from scipy import ndimage

from soma_cli import batch, batch_pairs, report
from soma_cli.errors import ConfigError, InputError, OutputError, SomaWarning

SIZE = 192
SHIFT = (2.0, -1.0)  # (dx, dy): optical pixel (c, r) shows up in the SAR at (c + dx, r + dy)


def make_pair(folder: Path, name: str, seed: int, shift=SHIFT, size=SIZE):
    """Synthetic georeferenced pair: smooth texture (optical RGB) and the same texture shifted with
    multiplicative speckle (SAR), both uint8, EPSG:3395."""
    rng = np.random.default_rng(seed)
    pad = 16
    big = ndimage.gaussian_filter(rng.normal(size=(size + 2 * pad, size + 2 * pad)), 2.5)
    big = (big - big.min()) / (big.max() - big.min())
    opt = big[pad:pad + size, pad:pad + size]
    # sar(q + shift) = opt(q): optical content shows up shifted by (dx, dy) in the SAR
    sar = ndimage.shift(big, (shift[1], shift[0]), order=1)[pad:pad + size, pad:pad + size]
    sar = np.clip(sar * rng.gamma(8, 1 / 8, size=sar.shape), 0, 1)
    prof = dict(driver="GTiff", width=size, height=size, crs="EPSG:3395",
                transform=from_origin(500000, 4000000, 10, 10), dtype="uint8")
    folder.mkdir(parents=True, exist_ok=True)
    o, s = folder / f"{name}_opt.tif", folder / f"{name}_sar.tif"
    for p in (o, s):
        p.unlink(missing_ok=True)  # GDAL cannot replace a corrupt file itself
    with rasterio.open(o, "w", count=3, **prof) as dst:
        dst.write(np.stack([(opt * 250).astype(np.uint8)] * 3))
    with rasterio.open(s, "w", count=1, **prof) as dst:
        dst.write((sar * 250).astype(np.uint8)[None])
    return s, o


def write_manifest(path: Path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": ":0"}) as cl:
        with Client(cl) as c:
            yield c


@pytest.fixture()
def inputs(tmp_path):
    """Three pairs (relative paths in the manifest), the third SAR corrupt."""
    data = tmp_path / "in"
    rows = []
    for i, name in enumerate(("p1", "p2", "p3")):
        s, o = make_pair(data, name, seed=i)
        rows.append({"id": name, "sar": f"in/{s.name}", "opt": f"in/{o.name}"})
    (data / "p3_sar.tif").write_bytes(b"II*\x00 this is not a GeoTIFF")
    return write_manifest(tmp_path / "manifest.csv", rows)


def _run(manifest, out, client, options=None, **kw):
    seen = []
    res = batch.run_batch(batch_pairs.read_manifest(manifest), out, {"method": "gradient", **(options or {})},
                          client=client,
                          progress=lambda d, t, rec: seen.append((d, t, rec["id"], rec["status"])), **kw)
    assert [s[0] for s in seen] == list(range(1, len(seen) + 1)) and all(s[1] == len(seen) for s in seen)
    return res, {r["id"]: r for r in res.records}


def _runlog(out):
    return [json.loads(line) for line in (out / batch.RUNLOG).read_text().splitlines()]


def test_batch_runs_resumes_isolates_failures_and_reports(tmp_path, inputs, client):
    out = tmp_path / "out"
    res, recs = _run(inputs, out, client, {"check": True})
    assert res.counts() == {"ok": 2, "failed": 1, "skipped": 0}
    for pid in ("p1", "p2"):
        r = recs[pid]
        assert r["status"] == "ok" and r["error"] is None
        for name in ("aligned.tif", "flow.tif", "tiepoints.gpkg", "done.json", "qa/summary.json", "qa/tiles.csv"):
            assert (out / pid / name).is_file(), name
        assert batch_pairs.is_done(out / pid)
        # the synthetic shift is recovered (the gradient matcher is sub-pixel on this texture)
        assert r["qa"]["median_dx"] == pytest.approx(SHIFT[0], abs=0.5)
        assert r["qa"]["median_dy"] == pytest.approx(SHIFT[1], abs=0.5)
        c = SIZE / 2  # the global affine, evaluated at the centre, is the shift too
        a = np.array(r["affine"])
        assert a @ [c, c, 1] - c == pytest.approx(SHIFT, abs=0.5)
        assert r["median_flow"] == pytest.approx(np.hypot(*SHIFT), abs=0.6)
        assert r["similarity_after"] > r["similarity_before"]
        with rasterio.open(out / pid / "flow.tif") as f:
            assert f.count == 4 and f.crs is not None and (f.width, f.height) == (SIZE, SIZE)
        for png in ("checkerboard_before.png", "checkerboard_after.png", "flow.png", "certainty.png",
                    "estimated_error.png", "flow_hist.png"):
            assert float(imread(out / pid / "qa" / png)[..., :3].var()) > 1e-4, png
    bad = recs["p3"]
    assert bad["status"] == "failed" and "p3_sar.tif" in bad["error"]
    assert (out / "p3" / batch_pairs.FAILED).is_file() and not (out / "p3" / batch_pairs.DONE).exists()
    # one matcher per worker, not per pair (2 workers, 2 pairs that reached the matcher)
    assert sum(not r["matcher_cached"] for r in recs.values() if r["status"] == "ok") <= 2
    log = _runlog(out)
    assert sorted(r["id"] for r in log) == ["p1", "p2", "p3"]
    assert {r["status"] for r in log} == {"ok", "failed"} and all("seconds" in r for r in log)

    # rerun: done pairs are skipped, the failed one is not run again but still counts as failed;
    # nothing is rewritten
    mtime = (out / "p1" / "aligned.tif").stat().st_mtime_ns
    res2, recs2 = _run(inputs, out, client)
    assert res2.counts() == {"ok": 0, "failed": 1, "skipped": 2} and res2.has_failures()
    assert recs2["p1"]["median_flow"] == recs["p1"]["median_flow"]  # carried over from done.json
    assert recs2["p3"]["status"] == "failed" and recs2["p3"]["error"] == bad["error"]
    assert "--retry-failed" in recs2["p3"]["reason"] and "--retry-failed" in res2.summary()
    assert res2.summary().startswith("0 ok, 1 failed, 2 skipped")
    assert (out / "p1" / "aligned.tif").stat().st_mtime_ns == mtime
    assert len(_runlog(out)) == 6

    # --retry-failed after fixing the input reruns only the failed pair
    make_pair(tmp_path / "in", "p3", seed=2)
    res3, recs3 = _run(inputs, out, client, retry_failed=True)
    assert recs3["p3"]["status"] == "ok" and recs3["p1"]["status"] == "skipped"
    assert batch_pairs.is_done(out / "p3") and not (out / "p3" / batch_pairs.FAILED).exists()

    page = report.render(out)
    text = page.read_text()
    for pid in ("p1", "p2", "p3"):
        assert f'id="pair-{pid}"' in text
    _check_links(page)


def test_killed_run_is_redone(tmp_path, client):
    data = tmp_path / "in"
    rows = []
    for i, name in enumerate(("k1", "k2", "k3")):
        s, o = make_pair(data, name, seed=10 + i)
        rows.append({"id": name, "sar": str(s), "opt": str(o)})  # absolute paths work too
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    res, recs = _run(manifest, out, client)
    assert res.counts()["ok"] == 3
    # the matcher is built once per worker: 3 pairs on 2 workers -> one load per worker used
    workers = {r["worker"] for r in recs.values()}
    assert sum(not r["matcher_cached"] for r in recs.values()) == len(workers) < 3
    # k1: killed before done.json was written (outputs there, a stray temp file from the writer)
    (out / "k1" / batch_pairs.DONE).unlink()
    stray = out / "k1" / ".aligned.tif.abc123.tmp.tif"
    stray.write_bytes(b"partial")
    # k2: an output changed after done.json (e.g. truncated by a copy): the size check catches it
    with open(out / "k2" / "flow.tif", "r+b") as fh:
        fh.truncate(100)
    # k3: done.json itself cut short
    (out / "k3" / batch_pairs.DONE).write_text('{"id": "k3", "outp')
    assert [batch_pairs.pair_state(out / k) for k in ("k1", "k2", "k3")] == ["todo"] * 3
    res2, recs2 = _run(manifest, out, client)
    assert {k: r["status"] for k, r in recs2.items()} == {"k1": "ok", "k2": "ok", "k3": "ok"}
    assert not stray.exists()
    assert all(batch_pairs.is_done(out / k) for k in ("k1", "k2", "k3"))
    res3, _ = _run(manifest, out, client)
    assert res3.counts()["skipped"] == 3


def test_is_done_requires_every_listed_output(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    assert batch_pairs.pair_state(d) == "todo"
    (d / "aligned.tif").write_bytes(b"12345")
    (d / "flow.tif").write_bytes(b"123")
    (d / "tiepoints.gpkg").write_bytes(b"1")
    (d / batch_pairs.DONE).write_text(json.dumps({"outputs": {"aligned.tif": 5, "flow.tif": 3, "tiepoints.gpkg": 1}}))
    assert batch_pairs.pair_state(d) == "done"
    (d / batch_pairs.DONE).write_text(json.dumps({"outputs": {"aligned.tif": 5, "tiepoints.gpkg": 1}}))  # no flow.tif
    assert batch_pairs.pair_state(d) == "todo"
    (d / batch_pairs.DONE).write_text(json.dumps({"outputs": {"aligned.tif": 5, "flow.tif": 4, "tiepoints.gpkg": 1}}))
    assert batch_pairs.pair_state(d) == "todo"
    (d / batch_pairs.FAILED).write_text("{}")
    assert batch_pairs.pair_state(d) == "failed"


def test_read_manifest_options_and_errors(tmp_path):
    m = write_manifest(tmp_path / "m.csv", [
        {"sar": "s/a.tif", "opt": "o/a.tif", "method": "identity", "bands": "4 3 2", "mode": "", "note": "x"},
        {"sar": "/abs/b.tif", "opt": "o/b.tif", "id": "b 2", "reference": "sar", "tile_size": "256",
         "bands": "1,2"},
    ])
    a, b = batch_pairs.read_manifest(m)
    assert a.id == "a" and a.sar == tmp_path / "s/a.tif" and a.options == {"method": "identity", "bands": (4, 3, 2)}
    assert b.id == "b_2" and b.sar == Path("/abs/b.tif")
    assert b.options == {"reference": "sar", "tile_size": 256, "bands": (1, 2)}
    bad = [
        ([{"sar": "a.tif"}], "lacks column"),
        ([{"sar": "a.tif", "opt": "b.tif", "method": "nope"}], "unknown method"),
        ([{"sar": "a.tif", "opt": "b.tif", "mode": "warp"}], "mode must be"),
        ([{"sar": "a.tif", "opt": "b.tif", "bands": "r,g"}], "band list"),
        ([{"sar": "x/a.tif", "opt": "b.tif"}, {"sar": "y/a.tif", "opt": "c.tif"}], "duplicate pair id"),
        ([{"sar": "", "opt": "b.tif"}], "empty sar"),
    ]
    for rows, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            batch_pairs.read_manifest(write_manifest(tmp_path / "bad.csv", rows))
    with pytest.raises(InputError):
        batch_pairs.read_manifest(tmp_path / "missing.csv")


def test_pairs_from_globs(tmp_path):
    for sub, names in (("sar", ["x_20200101.tif", "x_20200202.tif", "y.tif"]),
                       ("opt", ["x_20200101.tif", "x_20200202.TIF", "z.tif"])):
        (tmp_path / sub).mkdir()
        for n in names:
            (tmp_path / sub / n).write_bytes(b"")
    pairs, unmatched = batch_pairs.pairs_from_globs(str(tmp_path / "sar/*.tif"), str(tmp_path / "opt/*"))
    assert [p.id for p in pairs] == ["x_20200101", "x_20200202"]
    assert sorted(p.name for p in unmatched) == ["y.tif", "z.tif"]
    assert pairs[1].opt.name == "x_20200202.TIF"
    # pairing by a date with a regex; a named group wins
    (tmp_path / "opt2").mkdir()
    for n in ("S2_20200101_T11.tif", "S2_20200202_T11.tif"):
        (tmp_path / "opt2" / n).write_bytes(b"")
    pairs, unmatched = batch_pairs.pairs_from_globs(str(tmp_path / "sar/x_*.tif"), str(tmp_path / "opt2/*.tif"),
                                              key_regex=r"_(?P<key>\d{8})")
    assert [(p.id, p.opt.name) for p in pairs] == [("20200101", "S2_20200101_T11.tif"),
                                                  ("20200202", "S2_20200202_T11.tif")]
    with pytest.raises(InputError, match="matches no file"):
        batch_pairs.pairs_from_globs(str(tmp_path / "none/*.tif"), str(tmp_path / "opt/*"))
    with pytest.raises(ConfigError, match="key"):
        batch_pairs.pairs_from_globs(str(tmp_path / "sar/*.tif"), str(tmp_path / "opt/*"), key_regex=r"x_")
    with pytest.raises(ConfigError, match="bad --key-regex"):
        batch_pairs.pairs_from_globs(str(tmp_path / "sar/*.tif"), str(tmp_path / "opt/*"), key_regex="(")


def test_out_dir_guard(tmp_path):
    (tmp_path / "other.txt").write_text("not ours")
    pair = batch_pairs.BatchPair("a", tmp_path / "a.tif", tmp_path / "b.tif")
    with pytest.raises(OutputError, match="not a soma batch folder"):
        batch.run_batch([pair], tmp_path, {"method": "identity"})


def test_run_interrupted_before_any_pair_finished_resumes(tmp_path, client, monkeypatch):
    """The run folder is claimed (run log created) before any work: a run interrupted while its
    first pairs are still running is resumed, not refused as a foreign folder."""
    s, o = make_pair(tmp_path / "in", "r1", seed=3)
    pairs = [batch_pairs.BatchPair("r1", s, o)]
    out = tmp_path / "out"

    def interrupted(jobs, *args):
        for job in jobs:  # the workers got going: partial outputs, no done.json
            Path(job["pair_dir"]).mkdir(parents=True)
            (Path(job["pair_dir"]) / ".aligned.tif.1.abcd.tmp.tif").write_bytes(b"partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(batch, "_run_jobs", interrupted)
        with pytest.raises(KeyboardInterrupt):
            batch.run_batch(pairs, out, {"method": "gradient"}, client=client)
    assert (out / batch.RUNLOG).is_file()
    res = batch.run_batch(pairs, out, {"method": "gradient"}, client=client)
    assert res.counts() == {"ok": 1, "failed": 0, "skipped": 0} and batch_pairs.is_done(out / "r1")


def test_collect_pairs_and_glob_hints(tmp_path):
    for sub, names in (("sar", ["S1_20200101.tif", "S1_20200202.tif"]), ("opt", ["S2_20200101.tif", "x.tif"])):
        (tmp_path / sub).mkdir()
        for n in names:
            (tmp_path / sub / n).write_bytes(b"")
    with pytest.raises(InputError, match="share a key.*--key-regex"):
        batch_pairs.collect_pairs(sar_glob=str(tmp_path / "sar/*.tif"), opt_glob=str(tmp_path / "opt/*.tif"))
    with pytest.warns(SomaWarning, match=r"2 file\(s\) without a partner: ") as seen:
        pairs = batch_pairs.collect_pairs(sar_glob=str(tmp_path / "sar/*.tif"), opt_glob=str(tmp_path / "opt/*.tif"),
                                    key_regex=r"_(\d{8})")
    assert "S1_20200202.tif" in str(seen[0].message) and "x.tif" in str(seen[0].message)
    assert [p.id for p in pairs] == ["20200101"]
    for kw in ({}, {"manifest": tmp_path / "m.csv", "sar_glob": "a"}, {"sar_glob": "a"}):
        with pytest.raises(ConfigError, match="either a MANIFEST.csv or both"):
            batch_pairs.collect_pairs(**kw)


def test_cli_batch_glob_and_report(tmp_path):
    """The real CLI path: a local cluster of worker processes, glob pairing, then ``soma report``."""
    from typer.testing import CliRunner

    from soma_cli.cli import app

    make_pair(tmp_path / "s", "g1", seed=5)
    os.rename(tmp_path / "s" / "g1_opt.tif", tmp_path / "g1.tif")
    out = tmp_path / "out"
    runner = CliRunner()
    r = runner.invoke(app, ["batch", "--sar-glob", str(tmp_path / "s" / "*_sar.tif"),
                            "--opt-glob", str(tmp_path / "*.tif"), "--key-regex", r"^(g\d)",
                            "--out-dir", str(out), "--method", "gradient", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert batch_pairs.is_done(out / "g1") and "g1" in r.output and "ok" in r.output
    assert (out / "report.html").is_file()
    _check_links(out / "report.html")
    r = runner.invoke(app, ["report", str(out / "g1" / "qa")])
    assert r.exit_code == 0, r.output
    _check_links(out / "g1" / "qa" / "report.html")
    # a manifest into the same folder: g1 is done (skipped), a pair with a missing input fails -> exit 1
    m = write_manifest(tmp_path / "m.csv", [
        {"id": "g1", "sar": str(tmp_path / "s" / "g1_sar.tif"), "opt": str(tmp_path / "g1.tif")},
        {"id": "gone", "sar": str(tmp_path / "missing.tif"), "opt": str(tmp_path / "g1.tif")}])
    r = runner.invoke(app, ["batch", str(m), "-o", str(out), "--method", "gradient", "--workers", "1"])
    assert r.exit_code == 1, r.output
    squashed = "".join(r.output.split()).replace("│", "")  # the table wraps long cells
    assert "failed" in r.output and "skipped" in r.output and "SARfilenotfound" in squashed
    assert "missing.tif" in squashed
    assert batch_pairs.pair_state(out / "gone") == "failed"
    r = runner.invoke(app, ["batch", "-o", str(out)])
    assert r.exit_code != 0


def _check_links(page: Path) -> None:
    text = page.read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', text)
    assert any(link.endswith(".png") for link in links)
    for link in links:
        if link.startswith("#"):
            assert f'id="{link[1:]}"' in text, link
        else:
            assert "://" not in link and (page.parent / link).is_file(), link


def test_matcher_gets_the_batch_options(tmp_path, monkeypatch):
    """--batch-size, --threads, --device and --weights reach the worker's matcher, and a matcher
    is built once per distinct set of options."""
    from soma_cli import matchers

    built = []

    def fake(name, **options):
        built.append((name, options))
        return matchers.IdentityMatcher()

    monkeypatch.setattr(matchers, "get_matcher", fake)
    s, o = make_pair(tmp_path / "in", "p", seed=0)
    opts = {"method": "soma", "batch_size": 3, "threads": 1, "device": "cpu", "tile_size": 128, "overlap": 0}
    rec = batch.run_pair({"id": "p", "sar": str(s), "opt": str(o), "pair_dir": str(tmp_path / "out" / "p"),
                          "options": opts})
    assert rec["status"] == "ok", rec["error"]
    assert built == [("soma", {"batch_size": 3, "threads": 1, "device": "cpu"})]
    cache = batch.MatcherCache()
    m1, cached1 = cache.get("gradient", {"batch_size": 2})
    m2, cached2 = cache.get("gradient", {"batch_size": 2})
    _, cached3 = cache.get("gradient", {"batch_size": 5})
    assert m1 is m2 and (cached1, cached2, cached3) == (False, True, False)


def test_one_band_list_parser_and_json_reader(tmp_path):
    from soma_cli.atomic import read_json
    from soma_cli.preprocess import parse_bands

    assert batch_pairs.parse_bands is parse_bands
    assert parse_bands("4,3,2") == parse_bands("4 3 2") == parse_bands(" 4, 3;2 ") == (4, 3, 2)
    assert parse_bands(None) is None
    for bad in ("", "r,g", "0,1", "4,-1"):
        with pytest.raises(ConfigError, match="band list"):
            parse_bands(bad)
    (tmp_path / "ok.json").write_text('{"a": [1, 2]}')
    (tmp_path / "bad.json").write_text('{"a": ')
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}
    assert read_json(tmp_path / "bad.json") is None and read_json(tmp_path / "missing.json") is None


def test_local_workers_share_the_cores_unless_threads_are_set(tmp_path, monkeypatch):
    """A local cluster's workers run cores // workers network threads each (at least 1); an
    existing cluster's one; a batch-wide --threads is kept as given."""
    seen = []
    monkeypatch.setattr(batch, "_run_jobs", lambda jobs, *a: seen.append(jobs[0]["options"]["threads"]))
    monkeypatch.setattr(batch, "usable_cores", lambda: 4)
    s, o = make_pair(tmp_path / "in", "p", seed=0)
    pairs = [batch_pairs.BatchPair("p", s, o, {})]
    for i, (kw, want) in enumerate([({"workers": 1}, 4), ({"workers": 2}, 2), ({"workers": 3}, 1),
                                    ({"workers": 8}, 1), ({"workers": 1, "scheduler": "tcp://x:1"}, 1),
                                    ({"workers": 1, "options": {"threads": 3}}, 3)]):
        batch.run_batch(pairs, tmp_path / f"out{i}", **kw)
        assert seen[-1] == want, kw
