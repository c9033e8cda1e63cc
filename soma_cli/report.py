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
from typing import Dict, List, Optional, Sequence

from .errors import InputError
from .atomic import atomic_write, read_json
from .qa import PRODUCTS

REPORT_NAME = "report.html"

_IMAGES = (
    ("checkerboard_before.png", "checkerboard before"),
    ("checkerboard_after.png", "checkerboard after"),
    ("flow.png", "flow"),
    ("certainty.png", "certainty"),
    ("flow_hist.png", "|flow| histogram"),
)

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
    ("overview_scale", "overview decimation"),
)

_TILE_COLS = ("row_off", "col_off", "height", "width", "median_dx", "median_dy", "median_flow",
              "mean_certainty", "similarity_before", "similarity_after", "outlier_reason")

_BATCH_COLS = ("id", "status", "seconds", "median_flow", "certainty_coverage", "affine_rmse",
               "similarity_before", "similarity_after", "outlier_share", "error")

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}
td.l,th.l{text-align:left}tr.bad td{background:#fde2e2}tr.skip td{color:#888}
.imgs{display:flex;flex-wrap:wrap;gap:8px}.imgs figure{margin:0}
.imgs img{max-width:420px;max-height:420px;border:1px solid #ccc}
figcaption{font-size:.8em;color:#555}.err{color:#a00}small{color:#666}
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


def _images(qa_dir: Path, root: Path) -> str:
    figs = []
    for name, caption in _IMAGES:
        p = qa_dir / name
        if p.is_file():
            rel = html.escape(_rel(p, root))
            figs.append(f'<figure><a href="{rel}"><img src="{rel}" alt="{html.escape(caption)}" '
                        f'loading="lazy"></a><figcaption>{html.escape(caption)}</figcaption></figure>')
    return '<div class="imgs">' + "\n".join(figs) + "</div>" if figs else "<p><small>no pictures</small></p>"


def _links(qa_dir: Path, root: Path, names: Sequence[str]) -> str:
    links = [f'<a href="{html.escape(_rel(qa_dir / n, root))}">{html.escape(n)}</a>'
             for n in names if (qa_dir / n).is_file()]
    return " &middot; ".join(links)


def _qa_section(qa_dir: Path, root: Path, tiles_full: bool) -> str:
    summary = read_json(qa_dir / "summary.json") or {}
    parts = [_kv_table([(label, summary.get(key)) for key, label in _SUMMARY_KEYS if key in summary])]
    if summary.get("outlier_rule"):
        parts.append(f"<p><small>outlier rule: {html.escape(str(summary['outlier_rule']))}; similarity: "
                     f"{html.escape(str(summary.get('similarity', '')))}</small></p>")
    parts.append(_images(qa_dir, root))
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


def _page(title: str, body: str) -> str:
    t = html.escape(title)
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{t}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{t}</h1>\n{body}\n</body></html>\n")


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
        cls = {"failed": ' class="bad"', "skipped": ' class="skip"'}.get(str(r.get("status")), "")
        cells = []
        for c in _BATCH_COLS:
            v = r.get(c)
            if c == "id" and (root / pid / "qa" / "summary.json").is_file():
                cells.append(f'<td class=l><a href="#pair-{html.escape(pid)}">{_e(v)}</a></td>')
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
        parts.append(f'<h2 id="pair-{html.escape(pid)}">{html.escape(pid)}</h2>'
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
        page = _page(f"SOMA QA report: {root.resolve().name}", _qa_section(root, root, tiles_full=True))
    elif (root / "runlog.jsonl").is_file() or any(
            (p / "qa" / "summary.json").is_file() for p in root.iterdir() if p.is_dir()):
        page = _page(f"SOMA batch report: {root.resolve().name}", _batch_body(root))
    else:
        raise InputError(f"{root}: neither a QA folder (summary.json) nor a batch folder (runlog.jsonl)")
    data = page.encode("utf-8")
    return atomic_write(out, lambda fh: fh.write(data))
