"""``soma report DIR``: one static ``report.html`` for a QA folder or a batch output folder.

* A QA folder (``soma register --qa-out DIR``) holds ``summary.json`` (+ pictures and tiles table).
* A batch folder (``soma batch --out-dir DIR``) holds ``runlog.jsonl`` and one ``<id>/`` folder per
  pair with ``<id>/qa/``.

The page uses relative links only (images by relative path, inline CSS, no script, no external
assets), so the folder can be copied or archived as a whole. Only files that exist are referenced.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .atomic import atomic_write, read_json
from .errors import InputError
from .qa import ALIGNMENT, PRODUCTS
from .qa_figures import input_names

REPORT_NAME = "report.html"

#: The scene-overview pictures and how to read them (``{s}``: the overview decimation).
_IMAGES = (
    ("flow.png", ("Flow that was applied, in reference pixels; arrows point from each reference pixel "
                  "towards its match in the moving image.")),
    ("certainty.png", ("The matcher's certainty (0 = guess, 1 = sure); with repair on, uncertain outliers "
                       "were blended towards a smooth scene field.")),
    ("estimated_error.png", ("Estimated error of the match in reference pixels (soma register --check: each tile "
                             "matched again after a known small deformation); red regions are likely off by "
                             "more than a pixel or two. It reads low: on the held-out test tile, chips whose "
                             "estimate was under 0.5 px were off by more than 3 px in 1 % of cases, those over "
                             "1 px in 66 % (model card, calibration).")),
    ("check_calibration.png", ("How the estimate compared with the true error on the held-out test tile (128 chips "
                               "per protocol, each chip's mean estimate against its true relative RMSE): "
                               "well ranked, but low above 1 px.")),
    ("checkerboard_before.png", ("Reference (grey) and moving image (orange) in alternating squares, before "
                                 "correction: features should continue across the square borders (overview "
                                 "1:{s}; shifts of a few pixels show in the alignment picture above).")),
    ("checkerboard_after.png", "The same after correction."),
    ("flow_hist.png", "Distribution of |flow| over the overview pixels, with its median{clip}."),
)

_ALIGNMENT_CAPTION = (
    "Full-resolution crop (outlined on the overview pictures), chosen where the optical image has "
    "the most edges the matcher is sure of: edges of the optical image in yellow over the SAR image "
    "in grey. Aligned when, after correction, the yellow lines follow the grey image's own edges "
    "(road and field borders, shorelines, ridges).")

_SUMMARY_KEYS = (
    ("similarity_before_median", "similarity before (median tile)"),
    ("similarity_after_median", "similarity after (median tile)"),
    ("similarity_gain", "similarity gain"),
    ("scene_similarity_before", "scene similarity before"),
    ("scene_similarity_after", "scene similarity after"),
    ("tiles_improved_share", "share of tiles improved"),
    ("outlier_tiles", "outlier tiles"),
    ("outlier_share", "outlier share"),
    ("median_dx", "median dx (px)"),
    ("median_dy", "median dy (px)"),
    ("median_flow", "median |flow| (px)"),
    ("p95_flow", "95th pct |flow| (px)"),
    ("mean_certainty", "mean certainty"),
    ("certainty_coverage", "certainty coverage"),
    ("valid_fraction", "valid fraction"),
)

_TILE_COLS = ("row_off", "col_off", "height", "width", "median_dx", "median_dy", "median_flow",
              "mean_certainty", "similarity_before", "similarity_after", "outlier_reason")

_BATCH_COLS = ("id", "status", "verdict", "seconds", "median_flow", "certainty_coverage", "affine_rmse",
               "similarity_before", "similarity_after", "outlier_share", "error")

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}
td.l,th.l{text-align:left}tr.bad td{background:#fde2e2}tr.skip td{color:#888}
.imgs{display:flex;flex-wrap:wrap;gap:16px}.imgs figure{margin:0;max-width:660px}
.imgs img{max-width:660px;max-height:700px;border:1px solid #ccc}
.cols{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}h3{font-size:1em;margin:.8em 0 .2em}
figure.wide{margin:.5em 0;max-width:100%}figure.wide img{max-width:100%;border:1px solid #ccc}
figcaption{font-size:.8em;color:#555}.err{color:#a00}small{color:#666}p.sub{color:#444;margin-top:-.5em}
.verdict{padding:.6em 1em;border-radius:4px;margin:1em 0;border:1px solid}
.verdict b{font-size:1.2em;text-transform:uppercase;margin-right:.6em}
.v-ok{background:#e3f5e1;border-color:#2e7d32}.v-ok b{color:#2e7d32}
.v-doubtful{background:#fff4d6;border-color:#b26a00}.v-doubtful b{color:#b26a00}
.v-failed{background:#fde2e2;border-color:#b71c1c}.v-failed b{color:#b71c1c}
.v-other{background:#eee;border-color:#888}
"""


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return ""
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, list):
        return "[" + ", ".join(f"{x:.4f}" if isinstance(x, float) else _fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return json.dumps(v)
    return str(v)


def _e(v) -> str:
    return html.escape(_fmt(v))


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _kv_table(rows: Sequence[tuple]) -> str:
    out = ["<table>"]
    for k, v in rows:
        out.append(f"<tr><th class=l>{html.escape(k)}</th><td>{_e(v)}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _figure(qa_dir: Path, root: Path, name: str, caption: str, cls: str = "") -> str:
    p = qa_dir / name
    if not p.is_file():
        return ""
    rel = html.escape(_rel(p, root))
    return (f'<figure{cls}><a href="{rel}"><img src="{rel}" alt="{html.escape(name)}" loading="lazy"></a>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _hist_clipping(summary: dict) -> str:
    """The histogram's clipping in words (empty when nothing lies beyond its range)."""
    hist = summary.get("flow_hist") or {}
    if not hist.get("beyond"):
        return ""
    return (f"; {hist['beyond']} values ({100 * float(hist.get('beyond_share') or 0):.2g}%) exceed "
            f"{float(hist['upper_px']):.2f} px and are counted in the orange bar beyond the range")


def _images(qa_dir: Path, root: Path, summary: dict, scale: str) -> str:
    fmt = {"s": scale, "clip": _hist_clipping(summary)}
    figs = [f for f in (_figure(qa_dir, root, name, caption.format(**fmt)) for name, caption in _IMAGES) if f]
    return '<div class="imgs">' + "\n".join(figs) + "</div>" if figs else "<p><small>no pictures</small></p>"


def verdict_status(verdict) -> str:
    """The status word of a summary's ``verdict`` (a dict with ``status``, or the word itself)."""
    if isinstance(verdict, dict):
        return str(verdict.get("status") or "")
    return "" if verdict is None else str(verdict)


def _verdict_class(status: str) -> str:
    """CSS class of a verdict status: coloured for ok, doubtful and failed."""
    s = status.lower()
    return f"v-{s}" if s in ("ok", "doubtful", "failed") else "v-other"


def _verdict(verdict) -> str:
    """The verdict as a coloured box: status, reason, and any further fields in small print."""
    status = verdict_status(verdict)
    if not status:
        return ""
    extra = dict(verdict) if isinstance(verdict, dict) else {}
    extra.pop("status", None)
    reason = extra.pop("reason", "")
    details = "; ".join(f"{k}: {_fmt(v)}" for k, v in extra.items())
    return (f'<div class="verdict {_verdict_class(status)}"><b>{html.escape(status)}</b>{_e(reason)}'
            + (f"<br><small>{html.escape(details)}</small>" if details else "") + "</div>")


def _run_table(run: dict) -> str:
    """Inputs, outputs, method, versions, weights, date and settings of the run."""
    inputs, outputs = run.get("inputs") or {}, run.get("outputs") or {}
    weights = run.get("weights") or {}
    ref_name = input_names(run)[0]
    rows = [
        ("SAR input", inputs.get("sar")), ("optical input", inputs.get("opt")),
        ("reference grid", f"{run.get('reference')} ({ref_name})" if run.get("reference") else None),
        ("method / mode", f"{run.get('method')} / {run.get('mode')}"),
        ("output image", outputs.get("image")), ("displacement", outputs.get("flow")),
        ("SOMA version", run.get("soma_version")),
        ("weights", f"{weights.get('file')} (version {weights.get('version')})" if weights else None),
        ("weights sha256", weights.get("sha256")),
        ("date (UTC)", run.get("date")),
        ("settings", ", ".join(f"{k}={v}" for k, v in (run.get("settings") or {}).items())),
    ]
    out = ["<table>"]
    for k, v in rows:
        if v not in (None, ""):
            out.append(f"<tr><th class=l>{html.escape(k)}</th><td class=l>{_e(v)}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _links(qa_dir: Path, root: Path, names: Sequence[str]) -> str:
    links = [f'<a href="{html.escape(_rel(qa_dir / n, root))}">{html.escape(n)}</a>'
             for n in names if (qa_dir / n).is_file()]
    return " &middot; ".join(links)


def _qa_section(qa_dir: Path, root: Path, tiles_full: bool) -> str:
    summary = read_json(qa_dir / "summary.json") or {}
    parts = [_verdict(summary.get("verdict"))]
    scores = "<div><h3>scores</h3>" + _kv_table([(label, summary.get(key)) for key, label in _SUMMARY_KEYS
                                                 if key in summary]) + "</div>"
    run = ""
    if isinstance(summary.get("run"), dict):  # in a batch report, folded: the pairs share most of it
        run = (f"<div><h3>run</h3>{_run_table(summary['run'])}</div>" if tiles_full else
               f"<div><details><summary>run</summary>{_run_table(summary['run'])}</details></div>")
    parts.append(f'<div class="cols">{scores}{run}</div>')
    if summary.get("outlier_rule"):
        parts.append(f"<p><small>outlier rule: {html.escape(str(summary['outlier_rule']))}; similarity: "
                     f"{html.escape(str(summary.get('similarity', '')))}</small></p>")
    alignment = _figure(qa_dir, root, ALIGNMENT, _ALIGNMENT_CAPTION, ' class="wide"')
    if alignment:
        parts.append(f"<h3>alignment at full resolution</h3>{alignment}")
    scale = f"{float(summary.get('overview_scale') or 1):g}"
    parts.append(f"<h3>scene overview (1:{scale})</h3>" + _images(qa_dir, root, summary, scale))
    tiles = read_json(qa_dir / "tiles.json")
    if isinstance(tiles, list) and tiles:
        shown = tiles if tiles_full else [t for t in tiles if t.get("outlier")]
        title = f"tiles ({len(tiles)})" if tiles_full else f"outlier tiles ({len(shown)} of {len(tiles)})"
        if shown:
            rows = ["<table><tr>" + "".join(f"<th>{c}</th>" for c in _TILE_COLS) + "</tr>"]
            for t in shown:
                cls = ' class="bad"' if t.get("outlier") else ""
                rows.append(f"<tr{cls}>" + "".join(f"<td>{_e(t.get(c))}</td>" for c in _TILE_COLS) + "</tr>")
            rows.append("</table>")
            parts.append(f"<details{' open' if not tiles_full else ''}><summary>{title}</summary>"
                         + "\n".join(rows) + "</details>")
        else:
            parts.append(f"<p><small>{title}</small></p>")
    links = _links(qa_dir, root, [p for p in PRODUCTS if p.endswith((".csv", ".json"))])
    if links:
        parts.append(f"<p><small>data: {links}</small></p>")
    return "\n".join(parts)


def _page(title: str, body: str, sub: str = "") -> str:
    t = html.escape(title)
    sub = f'<p class="sub">{html.escape(sub)}</p>\n' if sub else ""
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{t}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{t}</h1>\n{sub}{body}\n</body></html>\n")


def _qa_title(root: Path) -> Tuple[str, str]:
    """(title, subtitle) of a QA folder's page: the inputs by name, reference first, when the
    summary records the run; else the folder's name."""
    run = (read_json(root / "summary.json") or {}).get("run")
    if not isinstance(run, dict):
        return f"SOMA QA report: {root.resolve().name}", ""
    ref, mov = input_names(run)
    sub = " \u00b7 ".join((f"{mov} aligned onto the grid of {ref}", f"{run.get('method')} / {run.get('mode')}",
                           f"SOMA {run.get('soma_version')}", str(run.get("date"))))
    return f"SOMA QA report: {ref} \u2190 {mov}", sub


def read_runlog(path: Path) -> List[dict]:
    """All records of a ``runlog.jsonl`` (malformed lines, e.g. a line cut by a kill, are skipped)."""
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "id" in rec:
            out.append(rec)
    return out


def latest_records(records: Sequence[dict]) -> Dict[str, dict]:
    """Per pair id the latest informative record: the last ok/failed one, else the last one."""
    latest: Dict[str, dict] = {}
    for rec in records:
        pid = str(rec["id"])
        if rec.get("status") != "skipped" or pid not in latest or latest[pid].get("status") == "skipped":
            latest[pid] = rec
    return latest


def _batch_body(root: Path) -> str:
    records = latest_records(read_runlog(root / "runlog.jsonl"))
    # pairs present on disk but absent from the log (e.g. log removed) still get a section
    for d in sorted(p for p in root.iterdir() if p.is_dir() and (p / "qa" / "summary.json").is_file()):
        records.setdefault(d.name, {"id": d.name, "status": "ok" if (d / "done.json").is_file() else ""})
    counts: Dict[str, int] = {}
    for r in records.values():
        counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
    parts = [f"<p>{len(records)} pair(s): " + ", ".join(f"{v} {html.escape(k)}" for k, v in sorted(counts.items()))
             + (' &middot; <a href="runlog.jsonl">runlog.jsonl</a>' if (root / "runlog.jsonl").is_file() else "")
             + "</p>"]
    head = "".join(f"<th{' class=l' if c in ('id', 'status', 'error') else ''}>{c}</th>" for c in _BATCH_COLS)
    rows = [f"<table><tr>{head}</tr>"]
    for pid in sorted(records):
        r = dict(records[pid])
        qa = r.get("qa") or read_json(root / pid / "qa" / "summary.json") or {}
        r.setdefault("similarity_before", qa.get("similarity_before_median"))
        r.setdefault("similarity_after", qa.get("similarity_after_median"))
        r.setdefault("outlier_share", qa.get("outlier_share"))
        r["verdict"] = verdict_status(r.get("verdict") or qa.get("verdict"))
        cls = {"failed": ' class="bad"', "skipped": ' class="skip"'}.get(str(r.get("status")), "")
        cells = []
        for c in _BATCH_COLS:
            v = r.get(c)
            if c == "id" and (root / pid / "qa" / "summary.json").is_file():
                cells.append(f'<td class=l><a href="#pair-{html.escape(pid)}">{_e(v)}</a></td>')
            elif c == "verdict" and v:
                cells.append(f'<td class="l {_verdict_class(v)}">{_e(v)}</td>')
            else:
                cells.append(f"<td{' class=l' if c in ('id', 'status', 'error') else ''}>{_e(v)}</td>")
        rows.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    rows.append("</table>")
    parts.append("\n".join(rows))
    for pid in sorted(records):
        qa_dir = root / pid / "qa"
        if not (qa_dir / "summary.json").is_file():
            continue
        r = records[pid]
        outs = _links(root / pid, root, ["aligned.tif", "flow.tif", "done.json"])
        run = (read_json(qa_dir / "summary.json") or {}).get("run")
        names = " \u2190 ".join(input_names(run)) if isinstance(run, dict) else ""
        parts.append(f'<h2 id="pair-{html.escape(pid)}">{html.escape(pid)}'
                     + (f" <small>{html.escape(names)}</small>" if names else "") + "</h2>"
                     + (f"<p><small>outputs: {outs}</small></p>" if outs else "")
                     + _kv_table([("affine", r.get("affine")), ("affine rmse (px)", r.get("affine_rmse")),
                                  ("seconds", r.get("seconds"))])
                     + _qa_section(qa_dir, root, tiles_full=False))
    return "\n".join(parts)


def render(directory: Path, out: Optional[Path] = None) -> Path:
    """Render ``directory`` (QA folder or batch folder) into ``report.html`` (atomically, replaced
    if present); returns its path. Raises :class:`InputError` for any other folder."""
    root = Path(directory)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    out = Path(out) if out is not None else root / REPORT_NAME
    if out.parent.resolve() != root.resolve():
        raise InputError("the report must be written inside the rendered folder (relative links)")
    if (root / "summary.json").is_file():
        title, sub = _qa_title(root)
        page = _page(title, _qa_section(root, root, tiles_full=True), sub)
    elif (root / "runlog.jsonl").is_file() or any(
            (p / "qa" / "summary.json").is_file() for p in root.iterdir() if p.is_dir()):
        page = _page(f"SOMA batch report: {root.resolve().name}", _batch_body(root))
    else:
        raise InputError(f"{root}: neither a QA folder (summary.json) nor a batch folder (runlog.jsonl)")
    data = page.encode("utf-8")
    return atomic_write(out, lambda fh: fh.write(data))
