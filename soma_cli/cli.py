"""The ``soma`` command line. Thin: parses options, calls the library, shows progress and tables.

Every expected failure is a :class:`soma_cli.errors.SomaError` and becomes one red line on stderr
and a non-zero exit code, never a traceback; a usage mistake is one line plus the command's usage
(exit code 2); Ctrl-C is the line ``interrupted`` (exit code 130). A
:class:`~soma_cli.errors.SomaWarning` is one yellow line.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional, Sequence

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .console import ProgressBar, err_console, print_batch_table, print_register_summary, warning_printer
from .errors import SomaError
from .interrupt import run_interruptibly, worker_running
from .preprocess import parse_bands
from .tiling import DEFAULT_OVERLAP, TILE_SIZES

#: ``--tile-size`` of register and batch.
TileSize = Annotated[Optional[int], typer.Option(
    help=f"Tile size in pixels (a multiple of 32); default: {' or '.join(map(str, TILE_SIZES))}, whichever "
         "layout with the overlap processes fewer pixels (the smaller on a tie).",
    show_default=False)]

app = typer.Typer(
    name="soma",
    help="SOMA: sub-pixel co-registration of SAR and optical satellite images.",
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: flags read --json, --overwrite / --no-overwrite (Typer's Rich panels
    # print a <bool> value after every flag)
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

#: the ClickException of the click that Typer runs on: newer Typers bundle their own copy, so the
#: ``click`` package may be another one; typer.BadParameter derives from it in every version
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _examples(*commands: str) -> str:
    """A command's help epilog; ``\\b`` keeps click from rewrapping the lines."""
    return "\b\nExamples:\n" + "\n".join(f"  {c}" for c in commands)


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


# ---- register -------------------------------------------------------------------------------------


@app.command(epilog=_examples(
    "soma register s1_vh.tif s2_rgb.tif -o aligned.tif",
    "soma register s1.tif s2_l1c.tif -o aligned.tif --flow-out disp.tif --qa-out qa/ --bands 4,3,2",
    "soma register s1.tif s2.tif -o s2_on_s1.tif --reference sar --mode affine --json",
    "soma register s1.tif s2.tif -o s1_gcps.tif --mode gcps --tiepoints-out tiepoints.gpkg",
))
def register(
    sar: Annotated[Path, typer.Argument(metavar="SAR", help="SAR GeoTIFF (amplitude, intensity, dB or 8-bit scaled).")],
    opt: Annotated[Path, typer.Argument(metavar="OPT", help="Optical GeoTIFF (1, 3, 4 or 13 bands; 8/16-bit or float).")],
    out: Annotated[Path, typer.Option("--out", "-o", help=(
        "Output: the moving image, aligned, on the reference grid (with --mode gcps: on its own grid, "
        "with ground control points)."))],
    reference: Annotated[str, typer.Option(help="Which image is the reference grid: opt or sar.")] = "opt",
    method: Annotated[str, typer.Option(help=(
        "Matcher: soma (the network, default), gradient (training-free), identity, or auto (the network, and "
        "gradient too on the tiles the check finds unreliable, keeping the answer with the lower estimated "
        "error)."))] = "soma",
    mode: Annotated[str, typer.Option(
        help="dense: resample with the dense field; affine: one global affine fit; gcps: the moving image's "
             "pixels unchanged with ground control points from the reliable tie points (for gdalwarp -tps).")] = "dense",
    flow_out: Annotated[Optional[Path], typer.Option(help=(
        "Write the displacement raster (dx, dy, certainty, and with --check the estimated error)."))] = None,
    tiepoints_out: Annotated[Optional[Path], typer.Option(
        help="Write tie points (a regular grid on the reference: map position, displacement in pixels and "
             "map units, certainty, estimated error, reliable flag) to this GeoPackage (.gpkg).")] = None,
    tiepoint_step: Annotated[int, typer.Option(help="Reference pixels between tie points.")] = 64,
    qa_out: Annotated[Optional[Path], typer.Option(help="Write QA products (PNGs, per-tile table) to this folder.")] = None,
    tile_size: TileSize = None,
    overlap: Annotated[int, typer.Option(help="Tile overlap in pixels.")] = DEFAULT_OVERLAP,
    batch_size: Annotated[int, typer.Option(
        help="Tiles per network call on a GPU (on the CPU one tile a call, two calls at once with 2+ threads).")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(
        help=("CPU threads for the network (default: the cores other processes leave free); with two or "
              "more, register matches two tiles at once, each on half of them."))] = None,
    io_threads: Annotated[Optional[int], typer.Option(
        min=0, help=("Threads that read the next tiles while the matcher works and warp the next strips while "
                     "one is written (default: one per 4 cores, 1 to 4; beside the CPU network, which reads its "
                     "tiles in its own threads when it matches two at once, the readers run at the lowest "
                     "priority, on Linux only; 0: none)."))] = None,
    bands: Annotated[Optional[str], typer.Option(help="Optical bands to use, 1-based, e.g. 4,3,2.")] = None,
    sar_band: Annotated[int, typer.Option(help="SAR band to use, 1-based.")] = 1,
    sar_scale: Annotated[str, typer.Option(help="SAR values: auto, db, amplitude or intensity.")] = "auto",
    resampling: Annotated[str, typer.Option(help="Output resampling: nearest, bilinear or cubic.")] = "bilinear",
    weights: Annotated[Optional[Path], typer.Option(help="TorchScript weights for --method soma.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    cog: Annotated[bool, typer.Option(help="Write Cloud-Optimised GeoTIFFs.")] = False,
    repair: Annotated[bool, typer.Option(help="Blend low-certainty outliers towards a smooth, certainty-weighted field.")] = True,
    strict: Annotated[bool, typer.Option(help="Exit with code 3 when the verdict is failed (the outputs are still written).")] = False,
    force: Annotated[bool, typer.Option(help="Apply the registration even when the verdict is failed.")] = False,
    check: Annotated[bool, typer.Option(help=(
        "Estimate the error of every tile without ground truth (match again after a known small "
        "deformation; one more matcher pass, about twice the matching time): band 4 of --flow-out, a QA "
        "map, the summary and the verdict use it."))] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")] = False,
):
    """Co-register a SAR and an optical image; write the moving one aligned on the reference grid.

    The displacement raster (--flow-out) is on the reference grid: band 1 dx, band 2 dy in
    reference pixels, band 3 certainty, band 4 (with --check) the estimated error in reference
    pixels; reference pixel (c, r) matches the moving image (already on the reference grid) at
    (c + dx, r + dy).

    Tie points (--tiepoints-out) sample that field every --tiepoint-step reference pixels, with map
    coordinates in the reference CRS. --mode gcps keeps the moving image's own pixels and grid and
    georeferences them by ground control points from the reliable tie points: gdalwarp -tps puts
    them on the reference.
    """
    import json

    from .errors import RegistrationFailed
    from .pipeline import RegisterOptions
    from .pipeline import register as run_register

    opts = RegisterOptions(
        sar=sar, opt=opt, out=out, reference=reference, method=method, mode=mode, flow_out=flow_out,
        qa_out=qa_out, tile_size=tile_size, overlap=overlap, batch_size=batch_size, device=device,
        threads=threads, io_threads=io_threads, bands=parse_bands(bands), sar_band=sar_band, sar_scale=sar_scale,
        resampling=resampling, weights=weights, overwrite=overwrite, cog=cog, repair=repair,
        tiepoints_out=tiepoints_out, tiepoint_step=tiepoint_step, strict=strict, force=force, check=check,
    )
    failure = None
    with ProgressBar(quiet or json_out, "tiles") as bar:
        try:
            result = run_interruptibly(lambda report: run_register(opts, progress=report), bar.update,
                                        outputs=(out, flow_out, qa_out, tiepoints_out))
        except RegistrationFailed as exc:  # --strict: the summary first, then the one-line error (exit 3)
            result, failure = exc.result, exc
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        print_register_summary(result)
    if failure is not None:
        raise failure


# ---- batch ----------------------------------------------------------------------------------------


@app.command("batch", epilog=_examples(
    "soma batch pairs.csv --out-dir runs/ --method gradient --workers 2",
    "soma batch --sar-glob 'sar/*.tif' --opt-glob 'opt/*.tif' --out-dir runs/",
    "soma batch --sar-glob 's1/*.tif' --opt-glob 's2/*.tif' --key-regex '_(\\d{8})' -o runs/ "
    "--scheduler tcp://10.0.0.5:8786",
))
def batch_cmd(
    manifest: Annotated[Optional[Path], typer.Argument(
        metavar="MANIFEST",
        help="CSV with columns sar, opt and optional id, reference, method, mode, bands, sar_scale, "
             "tile_size, overlap, weights (per-pair overrides; relative paths from the CSV's folder).")] = None,
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Output folder: one sub-folder per pair.")] = ...,
    sar_glob: Annotated[Optional[str], typer.Option(help="Instead of a manifest: glob of SAR files.")] = None,
    opt_glob: Annotated[Optional[str], typer.Option(help="Instead of a manifest: glob of optical files.")] = None,
    key_regex: Annotated[Optional[str], typer.Option(
        help="Pair glob files by this regex's group 'key' / group 1 / match in the file name "
             "(default: the file name without .tif).")] = None,
    reference: Annotated[str, typer.Option(help="Reference grid: opt or sar.")] = "opt",
    method: Annotated[str, typer.Option(help="Matcher: soma (the network, default), gradient, identity, auto, ...")] = "soma",
    mode: Annotated[str, typer.Option(help="dense, affine or gcps (see soma register --help).")] = "dense",
    tile_size: TileSize = None,
    overlap: Annotated[int, typer.Option(help="Tile overlap in pixels.")] = DEFAULT_OVERLAP,
    batch_size: Annotated[int, typer.Option(help="Tiles per matcher call.")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (on the workers).")] = "auto",
    bands: Annotated[Optional[str], typer.Option(help="Optical bands, 1-based, e.g. 4,3,2.")] = None,
    sar_scale: Annotated[str, typer.Option(help="SAR values: auto, db, amplitude or intensity.")] = "auto",
    weights: Annotated[Optional[Path], typer.Option(help="TorchScript weights for --method soma.")] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="Local worker processes, sharing the CPU cores (default: one per core).")] = None,
    scheduler: Annotated[Optional[str], typer.Option(
        help="Use an existing Dask cluster, e.g. tcp://host:8786 (paths must be valid on the workers).")] = None,
    strict: Annotated[bool, typer.Option(help="Count a pair whose verdict is failed as a failed pair.")] = False,
    check: Annotated[bool, typer.Option(help=(
        "Estimate each pair's error without ground truth (one more matcher pass; see soma register "
        "--help)."))] = False,
    retry_failed: Annotated[bool, typer.Option(help="Rerun pairs that failed before (default: count them as failed).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Rerun every pair, replacing its outputs.")] = False,
    html: Annotated[bool, typer.Option("--report/--no-report", help="Write OUT_DIR/report.html at the end.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")] = False,
):
    """Register many pairs in parallel (Dask), resumably: done pairs are skipped on a rerun.

    Per pair: OUT_DIR/ID/aligned.tif, flow.tif, tiepoints.gpkg, qa/, and done.json (written last)
    or failed.json; OUT_DIR/runlog.jsonl gets one JSON line per pair. Exit code 1 when a pair
    failed (now or before).
    """
    from . import batch as batch_lib
    from .batch_pairs import collect_pairs

    pairs = collect_pairs(manifest, sar_glob, opt_glob, key_regex)
    options = dict(reference=reference, method=method, mode=mode, tile_size=tile_size, overlap=overlap,
                   batch_size=batch_size, device=device, bands=parse_bands(bands), sar_scale=sar_scale,
                   weights=weights, strict=strict, check=check)
    with ProgressBar(quiet, "pairs") as bar:
        result = batch_lib.run_batch(pairs, out_dir, options, workers=workers, scheduler=scheduler,
                                     retry_failed=retry_failed, overwrite=overwrite, progress=bar.update)
    page = None
    if html:
        from .report import render

        page = render(out_dir)
    if not quiet:
        print_batch_table(result, page)
    if result.has_failures():
        raise typer.Exit(1)


# ---- report ---------------------------------------------------------------------------------------


@app.command("report", epilog=_examples("soma report qa/", "soma report runs/"))
def report_cmd(
    directory: Annotated[Path, typer.Argument(
        metavar="DIR", help="A --qa-out folder of soma register, or a soma batch --out-dir.")],
):
    """Render a QA folder or a batch folder into one static DIR/report.html (relative links only)."""
    from .report import render

    typer.echo(str(render(directory)))


# ---- train / export -------------------------------------------------------------------------------


def _train_info(info: dict) -> str:
    txt = f"loss {info.get('loss', float('nan')):.3f}"
    if "val_cmr1" in info:
        txt += f"  val rel CMR@1px {info['val_cmr1']:.2f}  rel median {info['val_median_rmse']:.2f} px"
    return txt


@app.command("train", epilog=_examples(
    "soma train data/s1s2_calif --out runs/t1 --train-groups T11SMT --val-groups T11SLT --time-budget 60",
    "soma train runs/t1/cache.npz --out runs/t2 --init runs/t1/best.pt --steps 2000",
))
def train_cmd(
    data: Annotated[Path, typer.Argument(
        metavar="DATA", help="Dataset folder (sar/, opt/, pairs.csv) or a prepared cache .npz.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: cache, checkpoints (resumed if present), log.")],
    prepare_only: Annotated[bool, typer.Option("--prepare-only", help="Only build the training cache.")] = False,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Cache path (default OUT/cache.npz).")] = None,
    clean: Annotated[str, typer.Option("--clean", help="Residual misregistration removal: gradient or none.")] = "gradient",
    clean_val: Annotated[bool, typer.Option("--clean-val/--no-clean-val", help="Clean the validation pairs too.")] = True,
    train_groups: Annotated[Optional[str], typer.Option("--train-groups", help=(
        "Comma-separated groups of DATA whose pairs train the network: the S2 tile in pairs.csv's s2_scene "
        "(e.g. T11SMT), or 'all' without one. Needed to build a cache."))] = None,
    val_groups: Annotated[Optional[str], typer.Option("--val-groups", help=(
        "Comma-separated held-out groups for validation (e.g. T11SLT). Needed to build a cache."))] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Schedule length in steps.")] = 20000,
    time_budget: Annotated[float, typer.Option("--time-budget", min=0, help="Minutes (0: none).")] = 0.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Training crops per step.")] = 4,
    crop: Annotated[int, typer.Option("--crop", min=64, help="Training crop (px, multiple of 32).")] = 256,
    lr: Annotated[float, typer.Option("--lr", min=0, help="Peak learning rate (AdamW; warm-up, then cosine decay).")] = 1e-3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the crops, augmentations and deformations.")] = 0,
    threads: Annotated[int, typer.Option("--threads", min=0, help="Torch CPU threads (0: default).")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    workers: Annotated[int, typer.Option("--workers", min=0, help="Data loader processes.")] = 0,
    val_every: Annotated[int, typer.Option("--val-every", min=1, help="Validate (and checkpoint) every N steps.")] = 200,
    val_chip: Annotated[int, typer.Option("--val-chip", min=64, help="Validation chip size (px).")] = 256,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from this checkpoint's weights (model.pt/best.pt/ckpt.pt; fresh optimizer and schedule).")] = None,
    consistency: Annotated[float, typer.Option("--consistency", min=0, help="Weight of the self-consistency loss (0: off).")] = 1.0,
    absolute: Annotated[float, typer.Option("--absolute", min=0, help="Weight of the losses against the synthetic deformation.")] = 0.3,
    only: Annotated[str, typer.Option("--only", help="certainty: train only the certainty calibration (4 numbers; with --init; the flow stays exactly as it is).")] = "",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rebuild an existing cache.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
):
    """Train the SOMA network: prepare a cache from DATA (needs rasterio), then fit (resumable)."""
    from . import train as tr
    from .errors import ConfigError

    tr.check_crop(crop)
    tr.check_only(only)
    out.mkdir(parents=True, exist_ok=True)
    if data.is_file() and data.suffix == ".npz":
        cache_path = data
    else:
        cache_path = cache or (out / "cache.npz")
        if overwrite or not cache_path.exists():
            if not train_groups or not val_groups:
                raise ConfigError("building a training cache needs --train-groups and --val-groups")
            with ProgressBar(quiet, "prepare") as bar:
                meta = tr.prepare(data, cache_path, [g for g in train_groups.split(",") if g],
                                  [g for g in val_groups.split(",") if g], clean=clean, clean_val=clean_val,
                                  overwrite=overwrite, progress=bar.update)
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
    with ProgressBar(quiet, "train", describe=_train_info) as bar:
        res = tr.fit(cache_path, out, cfg, progress=bar.update)
    v = res["val"]
    best = (f"best certainty cross-entropy {-res['best_cmr1']:.3f}" if only == "certainty"
            else f"best relative CMR@1px {res['best_cmr1']:.3f}")
    typer.echo(f"step {res['step']} ({res['stop']}): val relative CMR@1px {v['rel_cmr1']:.3f}, relative median "
               f"{v['rel_rmse_median']:.3f} px (absolute: CMR@1px {v['cmr1']:.3f}, median {v['rmse_median']:.3f} px), "
               f"certainty cross-entropy {v['cert_bce']:.3f}; {best}; checkpoints in {out}")


@app.command("export", epilog=_examples(
    f"soma export runs/t1/best.pt -o weights/soma-{__version__}.pt --training-data s1s2_calif",
))
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="model.pt / best.pt / ckpt.pt of soma train.")],
    output: Annotated[Path, typer.Option("-o", "--output", help=f"Weights file, e.g. weights/soma-{__version__}.pt.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing weights file.")] = False,
    training_data: Annotated[str, typer.Option("--training-data", help="Recorded in the metadata.")] = "",
    training_command: Annotated[str, typer.Option("--training-command", help="Recorded in the metadata.")] = "",
):
    """TorchScript-export a checkpoint with its metadata JSON (sha256), verified by reloading."""
    from .model.export import export

    meta = export(checkpoint, output, overwrite=overwrite, training_data=training_data,
                  training_command=training_command)
    typer.echo(f"{output} ({meta['params']} parameters, sha256 {meta['sha256'][:16]}...)")


# ---- evaluate -------------------------------------------------------------------------------------


@app.command("evaluate", epilog=_examples(
    "soma evaluate data/s1s2_calif --split T11SLT --protocol both --method soma --method gradient "
    "--method identity --json eval.json",
    "soma evaluate my_pairs/ --protocol paper --method gradient --chip 256 --limit 4",
))
def evaluate_cmd(
    data_dir: Annotated[Path, typer.Argument(
        metavar="DATA", help="Folder with sar/NAME.tif + opt/NAME.tif (co-registered pairs), optional pairs.csv.")],
    protocol: Annotated[str, typer.Option(help="Synthetic deformations: geo (small affine + local field), paper (rotation +-20 deg, shift +-50 px) or both.")] = "geo",
    method: Annotated[Optional[list[str]], typer.Option(help="Matcher to evaluate (repeatable): soma, gradient, identity, gefolki, auto. Default: soma, gradient, identity.")] = None,
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
    with ProgressBar(quiet, "chips") as bar:
        result = run_interruptibly(
            lambda report: ev.run(data_dir, protocol, method or ["soma", "gradient", "identity"], seed=seed,
                                  chip=chip, limit=limit, split=split, matcher_options=options, progress=report,
                                  batch=batch_size),
            bar.update)
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


# ---- entry point ----------------------------------------------------------------------------------


def main() -> None:
    """Entry point of ``soma``: runs the app and turns what it raised or returned into an exit code
    and at most a line or two on stderr. Without arguments it shows the help."""
    import logging

    for name in ("rasterio", "distributed"):  # library chatter would break the one-line errors
        logging.getLogger(name).addHandler(logging.NullHandler())
    with warnings.catch_warnings():
        warnings.showwarning = warning_printer(warnings.showwarning)
        code = _run_app(sys.argv[1:] or ["--help"])
    if code == 130:
        err_console.print("[bold red]interrupted[/]")
        if worker_running():
            # a library call abandoned inside native code: the interpreter's shutdown would wait for
            # it or tear it down mid-call
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    sys.exit(code)


def _run_app(args: Sequence[str]) -> int:
    try:
        # standalone_mode=False: errors come here instead of being printed with click's layout; a
        # typer.Exit(n) or Ctrl-C inside a command (Typer: exit code 130) comes back as the code
        code = app(args=list(args), prog_name="soma", standalone_mode=False)
    except SomaError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:  # outside a command
        return 130
    except typer.Abort as exc:  # older Typers turn Ctrl-C into Abort
        return 130 if isinstance(exc.__context__, KeyboardInterrupt) else 1
    except _ClickException as exc:
        err_console.print(f"[bold red]error:[/] {escape(exc.format_message())}", highlight=False, soft_wrap=True)
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            err_console.print(f"{ctx.get_usage()}  (see {ctx.command_path} --help)", highlight=False, markup=False)
        return exc.exit_code
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    main()
