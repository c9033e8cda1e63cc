"""The ``soma`` command line. Thin: parses options, calls the library, shows progress and tables.

Every expected failure is a :class:`soma_cli.errors.SomaError` and becomes one red line on stderr
and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import SomaError

app = typer.Typer(
    name="soma",
    help="SOMA: sub-pixel co-registration of SAR and optical satellite images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _version(value: bool):
    if value:
        typer.echo(f"soma {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
):
    """SOMA: sub-pixel co-registration of SAR and optical satellite images."""


# ---- commands are added below, one section each ------------------------------------------------


def _parse_bands(text: Optional[str]):
    if text is None:
        return None
    try:
        bands = tuple(int(b) for b in text.replace(" ", "").split(",") if b)
    except ValueError:
        from .errors import BandError

        raise BandError(f"--bands must be comma-separated 1-based band numbers (got {text!r})") from None
    if not bands:
        from .errors import BandError

        raise BandError("--bands is empty")
    return bands


class _LazyBar:
    """A Rich progress bar that appears on the first progress tick (so an early error prints alone)
    and is stopped only if it was started."""

    def __init__(self, quiet: bool, label: str):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=err_console, disable=quiet, transient=False)
        self.task = self.bar.add_task(label, total=None)
        self.started = False

    def update(self, done: int, total: int, *_) -> None:
        if not self.started:
            self.bar.start()
            self.started = True
        self.bar.update(self.task, completed=done, total=total)

    def stop(self) -> None:
        if self.started:
            self.bar.stop()
            self.started = False

    def __enter__(self) -> "_LazyBar":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _progress_bar(quiet: bool, label: str):
    """A progress bar driven by the library's ``progress(done, total)`` callback: ``(bar, update)``."""
    bar = _LazyBar(quiet, label)
    return bar, bar.update


@app.command(
    epilog=(
        "Examples:\n\n"
        "  soma register s1_vh.tif s2_rgb.tif -o aligned.tif\n\n"
        "  soma register s1.tif s2_l1c.tif -o aligned.tif --flow-out disp.tif --qa-out qa/ --bands 4,3,2\n\n"
        "  soma register s1.tif s2.tif -o s2_on_s1.tif --reference sar --mode affine --json"
    )
)
def register(
    sar: Annotated[Path, typer.Argument(help="SAR GeoTIFF (amplitude, intensity, dB or 8-bit scaled).")],
    opt: Annotated[Path, typer.Argument(help="Optical GeoTIFF (1, 3, 4 or 13 bands; 8/16-bit or float).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: the moving image, aligned, on the reference grid.")],
    reference: Annotated[str, typer.Option(help="Which image is the reference grid: opt or sar.")] = "opt",
    method: Annotated[str, typer.Option(help="Matcher: soma (the network, default), gradient (training-free) or identity.")] = "soma",
    mode: Annotated[str, typer.Option(help="dense: resample with the dense field; affine: one global affine fit.")] = "dense",
    flow_out: Annotated[Optional[Path], typer.Option(help="Write the displacement raster (dx, dy, certainty).")] = None,
    qa_out: Annotated[Optional[Path], typer.Option(help="Write QA products (PNGs, per-tile table) to this folder.")] = None,
    tile_size: Annotated[int, typer.Option(help="Tile size in pixels (multiple of 32).")] = 512,
    overlap: Annotated[int, typer.Option(help="Tile overlap in pixels.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Tiles per batch.")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for the network.")] = None,
    bands: Annotated[Optional[str], typer.Option(help="Optical bands to use, 1-based, e.g. 4,3,2.")] = None,
    sar_band: Annotated[int, typer.Option(help="SAR band to use, 1-based.")] = 1,
    sar_scale: Annotated[str, typer.Option(help="SAR values: auto, db, amplitude or intensity.")] = "auto",
    resampling: Annotated[str, typer.Option(help="Output resampling: nearest, bilinear or cubic.")] = "bilinear",
    weights: Annotated[Optional[Path], typer.Option(help="TorchScript weights for --method soma.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    cog: Annotated[bool, typer.Option(help="Write Cloud-Optimised GeoTIFFs.")] = False,
    repair: Annotated[bool, typer.Option(help="Blend low-certainty outliers towards a smooth, certainty-weighted field.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")] = False,
):
    """Co-register a SAR and an optical image; write the moving one aligned on the reference grid.

    The displacement raster (--flow-out) is on the reference grid: band 1 dx, band 2 dy in reference pixels, band 3 certainty; reference pixel (c, r) matches the moving image (already on the reference grid) at (c + dx, r + dy).
    """  # noqa: E501 (one line per paragraph: Typer keeps line breaks)
    import json

    from .pipeline import RegisterOptions
    from .pipeline import register as run_register

    opts = RegisterOptions(
        sar=sar, opt=opt, out=out, reference=reference, method=method, mode=mode, flow_out=flow_out,
        qa_out=qa_out, tile_size=tile_size, overlap=overlap, batch_size=batch_size, device=device,
        threads=threads, bands=_parse_bands(bands), sar_band=sar_band, sar_scale=sar_scale,
        resampling=resampling, weights=weights, overwrite=overwrite, cog=cog, repair=repair,
    )
    bar, update = _progress_bar(quiet or json_out, "tiles")
    try:
        result = run_register(opts, progress=update)
    finally:
        bar.stop()
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        _print_register_summary(result)


def _print_register_summary(result) -> None:
    from rich.table import Table

    t = Table(title="soma register", show_header=False, title_justify="left")
    t.add_row("output", result.out)
    if result.flow_out:
        t.add_row("displacement", result.flow_out)
    if result.qa_out:
        t.add_row("QA", result.qa_out)
    t.add_row("method / mode", f"{result.method} / {result.mode} (reference: {result.reference})")
    t.add_row("tiles", str(result.tiles))
    t.add_row("median |flow|", f"{result.median_flow:.2f} px")
    t.add_row("certainty > 0.5", f"{100 * result.certainty_coverage:.1f} % of the overlap")
    t.add_row("repaired", f"{100 * result.repaired_share:.1f} % of the pixels (low certainty or outliers)")
    a = result.affine
    t.add_row("global affine", f"[{a[0][0]:.4f} {a[0][1]:.4f} {a[0][2]:+.2f}; {a[1][0]:.4f} {a[1][1]:.4f} {a[1][2]:+.2f}]"
              f"  (residual {result.affine_rmse:.2f} px, inliers {100 * result.affine_inliers:.0f} %)")
    if result.output_transform:
        t.add_row("new geotransform", ", ".join(f"{v:.6g}" for v in result.output_transform))
    t.add_row("time", f"{result.seconds:.1f} s")
    Console(stderr=True).print(t)


# ---- batch ----------------------------------------------------------------------------------------


@app.command(
    "batch",
    epilog=(
        "Examples:\n\n"
        "  soma batch pairs.csv --out-dir runs/ --method gradient --workers 2\n\n"
        "  soma batch --sar-glob 'sar/*.tif' --opt-glob 'opt/*.tif' --out-dir runs/\n\n"
        "  soma batch --sar-glob 's1/*.tif' --opt-glob 's2/*.tif' --key-regex '_(\\d{8})' -o runs/ "
        "--scheduler tcp://10.0.0.5:8786"
    ),
)
def batch_cmd(
    manifest: Annotated[Optional[Path], typer.Argument(
        help="CSV with columns sar, opt and optional id, reference, method, mode, bands, sar_scale, "
             "tile_size, overlap, weights (per-pair overrides; relative paths from the CSV's folder).")] = None,
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Output folder: one sub-folder per pair.")] = ...,
    sar_glob: Annotated[Optional[str], typer.Option(help="Instead of a manifest: glob of SAR files.")] = None,
    opt_glob: Annotated[Optional[str], typer.Option(help="Instead of a manifest: glob of optical files.")] = None,
    key_regex: Annotated[Optional[str], typer.Option(
        help="Pair glob files by this regex's group 'key' / group 1 / match in the file name "
             "(default: the file name without .tif).")] = None,
    reference: Annotated[str, typer.Option(help="Reference grid: opt or sar.")] = "opt",
    method: Annotated[str, typer.Option(help="Matcher: soma (the network, default), gradient, identity, ...")] = "soma",
    mode: Annotated[str, typer.Option(help="dense or affine.")] = "dense",
    tile_size: Annotated[int, typer.Option(help="Tile size in pixels.")] = 512,
    overlap: Annotated[int, typer.Option(help="Tile overlap in pixels.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Tiles per matcher call.")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (on the workers).")] = "auto",
    bands: Annotated[Optional[str], typer.Option(help="Optical bands, 1-based, e.g. 4,3,2.")] = None,
    sar_scale: Annotated[str, typer.Option(help="SAR values: auto, db, amplitude or intensity.")] = "auto",
    weights: Annotated[Optional[Path], typer.Option(help="TorchScript weights for --method soma.")] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="Local worker processes, one thread each (default: the number of CPU cores).")] = None,
    scheduler: Annotated[Optional[str], typer.Option(
        help="Use an existing Dask cluster, e.g. tcp://host:8786 (paths must be valid on the workers).")] = None,
    retry_failed: Annotated[bool, typer.Option(help="Rerun pairs that failed before (default: skip them).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Rerun every pair, replacing its outputs.")] = False,
    html: Annotated[bool, typer.Option("--report/--no-report", help="Write OUT_DIR/report.html at the end.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")] = False,
):
    """Register many pairs in parallel (Dask), resumably: done pairs are skipped on a rerun.

    Per pair: OUT_DIR/ID/aligned.tif, flow.tif, qa/, and done.json (written last) or failed.json;
    OUT_DIR/runlog.jsonl gets one JSON line per pair. Exit code 1 when a pair failed (now or before).
    """
    import os

    from . import batch as batch_lib
    from .errors import ConfigError

    if (manifest is None) == (sar_glob is None and opt_glob is None) or (manifest is None and not (sar_glob and opt_glob)):
        raise ConfigError("give either a MANIFEST.csv or both --sar-glob and --opt-glob")
    if manifest is not None:
        pairs = batch_lib.read_manifest(manifest)
    else:
        pairs, unmatched = batch_lib.pairs_from_globs(sar_glob, opt_glob, key_regex)
        if unmatched and not quiet:
            names = ", ".join(p.name for p in unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
            err_console.print(f"[yellow]warning:[/] {len(unmatched)} file(s) without a partner: {names}")
    options = dict(reference=reference, method=method, mode=mode, tile_size=tile_size, overlap=overlap,
                   batch_size=batch_size, device=device, bands=_parse_bands(bands), sar_scale=sar_scale,
                   weights=weights)
    bar, update = _progress_bar(quiet, "pairs")
    try:
        result = batch_lib.run_batch(pairs, out_dir, options, workers=workers or os.cpu_count() or 1,
                                     scheduler=scheduler, retry_failed=retry_failed, overwrite=overwrite,
                                     progress=update)
    finally:
        bar.stop()
    page = None
    if html:
        from .report import render

        page = render(out_dir)
    if not quiet:
        _print_batch_table(result, page)
    if result.has_failures():
        raise SystemExit(1)  # not typer.Exit: app(standalone_mode=False) returns that code unseen


def _print_batch_table(result, page) -> None:
    from rich.table import Table

    def num(v, fmt="{:.2f}"):
        return fmt.format(v) if isinstance(v, (int, float)) and v == v else ""

    recs = sorted(result.records, key=lambda r: r["id"])
    shown = recs if len(recs) <= 60 else [r for r in recs if r["status"] == "failed"][:60]
    t = Table(title=f"soma batch: {result.out_dir}", title_justify="left")
    for col in ("id", "status", "s", "|flow| px", "cert>0.5", "sim before", "sim after", "error / note"):
        t.add_column(col, justify="left" if col in ("id", "status", "error / note") else "right",
                     overflow="fold" if col == "error / note" else "ellipsis")
    style = {"ok": "green", "failed": "red", "skipped": "dim"}
    for r in shown:
        t.add_row(r["id"], f"[{style.get(r['status'], '')}]{r['status']}[/]", num(r.get("seconds"), "{:.1f}"),
                  num(r.get("median_flow")), num(r.get("certainty_coverage")), num(r.get("similarity_before"), "{:.3f}"),
                  num(r.get("similarity_after"), "{:.3f}"), (r.get("error") or r.get("reason") or "")[:200])
    con = Console(stderr=True)
    if shown:
        con.print(t)
    c = result.counts()
    ran = c["ok"] + c["failed"]
    rate = f", {60 * ran / result.seconds:.2f} pairs/min" if ran and result.seconds > 0 else ""
    con.print(f"{c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped in {result.seconds:.1f} s{rate}"
              + (f"; report: {page}" if page else ""), highlight=False)


# ---- report ---------------------------------------------------------------------------------------


@app.command("report")
def report_cmd(
    directory: Annotated[Path, typer.Argument(help="A --qa-out folder of soma register, or a soma batch --out-dir.")],
):
    """Render a QA folder or a batch folder into one static DIR/report.html (relative links only)."""
    from .report import render

    typer.echo(str(render(directory)))


# ---- train / export -------------------------------------------------------------------------------


@app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Argument(help="Dataset folder (sar/, opt/, pairs.csv) or a prepared cache .npz.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: cache, checkpoints (resumed if present), log.")],
    prepare_only: Annotated[bool, typer.Option("--prepare-only", help="Only build the training cache.")] = False,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Cache path (default OUT/cache.npz).")] = None,
    clean: Annotated[str, typer.Option("--clean", help="Residual misregistration removal: gradient or none.")] = "gradient",
    clean_val: Annotated[bool, typer.Option("--clean-val/--no-clean-val", help="Clean the validation pairs too.")] = True,
    train_groups: Annotated[str, typer.Option("--train-groups", help="Comma-separated training groups.")] = "T11SMT",
    val_groups: Annotated[str, typer.Option("--val-groups", help="Comma-separated validation groups.")] = "T11SLT",
    steps: Annotated[int, typer.Option("--steps", min=1, help="Schedule length in steps.")] = 20000,
    time_budget: Annotated[float, typer.Option("--time-budget", min=0, help="Minutes (0: none).")] = 0.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 4,
    crop: Annotated[int, typer.Option("--crop", min=64, help="Training crop (px, multiple of 32).")] = 256,
    lr: Annotated[float, typer.Option("--lr", min=0)] = 1e-3,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[int, typer.Option("--threads", min=0, help="Torch CPU threads (0: default).")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    workers: Annotated[int, typer.Option("--workers", min=0, help="Data loader processes.")] = 0,
    val_every: Annotated[int, typer.Option("--val-every", min=1)] = 200,
    val_chip: Annotated[int, typer.Option("--val-chip", min=64)] = 256,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from this checkpoint's weights (model.pt/best.pt/ckpt.pt; fresh optimizer and schedule).")] = None,
    consistency: Annotated[float, typer.Option("--consistency", min=0, help="Weight of the self-consistency loss (0: off).")] = 1.0,
    absolute: Annotated[float, typer.Option("--absolute", min=0, help="Weight of the losses against the synthetic deformation.")] = 0.3,
    only: Annotated[str, typer.Option("--only", help="certainty: train only the certainty calibration (4 numbers; with --init; the flow stays exactly as it is).")] = "",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rebuild an existing cache.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
):
    """Train the SOMA network: prepare a cache from DATA (needs rasterio), then fit (resumable)."""
    from . import train as tr
    from .errors import ConfigError

    if crop % 32:
        raise ConfigError("--crop must be a multiple of 32")
    tr.check_only(only)
    out.mkdir(parents=True, exist_ok=True)
    if data.is_file() and data.suffix == ".npz":
        cache_path = data
    else:
        cache_path = cache or (out / "cache.npz")
        if overwrite or not cache_path.exists():
            bar, update = _progress_bar(quiet, "prepare")
            with bar:
                meta = tr.prepare(data, cache_path, [g for g in train_groups.split(",") if g],
                                  [g for g in val_groups.split(",") if g], clean=clean, clean_val=clean_val,
                                  overwrite=overwrite,
                                  progress=update)
            err_console.print(f"cache {cache_path}: {meta['bytes'] / 1e6:.1f} MB, "
                              f"{len(meta['train_names'])} train / {len(meta['val_names'])} val pairs")
        else:
            err_console.print(f"using existing cache {cache_path}")
    if prepare_only:
        return
    cfg = tr.FitConfig(steps=steps, time_budget_min=time_budget, batch_size=batch_size, crop=crop, lr=lr,
                       seed=seed, threads=threads, device=device, workers=workers, val_every=val_every,
                       val_chip=val_chip, init=str(init) if init else "", consistency=consistency,
                       absolute=absolute, only=only)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"), console=err_console, disable=quiet)
    task = bar.add_task("train", total=steps, info="")

    def update(done: int, total: int, info: dict):
        txt = f"loss {info.get('loss', float('nan')):.3f}"
        if "val_cmr1" in info:
            txt += f"  val rel CMR@1px {info['val_cmr1']:.2f}  rel median {info['val_median_rmse']:.2f} px"
        bar.update(task, completed=done, total=total, info=txt)

    with bar:
        res = tr.fit(cache_path, out, cfg, progress=update)
    v = res["val"]
    best = (f"best certainty cross-entropy {-res['best_cmr1']:.3f}" if only == "certainty"
            else f"best relative CMR@1px {res['best_cmr1']:.3f}")
    typer.echo(f"step {res['step']} ({res['stop']}): val relative CMR@1px {v['rel_cmr1']:.3f}, relative median "
               f"{v['rel_rmse_median']:.3f} px (absolute: CMR@1px {v['cmr1']:.3f}, median {v['rmse_median']:.3f} px), "
               f"certainty cross-entropy {v['cert_bce']:.3f}; {best}; checkpoints in {out}")


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="model.pt / best.pt / ckpt.pt of soma train.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Weights file, e.g. weights/soma-0.2.0.pt.")],
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    training_data: Annotated[str, typer.Option("--training-data", help="Recorded in the metadata.")] = "",
    training_command: Annotated[str, typer.Option("--training-command", help="Recorded in the metadata.")] = "",
):
    """TorchScript-export a checkpoint with its metadata JSON (sha256), verified by reloading."""
    from .model.export import export

    meta = export(checkpoint, output, overwrite=overwrite, training_data=training_data,
                  training_command=training_command)
    typer.echo(f"{output} ({meta['params']} parameters, sha256 {meta['sha256'][:16]}...)")


# ---- evaluate -------------------------------------------------------------------------------------


@app.command(
    "evaluate",
    epilog=(
        "Examples:\n\n"
        "  soma evaluate data/s1s2_calif --split T11SLT --protocol both --method soma --method gradient "
        "--method identity --json eval.json\n\n"
        "  soma evaluate my_pairs/ --protocol paper --method gradient --chip 256 --limit 4"
    ),
)
def evaluate_cmd(
    data_dir: Annotated[Path, typer.Argument(help="Folder with sar/NAME.tif + opt/NAME.tif (co-registered pairs), optional pairs.csv.")],
    protocol: Annotated[str, typer.Option(help="Synthetic deformations: geo (small affine + local field), paper (rotation +-20 deg, shift +-50 px) or both.")] = "geo",
    method: Annotated[Optional[list[str]], typer.Option(help="Matcher to evaluate (repeatable): soma, gradient, identity, gefolki. Default: soma, gradient, identity.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the deformations (same seed, same deformations on any machine).")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N pairs (after --split).")] = None,
    chip: Annotated[int, typer.Option(help="Chip size in pixels; chips are cut on a non-overlapping grid.")] = 512,
    split: Annotated[Optional[str], typer.Option(help="Keep pairs of this group, e.g. T11SLT (the S2 tile in pairs.csv).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the results to this JSON file.")] = None,
    batch_size: Annotated[int, typer.Option(help="Chips per matcher call.")] = 4,
    weights: Annotated[Optional[Path], typer.Option(help="TorchScript weights for --method soma.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (for --method soma).")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --json file.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Accuracy benchmark: deform the SAR of co-registered pairs with known flows and score each method.

    Absolute metrics (CMR@k = share of chips with RMSE < k px, RMSE, AEPE, <1px) compare with the
    known deformation; relative ones (rel ...) compare the deformed-pair flow with the undeformed-pair
    flow composed with the deformation, so the pairs' own residual misregistration cancels out.
    """
    from rich import box
    from rich.table import Table

    from . import evaluate as ev
    from .io.write import check_output

    if json_path is not None:
        check_output(json_path, overwrite)
    options = {"device": device, "batch_size": batch_size}
    if weights is not None:
        options["weights"] = weights
    bar, update = _progress_bar(quiet, "chips")
    try:
        result = ev.run(data_dir, protocol, method or ["soma", "gradient", "identity"], seed=seed, chip=chip,
                        limit=limit, split=split, matcher_options=options, progress=update, batch=batch_size)
    finally:
        bar.stop()
    if json_path is not None:
        ev.write_json(json_path, result)
    con = Console()
    if not con.is_terminal:  # piped to a file: do not squeeze the table into 80 columns
        con = Console(width=160)
    for name, res in ev.protocol_results(result).items():
        headers, rows = ev.table_rows(res)
        t = Table(title=f"protocol {name}: {res['pairs']} pair(s), {res['chips']} chips of {res['chip']} px, "
                        f"seed {res['seed']}" + (f", split {res['split']}" if res["split"] else ""),
                  title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False,
                  caption="CMR, <1px: % of chips / pixels; RMSE, AEPE: px; rel: self-consistency; n: chips",
                  caption_justify="left")
        for h in headers:
            t.add_column(h, justify="left" if h == "method" else "right", no_wrap=True,
                         min_width=max(len(r[0]) for r in rows) if h == "method" else None)
        for row in rows:
            t.add_row(*row)
        con.print(t)
    if json_path is not None and not quiet:
        err_console.print(f"wrote {json_path}", highlight=False)


def main() -> None:
    """Entry point: run the Typer app, turning SomaError into a one-line message."""
    import logging

    for name in ("rasterio", "distributed"):  # library chatter would break the one-line errors
        logging.getLogger(name).addHandler(logging.NullHandler())
    try:
        code = app(standalone_mode=False)  # returns the code of a typer.Exit(n) instead of raising
        if isinstance(code, int) and code:
            sys.exit(code)
    except SomaError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click usage errors etc.
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
