"""What the ``soma`` commands show on stderr (Rich): the console, the progress bar driven by the
library's progress callback, the register and batch summaries, and warnings as one line."""

from __future__ import annotations

from typing import Callable, Optional

from rich.console import Console
from rich.markup import escape

from .errors import SomaWarning

err_console = Console(stderr=True)

class ProgressBar:
    """A Rich progress bar driven by the library's ``progress(done, total[, info])`` callback
    (:meth:`update`). It appears on the first tick, so an early error prints alone; ``describe``
    turns the callback's ``info`` into the text after the bar."""

    def __init__(self, quiet: bool, label: str, describe: Optional[Callable[[dict], str]] = None):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.describe = describe
        self.bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err_console,
                            disable=quiet)
        self.task = self.bar.add_task(label, total=None, info="")
        self.started = False

    def update(self, done: int, total: int, info: Optional[dict] = None) -> None:
        if not self.started:
            self.bar.start()
            self.started = True
        text = self.describe(info or {}) if self.describe else ""
        self.bar.update(self.task, completed=done, total=total, info=text)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.bar.stop()
            self.started = False


VERDICT_STYLE = {"ok": "green", "doubtful": "yellow", "failed": "bold red"}


def print_register_summary(result) -> None:
    from rich.table import Table

    t = Table(title="soma register", show_header=False, title_justify="left")
    t.add_row("output", result.out)
    if result.flow_out:
        t.add_row("displacement", result.flow_out)
    if result.qa_out:
        t.add_row("QA", result.qa_out)
    if result.tiepoints:
        tp = result.tiepoints
        gcps = f", {tp['gcps']} of them ground control points in the output" if tp["gcps"] is not None else ""
        t.add_row("tie points", f"{result.tiepoints_out or 'not written'}: {tp['points']} points, "
                                f"{tp['reliable']} reliable{gcps}")
    t.add_row("method / mode", f"{result.method} / {result.mode} (reference: {result.reference})")
    v = result.verdict
    t.add_row("verdict", f"[{VERDICT_STYLE[v['status']]}]{v['status']}[/]: {v['reason']}")
    failures = f" ({v['tile_failures']} without evidence)" if v["tile_failures"] else ""
    t.add_row("tiles", f"{result.tiles} of {result.tile_size} px{failures}")
    t.add_row("evidence", f"certainty >= {result.evidence_certainty:g} on {100 * v['coverage']:.1f} % of the overlap; "
              f"trusted tiles hold {100 * v['trusted_share']:.1f} %")
    t.add_row("edge similarity", f"{v['similarity_before']:.3f} before, {v['similarity_after']:.3f} after")
    if result.check:
        c = result.check
        t.add_row("estimated error", f"median {c['median_px']:.2f} px; {100 * c['share_over_1px']:.1f} % above 1 px, "
                                     f"{100 * c['share_over_3px']:.1f} % above 3 px (trusted tiles)")
    t.add_row("median |flow|", f"{result.median_flow:.2f} px")
    t.add_row("repaired", f"{100 * result.repaired_share:.1f} % of the pixels (low certainty or outliers)")
    a = result.affine
    t.add_row("global affine", f"[{a[0][0]:.4f} {a[0][1]:.4f} {a[0][2]:+.2f}; {a[1][0]:.4f} {a[1][1]:.4f} {a[1][2]:+.2f}]"
              f"  (residual {result.affine_rmse:.2f} px)")
    if result.output_transform:  # full precision: it is meant to be copied
        t.add_row("new geotransform", ", ".join(repr(float(v)) for v in result.output_transform))
    t.add_row("time", f"{result.seconds:.1f} s")
    err_console.print(t)


def print_batch_table(result, page) -> None:
    from rich.table import Table

    def num(v, fmt="{:.2f}"):
        return fmt.format(v) if isinstance(v, (int, float)) and v == v else ""

    recs = sorted(result.records, key=lambda r: r["id"])
    shown = recs if len(recs) <= 60 else [r for r in recs if r["status"] == "failed"][:60]
    t = Table(title=f"soma batch: {result.out_dir}", title_justify="left")
    for col in ("id", "status", "verdict", "s", "|flow| px", "evidence", "sim before", "sim after", "error / note"):
        t.add_column(col, justify="left" if col in ("id", "status", "verdict", "error / note") else "right",
                     overflow="fold" if col == "error / note" else "ellipsis")
    style = {"ok": "green", "failed": "red", "skipped": "dim"}
    for r in shown:
        v = r.get("verdict") or {}
        note = r.get("error") or r.get("reason") or (v.get("reason") if v.get("status") not in (None, "ok") else "")
        t.add_row(escape(r["id"]), f"[{style.get(r['status'], '')}]{r['status']}[/]",
                  f"[{VERDICT_STYLE[v['status']]}]{v['status']}[/]" if v else "", num(r.get("seconds"), "{:.1f}"),
                  num(r.get("median_flow")), num(r.get("certainty_coverage")), num(r.get("similarity_before"), "{:.3f}"),
                  num(r.get("similarity_after"), "{:.3f}"), escape((note or "")[:200]))
    if shown:
        err_console.print(t)
    err_console.print(result.summary() + (f"; report: {page}" if page else ""), highlight=False, markup=False)


def warning_printer(fallback):
    """``warnings.showwarning`` that prints a SomaWarning as one yellow line (others as before)."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SomaWarning):
            err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show
